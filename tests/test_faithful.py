"""The baselines behave as their authors' code: each test pins one reference
behaviour that the code did not have before (kmeng01/memit, kmeng01/rome, AlphaEdit, RLSEdit)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rlsedit_cli.accel.target_loss import TargetLoss
from rlsedit_cli.datasets.toy import load as load_toy
from rlsedit_cli.editing.targets import optimise_targets
from rlsedit_cli.editing.templates import (
    STARTERS,
    context_templates,
    group_sizes,
    template_weights,
)
from rlsedit_cli.editors.base import MasterWeights
from rlsedit_cli.errors import NumericalError
from rlsedit_cli.models.loader import load_model
from rlsedit_cli.models.tokens import encode_prompt, subject_last_index
from rlsedit_cli.ops.baselines import memit_delta
from rlsedit_cli.ops.rls import rls_init, rls_step

from .conftest import TINY_BUNDLE, compose_cfg, keys_and_hidden, target_cfg, tiny_overrides


@pytest.fixture(scope="module")
def toy_records():
    return load_toy(str(TINY_BUNDLE)).records


@pytest.fixture(scope="module")
def llama(tiny_models):
    cfg = compose_cfg(tiny_overrides("llama", tiny_models["llama"]))
    return load_model(cfg.model, torch.device("cpu"))


def test_templates_ignore_the_checkpoints_sampling_settings(llama):
    """memit_main.py samples plain top-5 at temperature 1: an instruct checkpoint's
    generation_config (temperature, top_p) must not change the templates."""
    plain = context_templates(llama, [[10, 5]], seed=3)
    gen = llama.model.generation_config
    saved = (gen.temperature, gen.top_p, gen.do_sample)
    gen.temperature, gen.top_p, gen.do_sample = 0.05, 0.1, False
    try:
        assert context_templates(llama, [[10, 5]], seed=3) == plain
    finally:
        gen.temperature, gen.top_p, gen.do_sample = saved
    assert len(plain) == 6 and plain[0] == "{}"
    assert all(t.endswith(". {}") and t.count("{") == 1 for t in plain[1:])
    assert all(t.startswith(STARTERS) for t in plain[1:]), plain  # one sample per starter
    assert len(context_templates(llama, [[5, 10], [10, 10]], 0, style="rome")) == 21


def test_keys_average_within_each_group_then_across_groups(llama, toy_records):
    """compute_ks.py: with [(10, 5)] the plain prompt's key weighs 1/2 and each sample 1/10;
    ROME's compute_u.py averages all templates alike."""
    assert template_weights(group_sizes([[10, 5]])) == pytest.approx([0.5] + [0.1] * 5)
    sizes = group_sizes([[5, 10], [10, 10]])
    assert template_weights(sizes) == pytest.approx([1 / 3] + [1 / 30] * 20)
    assert template_weights(group_sizes([[5, 10], [10, 10]], "rome"), "rome") == pytest.approx(
        [1 / 21] * 21)
    templates = ["{}", "One. {}", "Two words here. {}", "Three. {}"]
    weights = [0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3]
    K, _ = keys_and_hidden(llama, toy_records[:2], templates, 1, 1, weights)
    singles = torch.stack([keys_and_hidden(llama, toy_records[:2], [t], 1, 1)[0]
                           for t in templates])  # (4, d_in, n)
    assert torch.allclose(K, singles[0] / 2 + singles[1:].mean(0) / 2, atol=1e-6)
    assert not torch.allclose(K, singles.mean(0), atol=1e-4)


def test_kl_term_is_read_at_the_subjects_last_token(llama, toy_records):
    """compute_z.py / compute_v.py: the KL prompt's distribution is the one at the subject's last
    token of "{subject} is a", not after the prompt's last word."""
    batch = toy_records[:2]
    _, kl_logp = TargetLoss(llama, batch, ["{}"], 1, 2)(torch.zeros(2, 64))
    for request, got in zip(batch, kl_logp):
        ids = encode_prompt(llama.tok, f"{request.subject} is a")
        at = subject_last_index(llama.tok, "{} is a", request.subject)
        assert at < len(ids) - 1
        with torch.no_grad():
            logits = llama.model(input_ids=torch.tensor([ids])).logits[0].float()
        assert torch.allclose(got, logits[at].log_softmax(-1), atol=1e-4)
        assert not torch.allclose(got, logits[-1].log_softmax(-1), atol=1e-2)


