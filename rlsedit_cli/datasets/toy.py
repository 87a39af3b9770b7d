"""The toy fact world's records, read from a bundle built by `rlsedit toy build`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rlsedit_cli.config import DatasetConfig
from rlsedit_cli.datasets.base import EditDataset
from rlsedit_cli.datasets.records import parse_all, parse_rome, read_json_records
from rlsedit_cli.errors import DataError
from rlsedit_cli.eval.counterfact import References

log = logging.getLogger(__name__)


@dataclass
class ToyConfig(DatasetConfig):
    _target_: str = "rlsedit_cli.datasets.toy.load"
    name: str = "toy"


def load(path: str, name: str = "toy", skip_invalid: bool = False) -> EditDataset:
    """Records, snippets and tf-idf statistics of the bundle at ``path``."""
    world = Path(path).expanduser() / "world"
    if not (world / "records.json.gz").is_file():
        raise DataError(
            f"{world}/records.json.gz not found: dataset.path must be a bundle made by "
            "`rlsedit toy build` (the shipped one is ${rlsedit.asset:gpt2_tiny})"
        )
    records, skipped = parse_all(read_json_records(world / "records.json.gz"), parse_rome,
                                 skip_invalid)
    refs = None
    if (world / "snippets.json.gz").is_file() and (world / "tfidf.json.gz").is_file():
        refs = References.load(world / "snippets.json.gz", world / "tfidf.json.gz")
    return EditDataset(name=name, records=records, references=refs, skipped=skipped)
