"""What a run folder is, decided in one place: a new run, a resumed one, a sweep job's earlier
attempt kept, resumed or restarted, or refused; and whether a sweep folder may be used.

A run claims its folder before it writes anything there:

- a lock (``.rlsedit.lock``, a POSIX record lock held while the process lives): a second run
  started into the same folder, or a resume of a run still going, is refused in one line;
- a marker (``.rlsedit-run.json``) with the run's identity and every file the run writes there,
  each listed before it is written.

The tool removes or replaces only files its marker lists: ``overwrite=true`` removes the earlier
run's own files and leaves every other file of the folder where it was; a folder that holds
files named like a run's outputs which no marker lists is refused, with or without
``overwrite``. Nothing else in the package deletes run outputs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rlsedit_cli.errors import ConfigError
from rlsedit_cli.files import replaced_atomically

log = logging.getLogger(__name__)

MARKER = ".rlsedit-run.json"
LOCK = ".rlsedit.lock"
# the names a run writes into its folder (files, or folders of files)
OUTPUTS = ("config.yaml", "run.log", "metrics.jsonl", "retention.csv", "general.csv",
           "summary.json", "checkpoint.pt", "final_maps.safetensors", "error.txt", "plots",
           "documents", "context_templates.json")
RUN_MARKS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt")  # a run was here
HYDRA = ".hydra"  # Hydra's record of the command; written after the CLI's check, before run()


def read_marker(folder: Path) -> dict | None:
    """The folder's run marker, or None (no marker, or a file that is not one)."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "rlsedit":
        return None
    return data


def _files_under(folder: Path, names: tuple[str, ...]) -> list[str]:
    """Relative paths of the files at or under ``names`` in ``folder``."""
    found = []
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            found += sorted(str(p.relative_to(folder)) for p in path.rglob("*")
                            if not p.is_dir() or p.is_symlink())
        elif path.exists() or path.is_symlink():
            found.append(name)
    return found


def foreign_outputs(folder: Path, names: tuple[str, ...] = OUTPUTS) -> list[str]:
    """Files named like a run's outputs that no marker of this folder lists."""
    marker = read_marker(folder) or {}
    own = set(marker.get("files", []))
    return [f for f in _files_under(folder, names) if f not in own]


def own_files(folder: Path) -> list[str]:
    """The files the folder's marker lists that exist."""
    marker = read_marker(folder) or {}
    return [f for f in marker.get("files", []) if (folder / f.rstrip("/")).exists()
            or (folder / f.rstrip("/")).is_symlink()]


class FolderLock:
    """The lock a run holds on its folder while its process lives.

    POSIX record locks belong to the process: the CLI takes it before Hydra writes anything,
    :func:`rlsedit_cli.runner.run.run` takes it again in the same process; another process is
    refused.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise ConfigError(f"{self.folder} is in use by another rlsedit run (a process holds "
                              f"its {LOCK}): wait for it to end, or choose another "
                              "folder") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class Plan:
    """What happens to a folder: ``kind`` is "new", "resume" (from its checkpoint), "keep" (a
    finished sweep job, reported again) or "restart" (a job's attempt that stopped before its
    first checkpoint); ``remove``: the earlier run's own files that are replaced."""

    folder: Path
    kind: str
    remove: list[str] = field(default_factory=list)

    def carry_out(self) -> None:
        """Remove the listed files (only those), then the marker and folders left empty."""
        if not self.remove:
            return
        log.warning("%s: removing the earlier run's %d files in %s (other files there stay)",
                    "starting over" if self.kind == "restart" else "overwrite=true",
                    len(self.remove), self.folder)
        for name in self.remove:
            path = self.folder / name.rstrip("/")
            if name.endswith("/") and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # a folder the run created (its tracker's files)
            else:
                path.unlink(missing_ok=True)
        for name in sorted({str(Path(n).parent) for n in self.remove} - {"."}, reverse=True):
            with contextlib.suppress(OSError):  # not empty: it holds files of someone else
                (self.folder / name).rmdir()
        (self.folder / MARKER).unlink(missing_ok=True)


