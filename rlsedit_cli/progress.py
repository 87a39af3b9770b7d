"""tqdm progress bars that stay readable in log files (batch jobs, CI) as on terminals, and a
clock that splits a batch's edit into phases."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar; off a terminal it redraws at most every 30 s instead of 10 times a second."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(iterable, **kwargs)


class PhaseClock:
    """Wall-clock seconds per named phase; waits for the device's queued work at each phase's
    end, so that GPU time lands in the phase that queued it."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.totals: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[phase] += time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        """``{"seconds_<phase>": seconds}`` for every phase timed so far."""
        return {f"seconds_{phase}": round(total, 4) for phase, total in self.totals.items()}
