"""The terms of the paper's objective (its Figure 2) for one edited map, as pure tensor functions.

For every editor that writes weights, the same definitions (docs/design.md section 8):

- fitting error ``||W_t K_{1:t} - V_{1:t}||_F``: how far the map is, after batch t, from every
  (key, wanted output) pair written so far;
- parameter drift ``||W_t - W_0||_F``;
- preservation error ``sqrt(tr((W_t - W_0) C (W_t - W_0)^T))``, with C the anchor statistics'
  second moment (the mean of k k^T over the anchor corpus): the root-mean-square change of the
  map's output over the anchor keys;
- ``||W_t||_F``.
"""

from __future__ import annotations

import torch


def objective_terms(W: torch.Tensor, W0: torch.Tensor, K: torch.Tensor | None,
                    V: torch.Tensor | None, C: torch.Tensor | None) -> dict[str, float]:
    """The four terms of one map, computed in float64.

    Args:
        W: the map now. (d_out, d_in)
        W0: the map before the first edit. (d_out, d_in)
        K: the keys of every edit so far, (d_in, N); None before the first edit.
        V: their wanted outputs. (d_out, N)
        C: the anchor second moment (d_in, d_in); None leaves the preservation error out.

    Returns:
        fit, drift, preservation (without C: absent) and norm, as floats.
    """
    W64 = W.double()
    D = W64 - W0.to(W64)  # (d_out, d_in)
    terms = {"drift": float(D.norm()), "norm": float(W64.norm())}
    terms["fit"] = 0.0 if K is None else float((W64 @ K.to(W64) - V.to(W64)).norm())
    if C is not None:
        DC = D @ C.to(W64)  # (d_out, d_in)
        terms["preservation"] = float((DC * D).sum().clamp_min(0).sqrt())
    return terms
