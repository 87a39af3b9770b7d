"""tqdm progress bars that stay readable in log files (batch jobs, CI) as on terminals, and a
clock that splits a batch's edit into phases."""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on a terminal; off one (CI logs, Slurm, nohup, a pipe) plain log lines."""
    if not sys.stderr.isatty():
        return PlainLines(iterable, **kwargs)
    return tqdm(iterable, **kwargs)


class _Discard:
    """Where a PlainLines bar's own drawing goes."""

    def write(self, text: str) -> None:
        del text

    def flush(self) -> None:
        pass


class PlainLines(tqdm):
    """tqdm's counting and rates without its carriage-return redraws: a log line when the phase
    (description) changes, at most every 30 s while it runs, and at the end; nothing for a
    short inner bar (``leave=False``) that ends within its first 30 s."""

    def __init__(self, iterable=None, **kwargs) -> None:
        kwargs.setdefault("mininterval", 30.0)
        kwargs["file"] = _Discard()
        super().__init__(iterable, **kwargs)

    def display(self, msg=None, pos=None) -> bool:
        del pos
        shown = (self.desc, self.n)
        if msg == "" or self.n == 0 or shown == getattr(self, "_shown", None):
            return True  # a bar being cleared, one that has not moved, a line said already
        self._shown = shown
        d = self.format_dict
        elapsed = d["elapsed"]
        rate = d["rate"] or ((self.n - self.initial) / elapsed if elapsed > 0 else None)
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        parts = [f"{self.desc.removesuffix(': ') or 'progress'}: {done} {self.unit}",
                 f"{self.format_interval(elapsed)} elapsed"]
        if rate:
            parts.append(f"{1 / rate:.2f} s/{self.unit}" if rate < 1 else
                         f"{rate:.1f} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"about {self.format_interval((self.total - self.n) / rate)} left")
        log.info("%s", ", ".join(parts))
        return True


def resumed(bar: tqdm, n: int) -> None:
    """``bar`` starts at ``n`` steps done before (a resumed run's): shown as done, left out of
    its rate and time left."""
    bar.n = bar.last_print_n = bar.initial = n


def quiet_library_bars() -> None:
    """Off a terminal, the libraries' own bars (transformers' weight loading, datasets) are
    carriage-return fragments in a log: off."""
    if sys.stderr.isatty():
        return
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


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
