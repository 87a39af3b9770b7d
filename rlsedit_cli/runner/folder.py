"""The run folder: resolved config, log, metrics.jsonl, retention.csv and summary.json.

Whole-file outputs are written to a temporary name and renamed into place, so a killed run never
leaves a half-written file; line files are appended and flushed line by line.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlsedit_cli.files import replaced_atomically


def _clean(obj):
    """JSON-safe: NaN/inf become None (absent), tuples become lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    with replaced_atomically(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class RunFolder:
    """One run's output folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    LINE_FILES = ("metrics.jsonl", "retention.csv", "general.csv")  # appended batch by batch
    OUTPUTS = (*LINE_FILES, "summary.json")

    def reset(self) -> None:
        """Start fresh: remove the outputs of an earlier run in the same folder."""
        for name in self.OUTPUTS:
            (self.path / name).unlink(missing_ok=True)

    def write_config(self, cfg: DictConfig) -> None:
        write_atomic(self.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    def append_jsonl(self, name: str, row: dict) -> None:
        with open(self.path / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(row)) + "\n")

    def append_csv(self, name: str, row: dict) -> None:
        path = self.path / name
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(_clean(row))

    def write_json(self, name: str, obj: dict) -> None:
        write_atomic(self.path / name, json.dumps(_clean(obj), indent=2) + "\n")

    @contextlib.contextmanager
    def log_file(self, name: str = "run.log") -> Iterator[None]:
        """Send this process's log records to the run folder while the block runs."""
        handler = logging.FileHandler(self.path / name, encoding="utf-8")
        handler.setFormatter(
            logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        try:
            yield
        finally:
            root.removeHandler(handler)
            handler.close()
