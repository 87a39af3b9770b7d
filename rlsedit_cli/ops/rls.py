"""RLSEdit's recursive least squares (docs/design.md sections 2-3), as pure tensor
functions.

Objective after t batches, for one linear map W (d_out, d_in)::

    J_t(W) = sum_i ||W K_i - V_i||^2 + lam ||W - W_0||^2 + mu ||W K_0 - V_0||^2,   V_0 = W_0 K_0

with K_0 K_0^T = n_anchor * C (C = E[k k^T], the anchor second moment). Normal equations
W A_t = B_t with A_t = lam I + mu n_anchor C + sum_i K_i K_i^T and B_t = W_0 A_0 + sum_i V_i K_i^T.
The recursion carries P_t = A_t^{-1} and W_t; each step costs O(d_in^2 u + d_out d_in u + u^3)
whatever t is, and no d_in x d_in factorisation happens after :func:`rls_init`.

Every function takes its device from the inputs and computes in P's dtype; W's storage layout
(GPT-2's Conv1D keeps W transposed) is the caller's business.
"""

from __future__ import annotations

import torch

from rlsedit_cli.errors import NumericalError


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise NumericalError(
            f"{name} holds NaN or inf: the model's activations overflowed; use model.dtype=float32 "
            "or check the edit requests"
        )


def anchor_matrix(anchor_moment: torch.Tensor, lam: float, mu: float, n_anchor: float,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A_0 = lam I + mu n_anchor C, symmetrised. (d_in, d_in)."""
    C = anchor_moment.to(dtype)  # (d_in, d_in)
    A = (mu * n_anchor) * 0.5 * (C + C.mT)
    A.diagonal().add_(lam)
    return A


def spd_inverse(A: torch.Tensor, what: str) -> torch.Tensor:
    """Inverse of a symmetric positive definite matrix through its Cholesky factor."""
    L, info = torch.linalg.cholesky_ex(A)  # A = L L^T
    if int(info) != 0:
        smallest = float(torch.linalg.eigvalsh(A.double())[0])
        raise NumericalError(
            f"{what} is not positive definite (smallest eigenvalue {smallest:.3e}): raise "
            "editor.lam (a ridge of at least the magnitude of that eigenvalue) or use "
            "editor.precision=float64"
        )
    P = torch.cholesky_inverse(L)
    return 0.5 * (P + P.mT)


def rls_init(anchor_moment: torch.Tensor, lam: float, mu: float, n_anchor: float,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """P_0 = (lam I + mu n_anchor C)^{-1}, factorised once (Cholesky).

    Args:
        anchor_moment: C = E[k k^T] of the map's inputs over ordinary text. (d_in, d_in)
        lam: weight of ||W - W_0||^2 (global deviation); >= 0.
        mu: weight of ||W K_0 - V_0||^2 (anchor deviation); >= 0.
        n_anchor: number of anchor keys C stands for (K_0 K_0^T = n_anchor C).
        dtype: precision of P (float32 or float64).

    Returns:
        P_0 (d_in, d_in), symmetric positive definite, on C's device.

    Raises:
        NumericalError: if A_0 is not positive definite (e.g. lam = 0 and C singular).
    """
    if lam < 0 or mu < 0 or n_anchor < 0:
        raise ValueError(f"lam={lam}, mu={mu}, n_anchor={n_anchor} must be non-negative")
    A = anchor_matrix(anchor_moment, lam, mu, n_anchor, dtype)  # (d_in, d_in)
    return spd_inverse(A, f"lam*I + mu*n_anchor*C (lam={lam}, mu={mu}, n_anchor={n_anchor})")


def rls_step(P: torch.Tensor, W: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
             inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One Woodbury step: fold the batch (K, V) into (P, W).

    S = I_u + K^T P K,  P' = P - P K S^{-1} K^T P,  W' = W + (V - W K) K^T P'.
    Numerically: F = P K, S = L L^T, G = F L^{-T}, P' = P - G G^T and the gain
    K^T P' = S^{-1} F^T = L^{-T} G^T, so only the u x u matrix S is factorised.

    The d_in x d_in work is two GEMMs (F = P K and the rank-u downdate) and nothing else: no
    d_in x d_in temporary with ``inplace`` (P and W are updated where they lie), and P is not
    re-symmetrised (G G^T is symmetric; S, the only matrix factorised, is symmetrised).

    Args:
        P: A_{t-1}^{-1}. (d_in, d_in)
        W: W_{t-1}, any dtype (computation happens in P's dtype). (d_out, d_in)
        K: keys of the batch. (d_in, u)
        V: wanted outputs of the batch. (d_out, u)
        inplace: overwrite P (and W, when it is already in P's dtype) with the result.

    Returns:
        (P_t, W_t) in P's dtype: (d_in, d_in), (d_out, d_in).
    """
    dtype = P.dtype
    K = K.to(dtype)  # (d_in, u)
    V = V.to(dtype)  # (d_out, u)
    W = W.to(dtype)  # (d_out, d_in)
    _check_finite("edit keys K", K)
    _check_finite("edit values V", V)
    F = P @ K  # (d_in, u)
    S = K.mT @ F  # (u, u)
    S = 0.5 * (S + S.mT)
    S.diagonal().add_(1.0)
    L, info = torch.linalg.cholesky_ex(S)  # S = L L^T, (u, u)
    if int(info) != 0:
        raise NumericalError(
            "I + K^T P K is not positive definite: P lost definiteness; use "
            "editor.precision=float64 or a larger editor.lam"
        )
    Gt = torch.linalg.solve_triangular(L, F.mT, upper=False)  # G^T = L^{-1} F^T, (u, d_in)
    gain = torch.linalg.solve_triangular(L.mT, Gt, upper=True)  # K^T P_t = L^{-T} G^T, (u, d_in)
    residual = V - W @ K  # (d_out, u)
    if inplace:
        P_new = P.addmm_(Gt.mT, Gt, alpha=-1.0)  # (d_in, d_in), rank-u downdate in place
        W_new = W.addmm_(residual, gain)  # (d_out, d_in)
    else:
        P_new = torch.addmm(P, Gt.mT, Gt, alpha=-1.0)
        W_new = torch.addmm(W, residual, gain)
    return P_new, W_new


def rls_from_normal(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start the recursion from accumulated normal equations: P = A^{-1}, W = B P.

    Used when A_0 is singular (lam = mu = 0, plain least squares): the editor sums K K^T and
    V K^T until A is positive definite, factorises it once here, then steps with
    :func:`rls_step`.

    Args:
        A: sum of K K^T (plus any regulariser). (d_in, d_in)
        B: sum of V K^T (plus W_0 A_0). (d_out, d_in)

    Returns:
        (P, W): (d_in, d_in), (d_out, d_in) in A's dtype.
    """
    P = spd_inverse(0.5 * (A + A.mT), "the accumulated key Gram matrix")  # (d_in, d_in)
    return P, B.to(A.dtype) @ P