def test_rome_scales_its_target_by_the_mlp_output(llama, toy_records):
    """compute_v.py's decay and clamp are relative to the edited layer's MLP output at the
    subject's last token of the plain prompt, not to the residual stream."""
    request = toy_records[0]
    loss = TargetLoss(llama, [request], ["{}"], 1, 2)
    loss(torch.zeros(1, 64))
    found = {}
    hook = llama.edited_module(1).register_forward_hook(
        lambda m, a, out: found.__setitem__("out", out.detach()))
    ids = encode_prompt(llama.tok, request.prompt.format(request.subject))
    at = subject_last_index(llama.tok, request.prompt, request.subject)
    with torch.no_grad():
        llama.model(input_ids=torch.tensor([ids]))
    hook.remove()
    assert torch.allclose(loss.map_init[0], found["out"][0, at].float(), atol=1e-5)
    assert loss.map_init.norm() < 0.9 * loss.h_init.norm()
    cfg = target_cfg(steps=6, lr=2.0, clamp_norm_factor=0.5, early_stop_loss=0.0, loss_layer=2)
    by_map = optimise_targets(llama, [request], ["{}"], 1, cfg, scale_by="map")
    by_residual = optimise_targets(llama, [request], ["{}"], 1, cfg)
    step = (by_map.z - loss.h_init).norm()
    assert step <= 0.5 * loss.map_init.norm() + 1e-4  # clamped at the MLP output's scale
    assert (by_residual.z - loss.h_init).norm() > step + 1e-3


def test_rome_editor_writes_exactly_at_the_plain_key(make_cfg, tiny_models, toy_records):
    """rome_main.py: after one request's write, the edited map's output at the plain prompt's
    key has moved by exactly the optimised delta."""
    from hydra.utils import instantiate

    from rlsedit_cli.stats.anchor import AnchorStats

    cfg = make_cfg(*tiny_overrides("llama", tiny_models["llama"]), "editor=rome",
                   "editor.layer=1", "editor.target.steps=5", "editor.target.loss_layer=2",
                   "editor.target.context_templates=[[5,5]]")
    handle = load_model(cfg.model, torch.device("cpu"))
    anchor = AnchorStats(handle, cfg.paths.cache, cfg.stats.corpus, 100, 32, 16)
    editor = instantiate(cfg.editor, _partial_=True, _convert_="all")(handle=handle,
                                                                      anchor=anchor)
    request = toy_records[5]
    templates = editor.templates.get()
    z = optimise_targets(handle, [request], templates, 1, editor.target, scale_by="map").z
    k_plain, h = keys_and_hidden(handle, [request], ["{}"], 1, 1)
    before = handle.weight(1).detach().double() @ k_plain.double()
    editor.edit([request])
    after = handle.weight(1).detach().double() @ k_plain.double()
    assert torch.allclose((after - before)[:, 0], (z - h)[0].double(), atol=1e-4)


def test_bf16_models_keep_a_float32_master_of_the_edited_maps(llama):
    """100 updates of about 1% each: added into bf16 weights they round every time; through
    the master copy the model's weights are the exact sum rounded once."""
    layer = 0
    saved = llama.weight(layer).detach().clone()
    module = llama.edited_module(layer)
    try:
        module.weight.data = saved.to(torch.bfloat16)
        start = llama.weight(layer).detach().double()
        torch.manual_seed(0)
        deltas = [0.01 * start.abs().mean() * torch.randn(start.shape, dtype=torch.float64)
                  for _ in range(100)]
        exact = start + sum(deltas)
        master = MasterWeights(llama)
        for d in deltas:
            master.add(layer, d)
        err_master = (llama.weight(layer).double() - exact).norm() / (exact - start).norm()
        module.weight.data = start.to(torch.bfloat16)
        for d in deltas:  # the old way: each update added to the bf16 weights
            llama.set_weight(layer, llama.weight(layer).double() + d)
        err_plain = (llama.weight(layer).double() - exact).norm() / (exact - start).norm()
        assert err_master < 0.05 < err_plain
        restored = MasterWeights(llama)
        restored.load_state_dict(master.state_dict())
        assert torch.equal(restored.copies[layer], master.copies[layer])
    finally:
        module.weight.data = saved


