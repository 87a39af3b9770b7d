"""MEMIT, applied sequentially: Delta = R K^T (n_anchor C + K K^T)^{-1} per layer and batch."""

from __future__ import annotations

import torch

from rlsedit_cli.editors.base import KeyValueEditor
from rlsedit_cli.ops.baselines import memit_delta


class MEMIT(KeyValueEditor):
    def __init__(self, handle, anchor=None, *, name: str = "memit", layers: list[int],
                 n_anchor: float, target: dict | None = None, seed: int = 0) -> None:
        super().__init__(handle, layers, target, seed, name)
        self.n_anchor = float(n_anchor)
        self.C = anchor.moments(self.layers)

    def update_layer(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> dict[str, float]:
        delta = memit_delta(self.C[layer], K, R, self.n_anchor)  # (d_out, d_in) float64
        self.master.add(layer, delta)
        return {f"layer{layer}/update_norm": float(delta.norm())}
