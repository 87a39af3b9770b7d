"""The terms of the paper's objective (its Figure 2) for one edited map, as pure tensor functions.

For every editor that writes weights, the same definitions (docs/design.md section 8):

- fitting error ``||W_t K_{1:t} - V_{1:t}||_F``: how far the map is, after batch t, from every
  (key, wanted output) pair written so far;
- parameter drift ``||W_t - W_0||_F``;
- preservation error ``sqrt(tr((W_t - W_0) C (W_t - W_0)^T))``, with C the anchor statistics'
  second moment (the mean of k k^T over the anchor corpus): the root-mean-square change of the
  map's output over the anchor keys;
- ``||W_t||_F``.

The pairs written so far are kept in memory that does not grow with the stream (:class:`Pairs`):
the newest as they are, and once they would take more memory than their float64 second moments
(2 d_in of them), folded into those, so that the fitting error costs at most about three
products of W with a (d_in, d_in) matrix however many edits came before, and a stream shorter
than 2 d_in edits keeps every pair as it was written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 1024  # kept pairs whose residual is computed at once


@dataclass(frozen=True)
class Pairs:
    """Every (key, wanted output) pair written to one map: ``K`` (d_in, n) and ``V`` (d_out, n)
    the newest n < 2 d_in as they are (float32); the ``folded`` older ones as float64 sums
    ``kk`` = sum k k^T (d_in, d_in), ``vk`` = sum v k^T (d_out, d_in), ``vv`` = sum ||v||^2
    (a 0-d tensor); all three None while nothing is folded."""

    K: torch.Tensor
    V: torch.Tensor
    folded: int = 0
    kk: torch.Tensor | None = None
    vk: torch.Tensor | None = None
    vv: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.folded + self.K.shape[1]


def no_pairs(d_in: int, d_out: int, device: torch.device) -> Pairs:
    """No pair written yet, for a (d_out, d_in) map on ``device``."""
    return Pairs(torch.zeros(d_in, 0, device=device), torch.zeros(d_out, 0, device=device))


def add_pairs(pairs: Pairs, K: torch.Tensor, V: torch.Tensor) -> Pairs:
    """``pairs`` and the new keys K (d_in, b) with their wanted outputs V (d_out, b); the kept
    ones are folded into the moments when they reach 2 d_in (float32 pairs then take the
    memory of the float64 moments)."""
    K = torch.cat([pairs.K, K.detach().to(pairs.K)], 1)  # (d_in, n + b)
    V = torch.cat([pairs.V, V.detach().to(pairs.V)], 1)  # (d_out, n + b)
    if K.shape[1] < 2 * K.shape[0]:
        return Pairs(K, V, pairs.folded, pairs.kk, pairs.vk, pairs.vv)
    K64, V64 = K.double(), V.double()
    kk, vk, vv = K64 @ K64.mT, V64 @ K64.mT, (V64 * V64).sum()
    if pairs.kk is not None:
        kk, vk, vv = kk + pairs.kk, vk + pairs.vk, vv + pairs.vv
    return Pairs(K[:, :0], V[:, :0], pairs.folded + K.shape[1], kk, vk, vv)


def fit_error(W: torch.Tensor, pairs: Pairs) -> float:
    """``||W K_{1:t} - V_{1:t}||_F`` over every pair, in float64. W: (d_out, d_in)."""
    W64 = W.double()  # (W itself when it is float64 already)
    square = 0.0
    for at in range(0, pairs.K.shape[1], CHUNK):  # no float64 copy of every kept pair at once
        K, V = pairs.K[:, at:at + CHUNK].to(W64), pairs.V[:, at:at + CHUNK].to(W64)
        square += float(((W64 @ K - V) ** 2).sum())
    if pairs.kk is not None:  # ||W K - V||^2 = tr(W kk W^T) - 2 tr(W vk^T) + vv
        folded = ((W64 @ pairs.kk - 2 * pairs.vk) * W64).sum() + pairs.vv
        square += max(float(folded), 0.0)
    return square ** 0.5


def objective_terms(W: torch.Tensor, W0: torch.Tensor, pairs: Pairs | None,
                    C: torch.Tensor | None) -> dict[str, float]:
    """The four terms of one map, computed in float64.

    Args:
        W: the map now. (d_out, d_in)
        W0: the map before the first edit. (d_out, d_in)
        pairs: every (key, wanted output) pair written so far; None (or none) before the first
            edit.
        C: the anchor second moment (d_in, d_in); None leaves the preservation error out.

    Returns:
        fit, drift, preservation (without C: absent) and norm, as floats.
    """
    W64 = W.double()
    D = W64 - W0.to(W64)  # (d_out, d_in)
    terms = {"drift": float(D.norm()), "norm": float(W64.norm())}
    terms["fit"] = 0.0 if pairs is None or pairs.count == 0 else fit_error(W64, pairs)
    if C is not None:
        DC = D @ C.to(W64)  # (d_out, d_in)
        terms["preservation"] = float((DC * D).sum().clamp_min(0).sqrt())
    return terms
