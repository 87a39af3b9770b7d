"""The baselines' per-batch rules against their defining properties."""

from __future__ import annotations

import torch

from rlsedit_cli.ops.baselines import alphaedit_delta, memit_delta, nullspace_projector, rome_delta


def data(seed=0, d_out=10, d_in=20, u=4):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d_in, d_in // 2, generator=g, dtype=torch.float64)
    C = X @ X.T / X.shape[1] + 1e-6 * torch.eye(d_in, dtype=torch.float64)  # low-rank + tiny
    K = torch.randn(d_in, u, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, u, generator=g, dtype=torch.float64)
    return C, K, R


def test_memit_matches_its_formula_and_fits_when_anchor_weight_is_small():
    C, K, R = data()
    delta = memit_delta(C, K, R, n_anchor=100.0)
    expected = R @ K.T @ torch.linalg.inv(100.0 * C + K @ K.T)
    assert torch.allclose(delta, expected, atol=1e-10)
    assert torch.allclose(memit_delta(C, K, R, 1e-9) @ K, R, atol=1e-5)


def test_alphaedit_update_vanishes_on_the_preserved_space():
    C, K, R = data(1)
    Pi = nullspace_projector(C, threshold=1e-2)
    eigvals, eigvecs = torch.linalg.eigh(C)
    kept = eigvecs[:, eigvals >= 1e-2]
    assert kept.shape[1] == 10 and torch.allclose(Pi @ kept, torch.zeros_like(kept), atol=1e-10)
    delta = alphaedit_delta(Pi, torch.zeros_like(C), K, R, l2=10.0)
    assert (delta @ kept).abs().max() < 1e-10
    delta_fit = alphaedit_delta(Pi, torch.zeros_like(C), K, R, l2=1e-8)
    assert torch.allclose(delta_fit @ (Pi @ K), R, atol=1e-4)  # fits inside the null space


def test_rome_writes_the_value_exactly_at_the_plain_key():
    """compute_v.py divides by k_plain . u: exact at the plain prompt's key, with the direction
    u = C^-1 k_avg (or k_avg itself without the second-moment adjustment)."""
    C, K, R = data(2)
    k_avg, k_plain = K[:, 0], K[:, 1]
    for C_inv in (torch.linalg.inv(C), None):
        delta = rome_delta(C_inv, k_avg, k_plain, R[:, 0])
        assert torch.allclose(delta @ k_plain, R[:, 0], atol=1e-8)
        assert not torch.allclose(delta @ k_avg, R[:, 0], atol=1e-3)  # not at the averaged key
        assert torch.linalg.matrix_rank(delta) == 1
        u = C_inv @ k_avg if C_inv is not None else k_avg
        assert torch.allclose(delta @ u / u.norm(), R[:, 0] * u.norm() / (u @ k_plain), atol=1e-8)
