"""AlphaEdit: updates projected onto the null space of the anchor statistics, with the keys of
all earlier batches kept in the solve (a d_in x d_in solve every batch)."""

from __future__ import annotations

import torch

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editing.keys import keys_of_layers
from rlsedit_cli.editors.base import KeyValueEditor
from rlsedit_cli.ops.baselines import alphaedit_delta, nullspace_projector


class AlphaEdit(KeyValueEditor):
    def __init__(self, handle, anchor=None, *, name: str = "alphaedit", layers: list[int],
                 threshold: float, l2: float, target: dict | None = None, seed: int = 0) -> None:
        super().__init__(handle, layers, target, seed, name)
        self.l2 = float(l2)
        C = anchor.moments(self.layers)
        self.Pi = {layer: nullspace_projector(C[layer].float(), threshold) for layer in self.layers}
        self.past = {layer: torch.zeros_like(self.Pi[layer]) for layer in self.layers}
        self.null_dim = {layer: int(torch.trace(self.Pi[layer]).round()) for layer in self.layers}

    def update_layer(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> dict[str, float]:
        delta = alphaedit_delta(self.Pi[layer], self.past[layer], K, R, self.l2)
        self.master.add(layer, delta)
        return {f"layer{layer}/update_norm": float(delta.norm()),
                f"layer{layer}/null_dim": float(self.null_dim[layer])}

    def after_batch(self, batch: list[Record]) -> dict[str, float]:
        """Accumulate the batch's keys, recomputed on the edited model (as AlphaEdit does)."""
        keys = keys_of_layers(self.handle, batch, self.templates.get(), self.layers,
                              self.templates.weights)
        for layer in self.layers:
            self.past[layer] += keys[layer] @ keys[layer].T
        return {}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "past": self.past}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.past = {k: v.to(self.Pi[k].device) for k, v in state["past"].items()}
