"""`rlsedit bench update`: time one batch update of RLSEdit, AlphaEdit and MEMIT over a history.

Synthetic keys and values of the given sizes; the rules are the ones the editors call
(:mod:`rlsedit_cli.ops`). For each editor: median milliseconds per batch, the slope of the time
against the batch index (with its standard error: a flat cost has a slope within noise), and for
RLSEdit the achieved GFLOP/s of ``rls_step`` and its share of the machine's GEMM rate (each step
timed between two reference GEMMs of the run's dtype, :mod:`rlsedit_cli.bench.gemm`).
"""

from __future__ import annotations

import statistics
from functools import partial

import numpy as np
import torch

from rlsedit_cli.bench.gemm import share_of_gemm, timed
from rlsedit_cli.ops.baselines import alphaedit_delta, memit_delta, nullspace_projector
from rlsedit_cli.ops.rls import rls_init, rls_step


def rls_step_flops(d_in: int, d_out: int, u: int) -> float:
    """Floating-point operations of one rls_step (multiply-adds count 2)."""
    return (2 * d_in * d_in * u  # F = P K
            + 2 * d_in * u * u  # S = K^T F
            + u**3 / 3  # Cholesky of S
            + 2 * d_in * u * u  # two triangular solves
            + 2 * d_in * d_in * u  # P - G G^T
            + 2 * 2 * d_out * d_in * u)  # W K and (V - W K) gain


def _alphaedit_batch(Pi, past, W, K, V):
    """AlphaEdit's update of W by one batch, and its accumulated keys after it."""
    return W + alphaedit_delta(Pi, past, K, V - W @ K, l2=10.0), past + K @ K.T


def _memit_batch(C, W, K, V):
    """MEMIT's update of W by one batch (a fixed anchor covariance)."""
    return W + memit_delta(C, K, V - W @ K, n_anchor=1000.0)


def slope(times_ms: list[float]) -> tuple[float, float]:
    """Least-squares slope of time against batch index (ms per batch) and its standard error."""
    y = np.asarray(times_ms)
    x = np.arange(len(y), dtype=np.float64)
    if len(y) < 3:
        return 0.0, float("inf")
    A = np.vstack([x, np.ones_like(x)]).T
    coef, res, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    se = np.sqrt(resid @ resid / (len(y) - 2) / ((x - x.mean()) ** 2).sum())
    return float(coef[0]), float(se)


def bench_update(d_in: int, d_out: int, u: int, batches: int, device: str = "cpu",
                 dtype: str = "float32",
                 editors: tuple[str, ...] = ("rlsedit", "alphaedit", "memit"), seed: int = 0,
                 ) -> list[dict]:
    """Time ``batches`` consecutive updates per editor; one result dict per editor."""
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(d_in, 2 * d_in, generator=g, dtype=dt) / (2 * d_in) ** 0.5
    X[-(d_in // 4):] *= 0.05  # a quarter of the directions rarely used: AlphaEdit's null space
    C = (X @ X.T).to(dev)  # (d_in, d_in), a full-rank anchor moment
    W0 = torch.randn(d_out, d_in, generator=g, dtype=dt).to(dev) * 0.02
    stream = [(torch.randn(d_in, u, generator=g, dtype=dt).to(dev),
               torch.randn(d_out, u, generator=g, dtype=dt).to(dev)) for _ in range(batches)]
    results = []
    for editor in editors:
        times, shares, rates = [], [], []
        if editor == "rlsedit":
            P, W = rls_init(C, 1.0, 1.0, 1000.0, dt), W0.clone()
            measure = share_of_gemm(dev, dt)  # each step between two reference GEMMs
            flops = rls_step_flops(d_in, d_out, u)
            for K, V in stream:
                (P, W), seconds, rate, share = measure(partial(rls_step, P, W, K, V, inplace=True),
                                                       flops)  # as the editor calls it
                times.append(seconds * 1e3)
                rates.append(rate)
                shares.append(share)
        elif editor == "alphaedit":
            Pi = nullspace_projector(C, threshold=2e-2)
            past = torch.zeros_like(C)
            W = W0.clone()
            for K, V in stream:
                seconds, (W, past) = timed(partial(_alphaedit_batch, Pi, past, W, K, V), dev)
                times.append(seconds * 1e3)
        elif editor == "memit":
            W = W0.clone()
            for K, V in stream:
                seconds, W = timed(partial(_memit_batch, C, W, K, V), dev)
                times.append(seconds * 1e3)
        else:
            raise ValueError(f"unknown editor {editor!r}: use rlsedit, alphaedit or memit")
        med = statistics.median(times)
        s, se = slope(times)
        row = {"bench": "update", "editor": editor, "device": str(dev), "dtype": dtype,
               "d_in": d_in, "d_out": d_out, "u": u, "batches": batches,
               "median_ms": round(med, 3), "slope_ms_per_batch": round(s, 4),
               "slope_se": round(se, 4), "first_ms": round(times[0], 3),
               "last_ms": round(times[-1], 3)}
        K, V = stream[-1]  # how well the last batch is written: 1.0 would be not at all
        row["last_batch_residual"] = round(float((W @ K - V).norm() / (W0 @ K - V).norm()), 6)
        if editor == "rlsedit":
            row["gflops"] = round(flops / (med / 1e3) / 1e9, 2)
            row["gemm_gflops"] = round(statistics.median(rates), 2)  # the run's dtype
            row["share_of_gemm"] = round(statistics.median(shares), 3)
        results.append(row)
    return results
