"""Per-batch update rules of the baselines (docs/design.md section 5), as pure tensor
functions.

Each returns the weight change Delta (d_out, d_in) for one layer, given the anchor second moment
C (d_in, d_in), the batch keys K (d_in, u) and the spread residual R (d_out, u); the caller adds
Delta to W. Computation happens in C's dtype on C's device.
"""

from __future__ import annotations

import torch

from rlsedit_cli.errors import NumericalError


def memit_delta(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, n_anchor: float,
                ) -> torch.Tensor:
    """MEMIT: Delta = R K^T (n_anchor C + K K^T)^{-1}.

    Args:
        C: (d_in, d_in); K: (d_in, u); R: (d_out, u); n_anchor: MEMIT's mom2_update_weight.

    Returns:
        Delta (d_out, d_in).
    """
    K, R = K.to(C.dtype), R.to(C.dtype)
    A = n_anchor * C + K @ K.mT  # (d_in, d_in)
    adj = torch.linalg.solve(A, K)  # (d_in, u)
    return R @ adj.mT


def nullspace_projector(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's projector onto the eigenvectors of C with eigenvalue below ``threshold``.

    Returns:
        Pi = U U^T (d_in, d_in).
    """
    eigvals, eigvecs = torch.linalg.eigh(0.5 * (C + C.mT))  # ascending
    U = eigvecs[:, eigvals < threshold]  # (d_in, r)
    return U @ U.mT


def alphaedit_delta(Pi: torch.Tensor, past_gram: torch.Tensor, K: torch.Tensor, R: torch.Tensor,
                    l2: float) -> torch.Tensor:
    """AlphaEdit: Delta = R K^T Pi ((K_p K_p^T + K K^T) Pi + l2 I)^{-1}, a d_in x d_in solve.

    Args:
        Pi: null-space projector. (d_in, d_in)
        past_gram: K_p K_p^T, the sum over earlier batches' keys. (d_in, d_in)
        K: (d_in, u); R: (d_out, u); l2: AlphaEdit's L2 weight.

    Returns:
        Delta (d_out, d_in).
    """
    K, R = K.to(Pi.dtype), R.to(Pi.dtype)
    M = Pi @ (K @ K.mT + past_gram)  # (d_in, d_in)
    M.diagonal().add_(l2)
    X = torch.linalg.solve(M, Pi @ K @ R.mT)  # (d_in, d_out) = Delta^T
    return X.mT


def rome_delta(C_inv: torch.Tensor | None, k: torch.Tensor, k_plain: torch.Tensor,
               r: torch.Tensor) -> torch.Tensor:
    """ROME's rank-one write (compute_u.py, compute_v.py): Delta = r u^T / (u^T k_plain) with
    u = C^{-1} k (or k itself when ``C_inv`` is None: ``mom2_adjustment`` off).

    After the write, (W + Delta) k_plain = W k_plain + r exactly: the write is exact at the
    plain prompt's key, while its direction u comes from the template-averaged key.

    Args:
        C_inv: inverse anchor second moment (d_in, d_in), or None.
        k: the request's key averaged over the context templates. (d_in,)
        k_plain: the key of the plain prompt. (d_in,)
        r: wanted change of the output at k_plain, v* - W k_plain. (d_out,)

    Returns:
        Delta (d_out, d_in).
    """
    dtype = C_inv.dtype if C_inv is not None else torch.float64
    k, k_plain, r = k.to(dtype), k_plain.to(dtype), r.to(dtype)
    left = C_inv @ k if C_inv is not None else k  # (d_in,)
    denom = left @ k_plain
    if not torch.isfinite(denom) or float(denom) == 0:
        raise NumericalError("ROME's u^T k is zero or not finite: the anchor statistics are "
                             "singular; recompute them with more stats.num_samples")
    return torch.outer(r, left / denom)
