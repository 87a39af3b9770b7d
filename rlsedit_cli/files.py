"""Small file helpers shared across the package (no torch, no config)."""

from __future__ import annotations

import contextlib
import hashlib
import os
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


def parse_override(override: str) -> tuple[str, str]:
    """``key=value`` of a Hydra command-line override (``+``/``~`` prefixes dropped)."""
    key, _, value = override.lstrip("+~").partition("=")
    return key, value
