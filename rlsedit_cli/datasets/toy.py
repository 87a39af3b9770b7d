"""The toy fact world's records, read from a bundle built by `rlsedit toy build`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rlsedit_cli.datasets.base import EditDataset
from rlsedit_cli.datasets.records import parse_all, parse_rome, read_json_records
from rlsedit_cli.datasets.references import References
from rlsedit_cli.datasets.world import build_world
from rlsedit_cli.errors import DataError

log = logging.getLogger(__name__)
HELD_OUT = 200  # the world's last records: the smoke task's questions, never edited


def load(path: str, name: str = "toy", skip_invalid: bool = False,
         num_subjects: int | None = None, world_seed: int = 0) -> EditDataset:
    """Records, snippets and tf-idf statistics of the bundle at ``path``.

    The world's last ``HELD_OUT`` records are not among them: they are the questions of the
    general-ability smoke task, which must measure facts the stream never edits.

    With ``num_subjects`` the world is generated anew at that size: long streams (10,000 edits
    and more) for stress tests, about subjects the shipped model was not trained on.
    """
    if num_subjects:
        log.warning("dataset.num_subjects=%d: a generated world whose facts the model does not "
                    "know; use it to stress the editors, not to measure them", num_subjects)
        generated = build_world(num_subjects, world_seed)
        records, skipped = parse_all(generated.records, parse_rome, skip_invalid)
        refs = References(generated.snippets, generated.vocab, np.asarray(generated.idf))
        return EditDataset(name=name, records=records, references=refs, skipped=skipped)
    world = Path(path).expanduser() / "world"
    if not (world / "records.json.gz").is_file():
        raise DataError(
            f"{world}/records.json.gz not found: dataset.path must be a bundle made by "
            "`rlsedit toy build` (the shipped one is ${rlsedit.asset:gpt2_tiny})"
        )
    raws = read_json_records(world / "records.json.gz")
    records, skipped = parse_all(raws[:-HELD_OUT] if len(raws) > HELD_OUT else raws, parse_rome,
                                 skip_invalid)
    refs = None
    if (world / "snippets.json.gz").is_file() and (world / "tfidf.json.gz").is_file():
        refs = References.load(world / "snippets.json.gz", world / "tfidf.json.gz")
    return EditDataset(name=name, records=records, references=refs, skipped=skipped)
