"""Attention: short queries as two batched matrix products (``grouped_attention``), and grouped
key/value heads handed to torch as they are (``gqa_passthrough``); both serve the CPU.

:func:`grouped_attention` is a pure tensor function.

torch's CPU attention kernel (flash attention for the CPU) works in blocks sized for long
sequences; on the target step's queries (a few suffix tokens against a prefix of a few dozen,
docs/benchmarks.md section 2) its forward and backward cost more than the products themselves. Here
the query heads of each key/value head group (GQA: SmolLM2, Llama 3, Qwen 2.5) are stacked so
that each group is one product with its keys and one with its values, no head repeated.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextmanager
def grouped_kv_attention(handle) -> Iterator[None]:
    """Where ``gqa_passthrough`` runs (the CPU), transformers' SDPA attention hands grouped
    key/value heads (GQA: SmolLM2, Llama 3, Qwen 2.5) to torch as they are (``enable_gqa``)
    where, given a padding mask, it would repeat them for every query head first: the same
    numbers (tests), a SmolLM2 target step about 11% faster (docs/benchmarks.md section 4).
    transformers reads the switch, the environment variable FORCE_GQA, at every call; a value the
    user set is left alone.
    """
    if not handle.accel.on("gqa_passthrough", handle.device) or FORCE_GQA in os.environ:
        yield
        return
    os.environ[FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(FORCE_GQA, None)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for grouped key/value heads.

    Args:
        q: (N, Hq, S, d) queries; Hq a multiple of Hkv, query head h reads key/value head
            h // (Hq / Hkv), as ``scaled_dot_product_attention(..., enable_gqa=True)`` does.
        k, v: (N, Hkv, T, d).
        mask: (N or 1, 1, S, T), bool (True: attended) or additive float; None: every key.
        scale: of the scores; None: d ** -0.5.

    Returns:
        (N, Hq, S, d). A query that may attend to no key gets the mean of the values (its
        scores all at the dtype's least value), not NaN: such queries are padding, and a NaN
        would reach the gradients of the real ones through the products' backward.
    """
    n, hq, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g = hq // hkv
    scores = torch.matmul(q.reshape(n, hkv, g * s, d), k.transpose(-1, -2))  # (N, Hkv, gS, T)
    scores = scores.view(n, hkv, g, s, t) * (d ** -0.5 if scale is None else scale)
    if mask is not None:
        m = mask[:, :, None]  # (N, 1, 1, S, T)
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
        else:
            scores = scores + m
    weights = scores.softmax(-1).view(n, hkv, g * s, t)
    return torch.matmul(weights, v).view(n, hq, s, d)
