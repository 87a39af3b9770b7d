"""The unedited model's figures, measured once and reused: every run on the same model, records
and measurement settings (the editors of a sweep, a benchmark's configurations) reads the
figures before editing, and general ability at 0 edits, from ``paths.cache``/unedited/.

The key holds everything the figures depend on: a fingerprint of all the model's weights, the
records (every field), their reference texts, the measurement settings that shape the figures,
the seed and the scoring protocol; anything else measures again. The measurement is
deterministic, so a cached figure is the figure the run would measure (tests hold the two equal).
A cache that cannot be written costs the reuse, never the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.datasets.references import References
from rlsedit_cli.files import replaced_atomically
from rlsedit_cli.stats.anchor import parameters_digest

log = logging.getLogger(__name__)
NOT_IN_KEY = ("pre_edit", "retention_edits", "retention_every", "reuse_unedited",
              "objective_terms", "collapse_factor")
# the eval settings that say when and how strictly general ability is measured, not what it
# measures: runs that differ only there (a sweep at 1,000 edits, a stream measured every 500)
# share the unedited model's general-ability point
EVAL_NOT_IN_KEY = ("name", "every_edits", "strict", "logits", "kept_states_mb")  # same figures
# how eval/lm.py runs its passes: bfloat16 figures move with the batches' composition and with
# what runs in bfloat16, so a point cached under another way is not what this code would measure
GENERAL_PASSES = "like-length, whole-bfloat16"


class UneditedFigures:
    """Figures of the unedited model by kind ("pre", "general"), cached under ``root``."""

    def __init__(self, root: str | Path | None, model: torch.nn.Module, measure: dict,
                 seed: int, protocol: str, weights: str | None = None) -> None:
        """``weights``: the unedited model's parameter checksum when the caller has it (the
        run's identity); else taken from ``model`` when first needed."""
        self.root = None if root is None else Path(root).expanduser() / "unedited"
        self.model, self.seed, self.protocol = model, seed, protocol
        self.settings = {k: v for k, v in measure.items() if k not in NOT_IN_KEY}
        self._weights = weights
        self.used: dict[str, str] = {}  # kind -> cache file the figures were read from

    def _path(self, kind: str, records: list[Record], refs: References | None,
              extra: dict | None) -> Path:
        if self._weights is None:
            self._weights = parameters_digest(self.model.named_parameters())
        key = {"kind": kind, "texts": "topk-draw", "weights": self._weights,
               "settings": self.settings,
               "seed": self.seed, "protocol": self.protocol, "extra": extra or {},
               "records": [dataclasses.asdict(r) for r in records],
               "references": None if refs is None else [refs.texts(r) for r in records],
               "idf": None if refs is None else [len(refs.vocab), float(refs.idf.sum())]}
        # how our scoring measured it (lm-eval scores general ability, through eval/lm.py)
        key["scoring"] = "prompt-once" if kind != "general" else GENERAL_PASSES
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
        return self.root / f"{kind}-{digest.hexdigest()[:24]}.json"

    def get(self, kind: str, records: list[Record], refs: References | None = None,
            extra: dict | None = None) -> dict | None:
        """The cached figures, or None (no cache, nothing cached, or unreadable)."""
        if self.root is None:
            return None
        path = self._path(kind, records, refs, extra)
        try:
            figures = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        self.used[kind] = str(path)
        log.info("the unedited model's %s figures read from %s (measured by an earlier run on the "
                 "same model, records and settings; measure.reuse_unedited=false measures again)",
                 kind, path)
        return figures

    def put(self, kind: str, records: list[Record], figures: dict,
            refs: References | None = None, extra: dict | None = None) -> None:
        """Cache ``figures``; a cache that cannot be written is only logged."""
        if self.root is None:
            return
        path = self._path(kind, records, refs, extra)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with replaced_atomically(path) as tmp:
                tmp.write_text(json.dumps(figures), encoding="utf-8")
        except OSError as err:
            log.warning("the unedited model's figures were not cached (%s: %s): set paths.cache "
                        "to a writable folder to reuse them", path.parent, err.strerror or err)
