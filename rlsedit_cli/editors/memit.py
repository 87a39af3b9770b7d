"""MEMIT, applied sequentially: Delta = R K^T (n_anchor C + K K^T)^{-1} per layer and batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import II

from rlsedit_cli.config import EditorConfig, TargetConfig
from rlsedit_cli.editing.pipeline import KeyValueEditor
from rlsedit_cli.errors import ConfigError
from rlsedit_cli.ops.baselines import memit_delta


@dataclass
class MEMITConfig(EditorConfig):
    _target_: str = "rlsedit_cli.editors.memit.MEMIT"
    name: str = "memit"
    layers: list[int] = II("model.edit_layers")
    n_anchor: float = 15000.0  # MEMIT's mom2_update_weight
    target: TargetConfig = field(default_factory=TargetConfig)
    seed: int = II("seed")


class MEMIT(KeyValueEditor):
    def __init__(self, handle, stats=None, *, name: str = "memit", layers: list[int],
                 n_anchor: float, target: dict | None = None, seed: int = 0) -> None:
        super().__init__(handle, layers, target or {}, seed, name)
        if not n_anchor >= 0:
            raise ConfigError(f"editor.n_anchor={n_anchor} must be a non-negative number")
        self.n_anchor = float(n_anchor)
        self.C = stats.moments(self.layers)

    def update_layer(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> dict[str, float]:
        delta = memit_delta(self.C[layer], K, R, self.n_anchor)  # (d_out, d_in) float64
        W = self.handle.weight(layer).double() + delta
        self.handle.set_weight(layer, W)
        return {f"layer{layer}/update_norm": float(delta.norm())}
