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

from rlsedit_cli.errors import ConfigError, RlseditError, first_line
from rlsedit_cli.files import replaced_atomically

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


RUN_MARKS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt")  # a run was here


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds (part of) an earlier run's outputs."""
    return any((path / name).exists() for name in RUN_MARKS)


def check_target(path: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder before anything is written into it.

    A new run refuses a folder that holds another run (``overwrite=true`` replaces it); a
    resumed run needs a folder with a checkpoint, and says why there is none.
    """
    path = Path(path).expanduser()
    if resume:
        if not path.is_dir():
            raise ConfigError(f"resume={path}: no such run folder; give the folder of a run "
                              "made with checkpoint.every > 0")
        if (path / "summary.json").is_file():
            raise ConfigError(f"resume={path}: that run finished (its summary.json is written); "
                              "there is nothing to resume and it stays as it is: start a new "
                              "run to measure again")
        if (path / "checkpoint.pt").is_file():
            return
        if not holds_run(path):
            raise ConfigError(f"resume={path} is not a run folder (none of "
                              f"{', '.join(RUN_MARKS)}): give the folder a run wrote")
        raise ConfigError(f"resume={path}: no batch had been checkpointed yet (the run stopped "
                          "before its first checkpoint, or ran with checkpoint.every=0): start "
                          "it again")
    if holds_run(path) and not overwrite:
        raise ConfigError(f"{path} holds an earlier run: choose another folder, continue it with "
                          f"resume={path}, or add overwrite=true to replace it")


def continues(folder: Path, resume_jobs: bool) -> str | None:
    """How a job goes on from its own earlier attempt in ``folder``: "resume" (the attempt left
    a checkpoint), "keep" (it finished; with ``resume_jobs`` only) or None (start afresh; an
    attempt stopped before its first checkpoint is removed first).

    Only for a requeued submitit job (Slurm, or local processes) or with ``resume_jobs``: a
    job's folder is its own (the sweep's folder and the job's overrides), so what is there is
    this job's; a resumed or kept run is still checked against this job's settings.
    """
    if not (os.environ.get("SUBMITIT_EXECUTOR") or resume_jobs) or not holds_run(folder):
        return None
    if (folder / "summary.json").is_file():
        return "keep" if resume_jobs else None
    if (folder / "checkpoint.pt").is_file():
        return "resume"
    log.warning("the earlier attempt in %s stopped before its first checkpoint: starting over",
                folder)
    RunFolder(folder).clear()
    return None


class RunFolder:
    """One run's output folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    LINE_FILES = ("metrics.jsonl", "retention.csv", "general.csv")  # appended batch by batch

    def clear(self) -> None:
        """Remove everything an earlier run left here (Hydra's .hydra/ of this run stays)."""
        for entry in self.path.iterdir():
            if entry.name == ".hydra":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def write_config(self, cfg: DictConfig) -> None:
        with disk_errors(self.path, "config.yaml"):
            write_atomic(self.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    def append_jsonl(self, name: str, row: dict) -> None:
        with disk_errors(self.path, name), open(self.path / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(row)) + "\n")

    def append_csv(self, name: str, row: dict) -> None:
        """One line more; a column the file lacks (a run resumed by a later version that
        writes more) is added to its header first, the earlier lines left empty there."""
        path = self.path / name
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
        with disk_errors(self.path, ".hydra/resumes.yaml"):
            path.parent.mkdir(exist_ok=True)
            earlier = path.read_text(encoding="utf-8") if path.is_file() else ""
            entry = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "overrides": list(overrides)}
            write_atomic(path, earlier + yaml.safe_dump([entry], sort_keys=False))

    def write_json(self, name: str, obj: dict) -> None:
        with disk_errors(self.path, name):
            write_atomic(self.path / name, json.dumps(_clean(obj), indent=2) + "\n")

    @contextlib.contextmanager
    def log_file(self, name: str = "run.log") -> Iterator[None]:
        """Send this process's log records to the run folder while the block runs."""
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
