"""The run folder: resolved config, log, metrics.jsonl, retention.csv and summary.json.

Whole-file outputs are written to a temporary name and renamed into place, so a killed run never
leaves a half-written file; line files are appended and flushed line by line.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from rlsedit_cli.errors import RlseditError, first_line
from rlsedit_cli.files import replaced_atomically
from rlsedit_cli.runner import plan

log = logging.getLogger(__name__)


def _clean(obj):
    """JSON-safe: NaN/inf become None (absent), tuples become lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@contextlib.contextmanager
def disk_errors(folder: Path, what: str) -> Iterator[None]:
    """A failed write of ``what`` into ``folder`` as one line that says how to fix it.

    A full disk reaches Python as OSError(ENOSPC) from open/write, but as RuntimeError from
    torch.save's C++ writer: the free space decides which it was.
    """
    try:
        yield
    except (OSError, RuntimeError) as e:
        full = getattr(e, "errno", None) == errno.ENOSPC or _nearly_full(folder)
        if isinstance(e, RuntimeError) and not full:  # not a write failure: not ours to word
            raise
        raise RlseditError(
            f"cannot write {what} in {folder} ({'disk full' if full else first_line(e)[:120]}): "
            "free space there, or make it writable, or set paths.output_dir to another folder"
        ) from e


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 4 * 2**20
    except OSError:
        return False


class QuietFileHandler(logging.FileHandler):
    """run.log: when the disk is full (or the file gone) the records still reach the console,
    without a logging traceback per record."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        del record


def _csv_columns(path: Path) -> list[str] | None:
    """The header of a CSV file (None: no file yet, or an empty one)."""
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), None)


def _csv_text(columns: list[str], lines: list[dict]) -> str:
    """A CSV file's text: the header, then the lines (missing values empty)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(lines)
    return out.getvalue()


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
        self.marker = plan.read_marker(self.path)

    LINE_FILES = ("metrics.jsonl", "retention.csv", "general.csv")  # appended batch by batch

    def begin(self) -> None:
        """Mark the folder as this run's before any output (a resumed run keeps its marker; a
        run of an older version without one gets one). Hydra's record of a new run's command,
        written just before, is the run's own."""
        if self.marker is None:
            with disk_errors(self.path, plan.MARKER):
                self.marker = plan.start(self.path, plan._files_under(self.path, (plan.HYDRA,)))

    def claim(self, name: str) -> None:
        """List ``name`` (relative to the folder) in the marker before it is written."""
        if self.marker is None:
            self.begin()
        if name in self.marker["files"]:
            return
        self.marker["files"].append(name)
        with disk_errors(self.path, plan.MARKER):
            plan.write_marker(self.path, self.marker)

    def write_config(self, cfg: DictConfig) -> None:
        self.claim("config.yaml")
        with disk_errors(self.path, "config.yaml"):
            write_atomic(self.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    def append_jsonl(self, name: str, row: dict) -> None:
        self.claim(name)
        with disk_errors(self.path, name), open(self.path / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(row)) + "\n")

    def append_csv(self, name: str, row: dict) -> None:
        """One line more; a column the file lacks (a run resumed by a later version that
        writes more) is added to its header first, the earlier lines left empty there."""
        path = self.path / name
        self.claim(name)
        with disk_errors(self.path, name):
            columns = _csv_columns(path)
            if columns is not None and any(k not in columns for k in row):
                with open(path, newline="", encoding="utf-8") as f:
                    lines = list(csv.DictReader(f))
                columns += [k for k in row if k not in columns]
                write_atomic(path, _csv_text(columns, lines))
            with open(path, "a", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=columns or list(row), restval="")
                if columns is None:
                    writer.writeheader()
                writer.writerow(_clean(row))

    def log_resume(self, overrides: list[str]) -> None:
        """Add this resume's command line to .hydra/resumes.yaml (the first command's
        .hydra/overrides.yaml stays as it was)."""
        path = self.path / ".hydra" / "resumes.yaml"
        self.claim(".hydra/resumes.yaml")
        with disk_errors(self.path, ".hydra/resumes.yaml"):
            path.parent.mkdir(exist_ok=True)
            earlier = path.read_text(encoding="utf-8") if path.is_file() else ""
            entry = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "overrides": list(overrides)}
            write_atomic(path, earlier + yaml.safe_dump([entry], sort_keys=False))

    def write_json(self, name: str, obj: dict | list) -> None:
        self.claim(name)
        with disk_errors(self.path, name):
            write_atomic(self.path / name, json.dumps(_clean(obj), indent=2) + "\n")

    @contextlib.contextmanager
    def log_file(self, name: str = "run.log") -> Iterator[None]:
        """Send this process's log records to the run folder while the block runs."""
        self.claim(name)
        with disk_errors(self.path, name):
            handler = QuietFileHandler(self.path / name, encoding="utf-8")
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
