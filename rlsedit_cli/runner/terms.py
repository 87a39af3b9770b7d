"""The paper's Figure-2 terms for every editor that writes weights, after every batch.

The runner keeps, per edited layer, the map before the stream (W_0), the keys K_{1:t} and the
wanted outputs V_{1:t} of every edit so far (what each batch's editor reported,
:meth:`rlsedit_cli.editors.base.Editor.written`), and the anchor second moment C; after each
batch it computes :func:`rlsedit_cli.ops.terms.objective_terms` on the model's weights. The
keys and outputs travel in the run's checkpoint, so a resumed run goes on with all of them.
"""

from __future__ import annotations

import torch

from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.ops.terms import objective_terms


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
        self.K: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}  # (d_in, n) each
        self.V: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}  # (d_out, n)

    def before(self) -> dict[str, float]:
        """The terms of the unedited maps (every one 0 but the norm)."""
        return self._terms()

    def after_batch(self, written: dict[int, tuple[torch.Tensor, torch.Tensor]],
                    ) -> dict[str, float]:
        """Add the batch's (keys, wanted outputs) per layer; the terms of the maps now."""
        for layer, (K, V) in written.items():
            if layer in self.K:
                self.K[layer].append(K.detach().float())
                self.V[layer].append(V.detach().float())
        return self._terms()

    def _terms(self) -> dict[str, float]:
        row = {}
        for layer, W0 in self.W0.items():
            K = torch.cat(self.K[layer], 1) if self.K[layer] else None  # (d_in, N)
            V = torch.cat(self.V[layer], 1) if self.V[layer] else None  # (d_out, N)
            terms = objective_terms(self.handle.weight(layer).detach(), W0, K, V,
                                    self.C.get(layer))
            label = self.handle.map_label(layer)
            row |= {f"{label}/{name}": value for name, value in terms.items()}
        return row

    def state_dict(self) -> dict:
        """The keys and wanted outputs so far, one tensor per layer (CPU)."""
        return {layer: (torch.cat(self.K[layer], 1).cpu(), torch.cat(self.V[layer], 1).cpu())
                for layer in self.K if self.K[layer]}

    def load_state_dict(self, state: dict | None) -> None:
        for layer, (K, V) in (state or {}).items():
            device = self.W0[layer].device
            self.K[layer], self.V[layer] = [K.to(device)], [V.to(device)]
