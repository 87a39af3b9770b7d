"""The paper's Figure-2 terms for every editor that writes weights, after every batch.

The runner keeps, per edited layer, the map before the stream (W_0), the keys K_{1:t} and the
wanted outputs V_{1:t} of every edit so far (what each batch's editor reported,
:meth:`rlsedit_cli.editors.base.Editor.written`; in memory that does not grow with the stream,
:class:`rlsedit_cli.ops.terms.Pairs`), and the anchor second moment C; after each batch it
computes :func:`rlsedit_cli.ops.terms.objective_terms` on the model's weights. The pairs travel
in the run's checkpoint, so a resumed run goes on with all of them.
"""

from __future__ import annotations

import torch

from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.ops.terms import Pairs, add_pairs, no_pairs, objective_terms


class ObjectiveTerms:
    """Fitting error, drift, preservation error and norm of each edited map, batch after batch.

    Args:
        layers: the editor's edited maps (``Editor.edited_layers``: layer numbers of the MLP
            output maps, or module names; empty: nothing to follow).
        moments: map -> C (d_in, d_in); a map without one gets no preservation error.
    """

    def __init__(self, handle: ModelHandle, layers: list[int | str],
                 moments: dict[int | str, torch.Tensor]) -> None:
        self.handle = handle
        self.W0 = {layer: handle.weight(layer).detach().clone() for layer in layers}
        self.C = moments
        self.pairs: dict[int | str, Pairs] = {
            layer: no_pairs(W.shape[1], W.shape[0], W.device) for layer, W in self.W0.items()}

    def before(self) -> dict[str, float]:
        """The terms of the unedited maps (every one 0 but the norm)."""
        return self._terms()

    def after_batch(self, written: dict[int, tuple[torch.Tensor, torch.Tensor]],
                    ) -> dict[str, float]:
        """Add the batch's (keys, wanted outputs) per layer; the terms of the maps now."""
        for layer, (K, V) in written.items():
            if layer in self.pairs:
                self.pairs[layer] = add_pairs(self.pairs[layer], K, V)
        return self._terms()

    def _terms(self) -> dict[str, float]:
        row = {}
        for layer, W0 in self.W0.items():
            terms = objective_terms(self.handle.weight(layer).detach(), W0, self.pairs[layer],
                                    self.C.get(layer))
            label = self.handle.map_label(layer)
            row |= {f"{label}/{name}": value for name, value in terms.items()}
        return row

    def state_dict(self) -> dict:
        """The pairs so far per layer (CPU tensors: the newest as they are, the moments of
        the folded ones)."""
        return {layer: {"K": p.K.cpu(), "V": p.V.cpu(), "folded": p.folded,
                        **{k: None if t is None else t.cpu()
                           for k, t in (("kk", p.kk), ("vk", p.vk), ("vv", p.vv))}}
                for layer, p in self.pairs.items() if p.count}

    def load_state_dict(self, state: dict | None) -> None:
        """Pairs saved by :meth:`state_dict`, or an older checkpoint's (K, V) per layer."""
        for layer, saved in (state or {}).items():
            device = self.W0[layer].device
            if isinstance(saved, tuple | list):  # every pair as it was written
                K, V = saved
                self.pairs[layer] = add_pairs(self.pairs[layer], K.to(device), V.to(device))
                continue
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in saved.items()}
            self.pairs[layer] = Pairs(**moved)
