"""Small helpers shared across the package: files written atomically, overrides, nested dicts
(no torch, no config)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def replaced_atomically(dest: str | Path) -> Iterator[Path]:
    """A temporary path beside ``dest`` to write; on success it replaces ``dest`` in one rename.

    The name is unique (several processes may write the same ``dest``); on any failure the
    temporary file is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def folder_replaced_atomically(dest: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``dest`` to fill; on success it becomes ``dest`` in one rename.

    An older ``dest`` (say, an incomplete one from a killed process) is removed just before the
    rename; on any failure the temporary folder is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_override(override: str) -> tuple[str, str]:
    """``key=value`` of a Hydra command-line override (``+``/``~`` prefixes dropped)."""
    key, _, value = override.lstrip("+~").partition("=")
    return key, value


def flatten(tree: dict, sep: str = ".") -> dict:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``: nested dicts become one level of joined keys."""
    out = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out |= {f"{key}{sep}{k}": v for k, v in flatten(value, sep).items()}
        else:
            out[str(key)] = value
    return out