def test_reset_each_batch_with_lam_zero_is_memits_update():
    """What editor.reset_each_batch does, exactly: each batch starts again from P_0, so with
    lam = 0 one step is MEMIT's solve with n_anchor = mu * n (documented in rlsedit.yaml)."""
    torch.manual_seed(0)
    d_in, d_out, n = 12, 6, 4
    A = torch.randn(d_in, 3 * d_in, dtype=torch.float64)
    C = A @ A.T / (3 * d_in)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    K, R = torch.randn(d_in, n, dtype=torch.float64), torch.randn(d_out, n, dtype=torch.float64)
    P0 = rls_init(C, 0.0, 2.0, 50.0, torch.float64)
    _, W_rls = rls_step(P0.clone(), W, K, W @ K + R)
    assert torch.allclose(W_rls, W + memit_delta(C, K, R, 100.0), atol=1e-9)


def test_lam_zero_needs_float64_for_a_wide_eigenvalue_spread():
    """P = (mu n C)^-1 alone: with C's eigenvalues spread over 1e6, float32 P is far from the
    float64 one; the lam = 0 configs therefore run in float64 (tests/test_sweeps.py)."""
    torch.manual_seed(0)
    d = 64
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    C = Q @ torch.diag(torch.logspace(0, -6, d, dtype=torch.float64)) @ Q.T
    W = torch.randn(8, d, dtype=torch.float64)
    K = torch.randn(d, 4, dtype=torch.float64)
    V = torch.randn(8, 4, dtype=torch.float64)
    ref = rls_step(rls_init(C, 0.0, 1.0, 100.0, torch.float64), W, K, V)[1]
    try:
        got = rls_step(rls_init(C, 0.0, 1.0, 100.0, torch.float32), W.float(), K.float(),
                       V.float())[1].double()
    except NumericalError:  # the float32 factorisation may fail outright
        return
    assert (got - ref).norm() / (ref - W).norm() > 1e-3


def test_ft_l_reads_every_target_token_at_the_prompts_last_token(shipped_handle, toy_records):
    """baselines/ft/ft_main.py: the loss of a request is the mean NLL of its target tokens, each
    scored as the next token after the prompt; FT-M (teacher forced) is the other editor."""
    from rlsedit_cli.editors.ft import FT
    from rlsedit_cli.editors.ft_m import FTM
    from rlsedit_cli.models.tokens import encode_target

    two_words = toy_records[0].target_new + " " + toy_records[1].target_new
    handle, batch = shipped_handle, [replace(toy_records[0], target_new=two_words),
                                     *toy_records[1:3]]
    ft = FT(handle, layer=0, steps=1, lr=1e-3, norm_constraint=None)
    expected = []
    with torch.no_grad():
        for r in batch:
            ids = encode_prompt(handle.tok, r.rewrite_prompt)
            logp = handle.model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            expected.append(-logp[encode_target(handle.tok, r.target_new)].mean())
        got = ft.loss(batch)
        teacher = FTM(handle, layer=0, steps=1, lr=1e-3, norm_constraint=None).loss(batch)
    assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-5)
    multi = [r for r in batch if len(encode_target(handle.tok, r.target_new)) > 1]
    assert multi and not torch.allclose(got, teacher, atol=1e-3)


