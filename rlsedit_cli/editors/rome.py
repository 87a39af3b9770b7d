"""ROME, applied sequentially: one rank-one write per request into one layer (rome/rome_main.py)."""

from __future__ import annotations

import torch

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editing.keys import template_keys_and_hidden, weighted_keys
from rlsedit_cli.editing.targets import optimise_targets
from rlsedit_cli.editors.base import TargetEditor, target_stats
from rlsedit_cli.ops.baselines import rome_delta
from rlsedit_cli.ops.rls import spd_inverse
from rlsedit_cli.progress import PhaseClock


class ROME(TargetEditor):
    """Each request of a batch is written after the previous one (ROME edits one fact at a time).

    As compute_v.py: the target is the edited layer's MLP output at the subject's last token,
    its weight decay and clamp scaled by that output's norm; context templates are sampled from
    the start of a text and averaged alike. As compute_u.py: the write's direction is
    C^{-1} k_avg (k_avg alone with ``mom2_adjustment`` off, as the Llama-3 settings of the
    AlphaEdit and RLSEdit code), and it is exact at the plain prompt's key.
    """

    def __init__(self, handle, anchor=None, *, name: str = "rome", layer: int,
                 target: dict | None = None, seed: int = 0, mom2_adjustment: bool = True) -> None:
        handle.check_layers([layer], "editor.layer")
        super().__init__(handle, target, seed, style="rome")
        self.name, self.layer = name, int(layer)
        self.C_inv = None
        if mom2_adjustment:
            C = anchor.moments([self.layer])[self.layer]
            self.C_inv = spd_inverse(C, f"the anchor statistics of layer {layer}")

    @property
    def edited_layers(self) -> list[int]:
        return [self.layer]

    def edit(self, batch: list[Record]) -> dict[str, float]:
        clock = PhaseClock(self.handle.device)
        with clock("templates"):
            templates = self.templates.get()
        per_request, keys_written, outputs = [], [], []
        for request in batch:
            with clock("targets"):
                result = optimise_targets(self.handle, [request], templates, self.layer,
                                          self.target, scale_by="map")
            with clock("keys"):
                keys, h = template_keys_and_hidden(self.handle, [request], templates,
                                                   self.layer, self.layer,
                                                   self.target.keys_dtype)  # "{}" first
                K, k_plain = weighted_keys(keys, self.templates.weights), keys[:, 0].T
            with clock("update"):
                r = (result.z - h)[0]  # (d_out,) the wanted change at the plain prompt's key
                W = self.map_now(self.layer)
                keys_written.append(k_plain[:, 0].to(W))
                outputs.append(W @ k_plain[:, 0].to(W) + r.to(W))
                delta = rome_delta(self.C_inv, K[:, 0], k_plain[:, 0], r)  # (d_out, d_in)
                self.master.add(self.layer, delta)
            per_request.append(target_stats(result)
                               | {f"layer{self.layer}/update_norm": float(delta.norm())})
        self._written = {self.layer: (torch.stack(keys_written, 1), torch.stack(outputs, 1))}
        means = {key: sum(s[key] for s in per_request) / len(batch) for key in per_request[0]}
        return means | clock.seconds()
