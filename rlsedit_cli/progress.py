"""tqdm progress bars that stay readable in log files (batch jobs, CI) as on terminals."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar; off a terminal it redraws at most every 30 s instead of 10 times a second."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(iterable, **kwargs)
