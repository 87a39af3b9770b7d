"""Ordinary text for the anchor statistics: a local file or a hub dataset, in file order or as a
seeded random sample (as the references' layer_stats.py draws Wikipedia articles)."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from pathlib import Path

from rlsedit_cli.errors import DataError, first_line
from rlsedit_cli.files import file_sha256

HUB_CORPORA = {  # alias -> (dataset, config, split, text field)
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1", "train", "text"),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en", "train", "text"),
}


def _local(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    stem = path.name.removesuffix(".gz")
    with opener(path, "rt", encoding="utf-8") as f:
        if stem.endswith(".jsonl"):
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        text = json.loads(line).get("text", "")
                    except (json.JSONDecodeError, AttributeError) as e:
                        raise DataError(f"{path} line {n} is not a JSON object with 'text': fix "
                                        "the file or use a plain text file") from e
                    if text.strip():
                        yield text
        elif stem.endswith(".json"):
            for item in json.load(f):
                text = item.get("text", "") if isinstance(item, dict) else str(item)
                if text.strip():
                    yield text
        else:
            for line in f:
                if line.strip():
                    yield line.strip()


def _hub(spec: str, seed: int | None) -> Iterator[str]:
    name, config, split, field = HUB_CORPORA.get(spec) or (*_parse_hf(spec), "train", "text")
    try:
        from datasets import load_dataset

        if seed is None:
            stream = load_dataset(name, config, split=split, streaming=True)
        else:  # a random sample needs the whole (memory-mapped) dataset
            stream = load_dataset(name, config, split=split).shuffle(seed=seed)
        for row in stream:
            text = row.get(field, "")
            if text and text.strip():
                yield text
    except Exception as e:  # offline, unreachable, unknown dataset
        first = first_line(e)[:160]
        raise DataError(
            f"corpus '{spec}' ({name}) cannot be read from the Hugging Face hub ({first}): set "
            "stats.corpus to a local .txt/.jsonl file of ordinary text (e.g. wikitext-2's "
            "wiki.test.raw), or cache the dataset where there is a network"
        ) from e


def _parse_hf(spec: str) -> tuple[str, str | None]:
    if not spec.startswith("hf:"):
        raise DataError(
            f"stats.corpus={spec!r} is neither a file nor a known corpus: use a path, one of "
            f"{sorted(HUB_CORPORA)}, or hf:DATASET[:CONFIG]"
        )
    name, _, config = spec[3:].partition(":")
    return name, config or None


def iter_texts(corpus: str, sample: str = "first", seed: int = 0) -> Iterator[str]:
    """Non-empty texts of ``corpus`` (file lines, JSONL 'text', or hub rows).

    ``sample="first"``: in the corpus's order; ``"random"``: in an order shuffled by ``seed``
    (reading the first n texts then draws a uniform sample of n without replacement).
    """
    if sample not in ("first", "random"):
        raise DataError(f"stats.sample={sample!r} must be random or first")
    path = Path(corpus).expanduser()
    if path.is_file():
        if sample == "first":
            return _local(path)
        texts = list(_local(path))
        random.Random(seed).shuffle(texts)
        return iter(texts)
    if "/" in corpus and not corpus.startswith("hf:") and corpus not in HUB_CORPORA:
        raise DataError(f"stats.corpus file {corpus} does not exist: point it at a text file")
    return _hub(corpus, seed if sample == "random" else None)


def corpus_id(corpus: str) -> str:
    """What identifies a corpus in cache keys: a file's name and content hash, or the hub id."""
    path = Path(corpus).expanduser()
    if not path.is_file():
        return corpus
    return f"{path.name}:{file_sha256(path)[:16]}"
