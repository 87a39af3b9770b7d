"""ROME, applied sequentially: one rank-one write per request into one layer, using C^{-1}."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import II

from rlsedit_cli.config import EditorConfig, TargetConfig
from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editing.keys import keys_and_hidden
from rlsedit_cli.editing.pipeline import KeyValueEditor
from rlsedit_cli.editing.targets import optimise_targets
from rlsedit_cli.ops.baselines import rome_delta
from rlsedit_cli.ops.rls import spd_inverse


@dataclass
class ROMEConfig(EditorConfig):
    _target_: str = "rlsedit_cli.editors.rome.ROME"
    name: str = "rome"
    layer: int = II("model.single_layer")
    target: TargetConfig = field(default_factory=TargetConfig)
    seed: int = II("seed")


class ROME(KeyValueEditor):
    """Each request of a batch is written after the previous one (ROME edits one fact at a time);
    its target is optimised at the edited layer itself."""

    def __init__(self, handle, stats=None, *, name: str = "rome", layer: int,
                 target: dict | None = None, seed: int = 0) -> None:
        super().__init__(handle, [layer], target or {}, seed, name)
        C = stats.moments(self.layers)[self.z_layer]
        self.C_inv = spd_inverse(C, f"the anchor statistics of layer {layer}")

    def edit(self, batch: list[Record]) -> dict[str, float]:
        templates = self.context()
        norms, nll_before, nll_after, kl_after = [], [], [], []
        for request in batch:
            result = optimise_targets(self.handle, [request], templates, self.z_layer, self.target)
            K, h = keys_and_hidden(self.handle, [request], templates, self.z_layer, self.z_layer)
            delta = rome_delta(self.C_inv, K[:, 0], (result.z - h)[0])
            self.handle.set_weight(self.z_layer, self.handle.weight(self.z_layer).double() + delta)
            norms.append(float(delta.norm()))
            nll_before.append(float(result.init_loss[0]))
            nll_after.append(float(result.final_loss[0]))
            kl_after.append(float(result.final_kl[0]))
        n = len(batch)
        return {"target_nll_before": sum(nll_before) / n, "target_nll_after": sum(nll_after) / n,
                "target_kl_after": sum(kl_after) / n,
                f"layer{self.z_layer}/update_norm": sum(norms) / n}

    def update_layer(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError("ROME writes request by request in edit()")