def test_ft_l_stops_below_its_loss_floor_and_keeps_its_constraint(make_cfg, toy_records):
    """Epochs end once their mean loss is below 1e-2; the change of the map (weight and bias)
    stays within norm_constraint of where the batch began."""
    from rlsedit_cli.editors.ft import FT

    cfg = make_cfg("editor=ft")
    handle = load_model(cfg.model, torch.device("cpu"))
    module = handle.edited_module(0)
    w0, b0 = module.weight.detach().clone(), module.bias.detach().clone()
    free = FT(handle, layer=0, steps=60, lr=0.05, norm_constraint=None, batch_size=2)
    stats = free.edit(toy_records[:4])
    assert stats["ft_loss_after"] < 1e-2 and stats["ft_epochs"] < 60
    assert not torch.equal(module.bias, b0)  # ft_main.py trains every parameter of the map
    module.weight.data.copy_(w0)
    module.bias.data.copy_(b0)
    FT(handle, layer=0, steps=5, lr=0.05, norm_constraint=1e-3).edit(toy_records[:4])
    assert (module.weight - w0).abs().max() <= 1e-3 + 1e-7
    assert (module.bias - b0).abs().max() <= 1e-3 + 1e-7


def test_encore_early_stop_ends_a_request_once_its_target_wins_everywhere(shipped_handle,
                                                                          toy_records):
    """stop_when_top1 (off by default): fewer steps, and each request that stopped early has
    every target token top-1 after every prompt at its final delta."""
    batch, templates = toy_records[10:16], ["{}", "Once. {}"]
    cfg = target_cfg(steps=20, lr=0.5, early_stop_loss=0.0, loss_layer=3)
    plain = optimise_targets(shipped_handle, batch, templates, 1, cfg)
    encore = optimise_targets(shipped_handle, batch, templates, 1,
                              replace(cfg, stop_when_top1=True))
    assert (plain.steps == 19).all() and (encore.steps < 19).all()
    loss = TargetLoss(shipped_handle, batch, templates, 1, 3)
    loss(torch.zeros_like(encore.z))  # sets h_init
    loss(encore.z - loss.h_init)
    assert loss.top1.all()
    assert compose_cfg([]).editor.target.stop_when_top1 is False


def test_nll_stop_ends_a_request_once_its_target_nll_alone_is_below_the_threshold(
        shipped_handle, toy_records):
    """stop_below_nll (off by default): a request stops at the first step whose mean target
    NLL is below the threshold, keeping that step's delta; the others run on."""
    batch, templates = toy_records[10:16], ["{}", "Once. {}"]
    cfg = target_cfg(steps=20, lr=0.5, early_stop_loss=0.0, loss_layer=3)
    plain = optimise_targets(shipped_handle, batch, templates, 1, cfg)
    tau = float(plain.final_loss.median())  # about half of the requests get below it
    stopped = optimise_targets(shipped_handle, batch, templates, 1,
                               replace(cfg, stop_below_nll=tau))
    early = stopped.steps < 19
    assert early.any() and (stopped.final_loss[early] < tau).all()
    assert (stopped.steps <= plain.steps).all()
    loss = TargetLoss(shipped_handle, batch, templates, 1, 3)
    loss(torch.zeros_like(stopped.z))  # sets h_init
    nll, _ = loss(stopped.z - loss.h_init)
    assert torch.allclose(nll[early], stopped.final_loss[early], rtol=1e-4, atol=1e-5)
    assert compose_cfg([]).editor.target.stop_below_nll is None


def test_ft_on_a_bf16_model_steps_a_float32_master(make_cfg, toy_records):
    """Item 4 for FT: Adam steps float32 masters of the bf16 map (kept across batches); the
    model's weights are the masters rounded, and the edits take."""
    from rlsedit_cli.editors.ft import FT

    cfg = make_cfg("model.dtype=bfloat16")
    handle = load_model(cfg.model, torch.device("cpu"))
    module = handle.edited_module(0)
    assert module.weight.dtype == torch.bfloat16
    ft = FT(handle, layer=0, steps=30, lr=0.02, norm_constraint=None)
    stats = ft.edit(toy_records[:3])
    assert [m.dtype for m in ft.masters] == [torch.float32, torch.float32]
    assert torch.equal(module.weight, ft.masters[0].to(torch.bfloat16))
    assert stats["ft_loss_after"] < stats["ft_loss_before"]
    kept = ft.masters[0].clone()
    ft.edit(toy_records[3:5])
    assert not torch.equal(ft.masters[0], kept)  # the same masters go on