def plan(folder: str | Path, resume: bool, overwrite: bool, before_hydra: bool = False,
         resume_jobs: bool = False) -> Plan:
    """Decide what ``folder`` is for this run, or refuse it in one line (nothing changed).

    Args:
        before_hydra: checked before Hydra writes its ``.hydra/`` record (the CLI): a foreign
            ``.hydra/`` is refused too.
        resume_jobs: a sweep run again (``resume_jobs=true``): its job finds its own earlier
            attempt (see :func:`_plan_again`).
    """
    folder = Path(folder).expanduser()
    if resume:
        return _plan_resume(folder)
    if (again := _plan_again(folder, resume_jobs)) is not None:
        return again
    names = OUTPUTS + ((HYDRA,) if before_hydra else ())
    foreign = foreign_outputs(folder, names) if folder.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise ConfigError(f"{folder} holds files that no rlsedit run marker lists ({shown}): "
                          "the tool will not write over them; choose another folder (hydra."
                          "run.dir=... or paths.output_dir=...)")
    own = set(own_files(folder)) if folder.is_dir() else set()
    if not own & set(RUN_MARKS):  # none, or a start that failed before writing its config
        return Plan(folder, "new")
    if not overwrite:
        raise ConfigError(f"{folder} holds an earlier run: choose another folder, continue it "
                          f"with resume={folder}, or add overwrite=true to replace it (only "
                          "that run's own files are removed)")
    # after the CLI's check, Hydra has written its record of this command: it stays
    return Plan(folder, "new", [f for f in own_files(folder)
                                if before_hydra or not f.startswith(f"{HYDRA}/")])


def _plan_again(folder: Path, resume_jobs: bool) -> Plan | None:
    """How a sweep job goes on from its own earlier attempt in ``folder``: kept (it finished;
    with ``resume_jobs`` only), resumed (it left a checkpoint) or restarted (it stopped before
    its first checkpoint: its own files are replaced); None: no earlier attempt.

    Only for a requeued submitit job (Slurm, or local processes) or with ``resume_jobs``: a
    job's folder is its own (the sweep's folder and the job's overrides), so what is there is
    this job's; a resumed or kept run is still checked against this job's settings.
    """
    if not (os.environ.get("SUBMITIT_EXECUTOR") or resume_jobs) or not folder.is_dir():
        return None
    if (folder / "summary.json").is_file():
        return Plan(folder, "keep") if resume_jobs else None
    if (folder / "checkpoint.pt").is_file():
        return Plan(folder, "resume")
    if own := own_files(folder):
        log.warning("the earlier attempt in %s stopped before its first checkpoint: starting "
                    "over", folder)
        return Plan(folder, "restart", [f for f in own if not f.startswith(f"{HYDRA}/")])
    return None


def sweep_folder(folder: str | Path | None, resume_jobs: bool) -> None:
    """Refuse a sweep folder that holds an earlier sweep, unless ``resume_jobs`` continues it."""
    if folder and (Path(folder).expanduser() / "multirun.yaml").exists() and not resume_jobs:
        raise ConfigError(f"hydra.sweep.dir={folder} holds an earlier sweep: continue it with "
                          "resume_jobs=true, or choose another folder")


def _plan_resume(folder: Path) -> Plan:
    if not folder.is_dir():
        raise ConfigError(f"resume={folder}: no such run folder; give the folder of a run made "
                          "with checkpoint.every > 0")
    if (folder / "summary.json").is_file():
        raise ConfigError(f"resume={folder}: that run finished (its summary.json is written); "
                          "there is nothing to resume and it stays as it is: start a new run "
                          "to measure again")
    if (folder / "checkpoint.pt").is_file():
        return Plan(folder, "resume")
    if read_marker(folder) is not None or _files_under(folder, OUTPUTS):
        raise ConfigError(f"resume={folder}: no batch had been checkpointed yet (the run stopped "
                          "before its first checkpoint, or ran with checkpoint.every=0): start "
                          f"it again (hydra.run.dir={folder} overwrite=true replaces it)")
    raise ConfigError(f"resume={folder} is not a run folder (no {MARKER}, run.log or "
                      "checkpoint.pt): give the folder a run wrote")


def start(folder: Path, claimed: list[str]) -> dict:
    """Write a new run's marker (before any output), listing ``claimed`` files already there
    that this run made (Hydra's record of its command)."""
    marker = {"tool": "rlsedit", "run_id": uuid.uuid4().hex,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(),
              "files": sorted(claimed)}
    write_marker(folder, marker)
    return marker


def write_marker(folder: Path, marker: dict) -> None:
    with replaced_atomically(folder / MARKER) as tmp:
        tmp.write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def claim(folder: str | Path, resume: bool, overwrite: bool, before_hydra: bool = False,
          resume_jobs: bool = False) -> tuple[FolderLock, Plan]:
    """Lock ``folder``, decide what it is (:func:`plan`) and carry the plan out (``overwrite``:
    the earlier run's own files removed); the caller holds the returned lock while the run
    lives. A refused folder is left as it was (a folder or lock file made for the check is
    removed)."""
    folder = Path(folder).expanduser()
    if resume and not folder.is_dir():
        _plan_resume(folder)  # refuses
    made_folder, made_lock = not folder.exists(), not (folder / LOCK).exists()
    lock = FolderLock(folder).acquire()
    try:
        decided = plan(folder, resume, overwrite, before_hydra, resume_jobs)
        decided.carry_out()
    except BaseException:
        lock.release()
        if made_lock:
            (folder / LOCK).unlink(missing_ok=True)
        if made_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return lock, decided
