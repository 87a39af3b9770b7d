"""The loaded edit dataset every dataset config instantiates to."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.datasets.references import References
from rlsedit_cli.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class EditDataset:
    """Validated records, optional consistency references, and what was skipped."""

    name: str
    records: list[Record]
    references: References | None = None
    skipped: list[str] = field(default_factory=list)
    protocol: str = "probability"  # how edits are scored: CounterFact's (target_new vs
    # target_true probabilities) or "accuracy" (zsRE's token-level top-1 accuracy)

    def __post_init__(self) -> None:
        if not self.records:
            raise DataError(f"dataset {self.name} has no valid records: check dataset.path")
        ids = [r.case_id for r in self.records]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"dataset {self.name} repeats case_id={dup}: case ids must be unique")
        if self.skipped:
            first = self.skipped[0].split("; fix the record")[0]  # skip_invalid is on already
            log.warning("dataset %s: skipped %d invalid records (first: %s)", self.name,
                        len(self.skipped), first)
