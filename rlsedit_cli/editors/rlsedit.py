"""RLSEdit: every edit of the stream in one regularised least-squares objective
(docs/design.md sections 2-3).

Per edited layer the editor carries P_t = A_t^{-1} and a master copy of W_t in ``precision``
across the WHOLE stream (never reset, unless ``reset_each_batch`` asks for the published code's
per-batch behaviour, for comparison). Each batch is one :func:`rls_step` per layer; the model's
weights receive W_t cast to their dtype. Per batch it reports ||W_t K_t - V_t||_F per layer, the
fit of the batch's own keys; the terms over the whole stream are the runner's, for every editor
(runner/terms.py).
"""

from __future__ import annotations

import logging

import torch

from rlsedit_cli.editors.base import KeyValueEditor
from rlsedit_cli.ops.rls import rls_from_normal, rls_init, rls_step

log = logging.getLogger(__name__)


class RLSEdit(KeyValueEditor):
    def __init__(self, handle, anchor=None, *, name: str = "rlsedit", layers: list[int],
                 lam: float, mu: float, n_anchor: float, precision: str = "float32",
                 reset_each_batch: bool = False, target: dict | None = None, seed: int = 0) -> None:
        super().__init__(handle, layers, target, seed, name)
        self.lam, self.mu, self.n_anchor = float(lam), float(mu), float(n_anchor)
        self.dtype = getattr(torch, precision)
        self.reset_each_batch = reset_each_batch
        if reset_each_batch:
            log.warning("editor.reset_each_batch=true: P is rebuilt every batch as in the "
                        "paper's published code; earlier batches leave the objective")
        C = anchor.moments(self.layers) if self.mu > 0 and self.n_anchor > 0 else {}
        self.W, self.P, self.P0, self.normal = {}, {}, {}, {}
        for layer in self.layers:  # W: updated in place, never the model's own tensor
            self.W[layer] = handle.weight(layer).detach().to(self.dtype, copy=True)
            d_in = self.W[layer].shape[1]
            if self.lam == 0 and (self.mu == 0 or self.n_anchor == 0):
                # plain least squares: no prior; start once the edit keys span the input space
                zeros = torch.zeros(d_in, d_in, dtype=self.dtype, device=self.W[layer].device)
                self.normal[layer] = (zeros, torch.zeros_like(self.W[layer]))
                continue
            moment = C.get(layer, torch.zeros(d_in, d_in, device=self.W[layer].device))
            self.P[layer] = rls_init(moment, self.lam, self.mu, self.n_anchor, self.dtype)
            if reset_each_batch:
                self.P0[layer] = self.P[layer].clone()
        size = self.dtype.itemsize
        per_layer = [W.shape[1] ** 2 * size * (1 + reset_each_batch)
                     + W.numel() * size for W in self.W.values()]
        log.info("RLSEdit state: %d layers x %.1f MB (%s)", len(self.layers),
                 max(per_layer) / 2**20, precision)

    def update_layer(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> dict[str, float]:
        K = K.to(self.dtype)  # (d_in, n)
        V = self.W[layer] @ K + R.to(self.dtype)  # wanted outputs, (d_out, n)
        if layer in self.normal:
            self._least_squares(layer, K, V)
        else:
            P = self.P0[layer].clone() if self.reset_each_batch else self.P[layer]
            self.P[layer], self.W[layer] = rls_step(P, self.W[layer], K, V, inplace=True)
        self.handle.set_weight(layer, self.W[layer])
        return {f"layer{layer}/residual": float((self.W[layer] @ K - V).norm())}

    def map_now(self, layer: int) -> torch.Tensor:
        return self.W[layer]

    def _least_squares(self, layer: int, K: torch.Tensor, V: torch.Tensor) -> None:
        A, B = self.normal[layer]
        A, B = A + K @ K.mT, B + V @ K.mT
        if int(torch.linalg.cholesky_ex(A)[1]) != 0:
            self.normal[layer] = (A, B)
            log.info("layer %d: lam = mu = 0 and the keys do not span the input space yet; "
                     "W stays at W_0 until they do", layer)
            return
        del self.normal[layer]
        self.P[layer], self.W[layer] = rls_from_normal(A, B)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "P": self.P, "W": self.W, "normal": self.normal}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        here = {layer: self.handle.weight(layer).device for layer in self.layers}
        self.P = {k: v.to(here[k]) for k, v in state["P"].items()}
        self.W = {k: v.to(here[k]) for k, v in state["W"].items()}
        self.normal = {k: (a.to(here[k]), b.to(here[k])) for k, (a, b) in state["normal"].items()}
        for layer in self.layers:
            self.handle.set_weight(layer, self.W[layer])
