"""CounterFact in ROME's layout (counterfact.json or multi_counterfact.json), from a local path
or downloaded once into the cache, with ROME's reference snippets and tf-idf statistics for the
consistency metric when available."""

from __future__ import annotations

import logging

from rlsedit_cli.datasets.base import EditDataset
from rlsedit_cli.datasets.download import cached_file
from rlsedit_cli.datasets.records import parse_all, parse_rome, read_json_records
from rlsedit_cli.datasets.references import References
from rlsedit_cli.errors import first_line

log = logging.getLogger(__name__)
ROME_DATA = "https://rome.baulab.info/data/dsets"


def _reference_file(given: str | None, name: str, cache: str, key: str) -> str | None:
    if given == "none":
        return None
    return given or str(cached_file(f"{ROME_DATA}/{name}", cache, name, key))


def load(name: str = "counterfact", path: str | None = None, url: str = "",
         snippets: str | None = None, idf: str | None = None, vocab: str | None = None,
         cache: str = "~/.cache/rlsedit", skip_invalid: bool = False) -> EditDataset:
    """Records (validated) and, when they can be had, the consistency references."""
    path = path or str(cached_file(url, cache, "CounterFact", "dataset.path"))
    records, skipped = parse_all(read_json_records(path), parse_rome, skip_invalid, "rome")
    refs = None
    try:
        files = [_reference_file(given, fname, cache, f"dataset.{key}")
                 for given, fname, key in ((snippets, "attribute_snippets.json", "snippets"),
                                           (idf, "idf.npy", "idf"),
                                           (vocab, "tfidf_vocab.json", "vocab"))]
        if all(files):
            refs = References.load(files[0], files[1], files[2])
    except Exception as e:  # references are optional: consistency is then reported absent
        log.warning("consistency will be absent: %s", first_line(e))
    return EditDataset(name=name, records=records, references=refs, skipped=skipped)
