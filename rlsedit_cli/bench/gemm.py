"""Timing for the benches (:func:`timed`, CUDA work waited for) and the machine's reference
rate: a large dense matrix product, timed beside what a bench measures so that both see the same
moment of a machine whose speed drifts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
GEMM_N = 2048  # the reference product is GEMM_N x GEMM_N times GEMM_N x GEMM_N


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Seconds ``fn()`` takes on ``device`` (CUDA work waited for), and what it returned."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def gemm_timer(device: torch.device, dtype: torch.dtype = torch.float32) -> Callable[[], float]:
    """A function giving the rate (GFLOP/s) of one GEMM_N^3 product on ``device``, warmed up."""
    a = torch.randn(GEMM_N, GEMM_N, device=device, dtype=dtype)
    b = torch.randn(GEMM_N, GEMM_N, device=device, dtype=dtype)
    a @ b
    return lambda: 2 * GEMM_N**3 / timed(lambda: a @ b, device)[0] / 1e9


def share_of_gemm(device: torch.device, dtype: torch.dtype = torch.float32
                  ) -> Callable[[Callable[[], T], float], tuple[T, float, float, float]]:
    """A function ``measure(fn, flops)`` that runs ``fn`` once between two reference GEMMs and
    gives (what ``fn`` returned, its seconds, the GEMM's GFLOP/s around it, the share of that
    rate ``fn``'s ``flops`` reached)."""
    gemm = gemm_timer(device, dtype)

    def measure(fn: Callable[[], T], flops: float) -> tuple[T, float, float, float]:
        before = gemm()
        seconds, out = timed(fn, device)
        rate = (before + gemm()) / 2
        return out, seconds, rate, flops / seconds / 1e9 / rate

    return measure
