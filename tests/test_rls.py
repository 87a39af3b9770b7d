"""The Woodbury recursion against the closed-form minimiser, its limits, and its failures."""

from __future__ import annotations

import pytest
import torch

from rlsedit_cli.errors import NumericalError
from rlsedit_cli.ops.rls import rls_from_normal, rls_init, rls_step

from .conftest import rls_closed_form

D_OUT, D_IN = 12, 24


def problem(batches: int, seed: int = 0, u_max: int = 6, device: str = "cpu"):
    """W0, C and a stream of (K, V) batches of sizes 1..u_max, well conditioned."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    X = torch.randn(D_IN, 4 * D_IN, generator=g, dtype=torch.float64)
    C = X @ X.T / X.shape[1]
    Ks, Vs = [], []
    for _ in range(batches):
        u = int(torch.randint(1, u_max + 1, (1,), generator=g))
        Ks.append(torch.randn(D_IN, u, generator=g, dtype=torch.float64) / D_IN**0.5)
        Vs.append(torch.randn(D_OUT, u, generator=g, dtype=torch.float64))
    to = lambda t: t.to(device)  # noqa: E731
    return to(W0), to(C), [to(k) for k in Ks], [to(v) for v in Vs]


def recurse(W0, C, Ks, Vs, lam, mu, n_anchor, dtype=torch.float64):
    P = rls_init(C, lam, mu, n_anchor, dtype)
    W = W0.to(dtype)
    for K, V in zip(Ks, Vs):
        P, W = rls_step(P, W, K, V)
    return P, W


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("batches", [1, 10, 200])
def test_recursion_equals_closed_form_float64(batches):
    W0, C, Ks, Vs = problem(batches)
    _, W = recurse(W0, C, Ks, Vs, lam=0.5, mu=1.0, n_anchor=10.0)
    assert rel_err(W, rls_closed_form(W0, C, 0.5, 1.0, 10.0, Ks, Vs)) <= 1e-8


@pytest.mark.parametrize("batches", [1, 10, 200])
def test_recursion_equals_closed_form_float32(batches):
    W0, C, Ks, Vs = problem(batches, seed=1)
    _, W = recurse(W0.float(), C.float(), [k.float() for k in Ks], [v.float() for v in Vs],
                   lam=1.0, mu=1.0, n_anchor=10.0, dtype=torch.float32)
    assert W.dtype == torch.float32
    assert rel_err(W, rls_closed_form(W0, C, 1.0, 1.0, 10.0, Ks, Vs)) <= 1e-4


def test_history_is_kept_not_reset():
    """Earlier batches stay in the objective: the result differs from a per-batch reset."""
    W0, C, Ks, Vs = problem(20, seed=2)
    _, W = recurse(W0, C, Ks, Vs, lam=0.1, mu=1.0, n_anchor=5.0)
    P0 = rls_init(C, 0.1, 1.0, 5.0)
    W_reset = W0.clone()
    for K, V in zip(Ks, Vs):
        _, W_reset = rls_step(P0, W_reset, K, V)
    assert rel_err(W_reset, W) > 1e-2
    first = (W @ Ks[0] - Vs[0]).norm() / (W_reset @ Ks[0] - Vs[0]).norm()
    assert first < 1.0  # the first batch is fitted better when it stays in the sum


def test_large_lam_freezes_weights():
    W0, C, Ks, Vs = problem(10, seed=3)
    _, W = recurse(W0, C, Ks, Vs, lam=1e12, mu=1.0, n_anchor=10.0)
    assert rel_err(W, W0) < 1e-8


def test_large_mu_preserves_anchor_outputs():
    g = torch.Generator().manual_seed(4)
    W0, _, Ks, Vs = problem(10, seed=4)
    K0 = torch.randn(D_IN, D_IN // 2, generator=g, dtype=torch.float64)  # rank-deficient anchor
    C = K0 @ K0.T  # n_anchor = 1
    _, W = recurse(W0, C, Ks, Vs, lam=1e-3, mu=1e10, n_anchor=1.0)
    assert rel_err(W @ K0, W0 @ K0) < 1e-6
    assert rel_err(W, W0) > 1e-2  # edits still land in the anchor's null space


def test_lam_mu_zero_is_least_squares():
    g = torch.Generator().manual_seed(5)
    Ks = [torch.randn(D_IN, 2 * D_IN, generator=g, dtype=torch.float64)]
    Ks += [torch.randn(D_IN, 3, generator=g, dtype=torch.float64) for _ in range(20)]
    Vs = [torch.randn(D_OUT, k.shape[1], generator=g, dtype=torch.float64) for k in Ks]
    with pytest.raises(NumericalError, match="not positive definite"):
        rls_init(torch.zeros(D_IN, D_IN, dtype=torch.float64), 0.0, 0.0, 0.0)
    P, W = rls_from_normal(Ks[0] @ Ks[0].T, Vs[0] @ Ks[0].T)
    for K, V in zip(Ks[1:], Vs[1:]):
        P, W = rls_step(P, W, K, V)
    K_all, V_all = torch.cat(Ks, 1), torch.cat(Vs, 1)
    W_ls = torch.linalg.lstsq(K_all.T, V_all.T).solution.T
    assert rel_err(W, W_ls) <= 1e-8


def test_P_stays_symmetric_positive_definite_and_equals_inverse():
    W0, C, Ks, Vs = problem(200, seed=6)
    P, _ = recurse(W0, C, Ks, Vs, lam=0.5, mu=1.0, n_anchor=10.0)
    assert torch.equal(P, P.T)
    assert float(torch.linalg.eigvalsh(P)[0]) > 0
    A = 0.5 * torch.eye(D_IN, dtype=torch.float64) + 10.0 * C + sum(k @ k.T for k in Ks)
    assert rel_err(P, torch.linalg.inv(A)) < 1e-8


def test_single_key_batches():
    W0, C, Ks, Vs = problem(30, seed=7, u_max=1)
    assert all(k.shape[1] == 1 for k in Ks)
    _, W = recurse(W0, C, Ks, Vs, lam=0.5, mu=1.0, n_anchor=10.0)
    assert rel_err(W, rls_closed_form(W0, C, 0.5, 1.0, 10.0, Ks, Vs)) <= 1e-8


def test_not_positive_definite_names_smallest_eigenvalue():
    C = -torch.eye(D_IN, dtype=torch.float64)
    with pytest.raises(NumericalError, match=r"smallest eigenvalue -9\.9.*editor\.lam"):
        rls_init(C, 0.1, 1.0, 10.0)


def test_nan_keys_are_refused():
    W0, C, Ks, Vs = problem(1)
    P = rls_init(C, 0.5, 1.0, 10.0)
    K = Ks[0].clone()
    K[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="edit keys K holds NaN"):
        rls_step(P, W0, K, Vs[0])


def test_step_keeps_inputs_and_device():
    W0, C, Ks, Vs = problem(1)
    P = rls_init(C, 0.5, 1.0, 10.0)
    P_copy, W_copy = P.clone(), W0.clone()
    P1, W1 = rls_step(P, W0.float(), Ks[0], Vs[0])
    assert torch.equal(P, P_copy) and torch.equal(W0, W_copy)
    assert W1.dtype == torch.float64 and P1.device == P.device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_recursion_on_cuda(dtype, tol):
    W0, C, Ks, Vs = problem(50, seed=8, device="cuda")
    P, W = recurse(W0.to(dtype), C.to(dtype), Ks, Vs, lam=1.0, mu=1.0, n_anchor=10.0,
                   dtype=dtype)
    assert W.is_cuda and P.is_cuda
    ref = rls_closed_form(W0.cpu(), C.cpu(), 1.0, 1.0, 10.0, [k.cpu() for k in Ks],
                          [v.cpu() for v in Vs])
    assert rel_err(W.cpu(), ref) <= tol


def test_in_place_step_writes_where_p_and_w_lie_and_equals_the_plain_one():
    W0, C, Ks, Vs = problem(20, seed=3)
    P_ref, W_ref = recurse(W0, C, Ks, Vs, lam=0.5, mu=1.0, n_anchor=10.0)
    P = rls_init(C, 0.5, 1.0, 10.0)
    W = W0.clone()
    for K, V in zip(Ks, Vs):
        P_next, W_next = rls_step(P, W, K, V, inplace=True)
        assert P_next.data_ptr() == P.data_ptr() and W_next.data_ptr() == W.data_ptr()
    assert rel_err(W, W_ref) <= 1e-12 and rel_err(P, P_ref) <= 1e-12
    assert float((P - P.mT).abs().max() / P.abs().max()) < 1e-12  # stays symmetric unforced
