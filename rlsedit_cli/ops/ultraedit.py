"""UltraEdit's update (Gu et al. 2025, arXiv 2505.14679), as its code computes it.

Per batch and edited map, from the map's inputs k and the gradients g of the editing loss with
respect to its outputs, one row per answer token: a running normaliser of [k, g] over the whole
stream (nets.py's RunningMeanStd, one per weight shape, updated with the batch first), the
target values v = -lr ||k^||^2 g^ from the normalised rows, and the least-squares write
Delta = (K^T K + I)^{-1} K^T V with this batch's raw keys (editor/ultraedit.py's
predict_param_shifts). Pure tensor functions, float32 as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Normaliser:
    """RunningMeanStd's buffers: rows seen, their mean, and the accumulated squared deviations
    (named ``var`` there; its batch term is n_b times the batch's unbiased variance)."""

    n: torch.Tensor  # (1,) float32, as the reference's buffer
    mean: torch.Tensor  # (d_in + d_out,)
    var: torch.Tensor  # (d_in + d_out,)

    @classmethod
    def empty(cls, size: int, device=None) -> Normaliser:
        zeros = torch.zeros(size, device=device)
        return cls(torch.zeros(1, device=device), zeros, zeros.clone())

    @property
    def std(self) -> torch.Tensor:
        """(d,) the spread the rows are divided by."""
        eps = torch.finfo(self.var.dtype).eps
        return (self.var / (self.n - 1 + eps)).sqrt()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"n": self.n, "mean": self.mean, "var": self.var}


def normaliser_update(state: Normaliser, x: torch.Tensor) -> Normaliser:
    """The normaliser after the rows ``x`` (m, d) (Chan's merge, as RunningMeanStd.update).

    A single row adds no spread: the reference's unbiased variance of one row is NaN and would
    poison the stream's statistics; here it counts as 0 (the only place the two differ).
    """
    m = x.shape[0]
    n = state.n + m
    delta = x.mean(0) - state.mean  # (d,)
    spread = x.var(0) if m > 1 else torch.zeros_like(state.var)  # (d,) unbiased
    mean = state.mean + m * delta / n
    var = state.var + (m * spread + state.n * m * delta.pow(2) / n)
    return Normaliser(n, mean, var)


def normalise(state: Normaliser, x: torch.Tensor) -> torch.Tensor:
    """(m, d) rows, centred and scaled by the stream's statistics."""
    return (x - state.mean) / (state.std + torch.finfo(x.dtype).eps)


def ultraedit_values(state: Normaliser, K: torch.Tensor, G: torch.Tensor,
                     lr: float) -> torch.Tensor:
    """V (n, d_out) = -lr ||k^||^2 g^ per row, from keys K (n, d_in) and gradients G (n, d_out)."""
    k_hat, g_hat = normalise(state, torch.cat([K, G], -1)).split([K.shape[1], G.shape[1]], -1)
    return -lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat


def ultraedit_delta(K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Delta (d_in, d_out) = (K^T K + I)^{-1} K^T V for keys K (n, d_in), values V (n, d_out)."""
    eye = torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
    return torch.linalg.solve(K.T @ K + eye, K.T @ V)
