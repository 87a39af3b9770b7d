"""The editing pipeline and the five editors, on every architecture and on the shipped model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rlsedit_cli.accel.target_loss import TargetLoss
from rlsedit_cli.datasets.toy import load as load_toy
from rlsedit_cli.editing.reference import FullForwardLoss, plain_target_loss
from rlsedit_cli.editing.targets import kl_divergence, optimise_targets
from rlsedit_cli.editing.templates import context_templates
from rlsedit_cli.editors import rlsedit as rlsedit_mod
from rlsedit_cli.errors import ConfigError
from rlsedit_cli.eval.counterfact import probability_metrics
from rlsedit_cli.models.loader import load_model
from rlsedit_cli.runner.run import run
from rlsedit_cli.stats.anchor import AnchorStats
from rlsedit_cli.validate import check

from .conftest import (
    ARCHS,
    TINY_BUNDLE,
    compose_cfg,
    rls_closed_form,
    shared,
    target_cfg,
    tiny_overrides,
)

EDITORS = ["rlsedit", "memit", "alphaedit", "rome", "ft"]
# hyper-parameters for random 2-layer models (the published ones are for real models)
RANDOM_MODEL = {
    "rlsedit": ["editor.lam=1", "editor.mu=1", "editor.n_anchor=10"],
    "memit": ["editor.n_anchor=10"],
    "alphaedit": ["editor.threshold=0.1", "editor.l2=1"],
    "rome": [],
    "ft": ["editor.norm_constraint=null", "editor.lr=1e-2", "editor.steps=40",
           "editor.layer=${model.single_layer}"],
}
FAST_TARGET = ["editor.target.context_templates=[[5,5]]", "editor.target.steps=25"]


@pytest.fixture(scope="module")
def toy_records():
    return load_toy(str(TINY_BUNDLE)).records


def anchor_of(handle, cfg, tmp_path) -> AnchorStats:
    return AnchorStats(handle, tmp_path / "cache", cfg.stats.corpus, 300, 32, 32)


def build_editor(cfg, handle, tmp_path):
    from hydra.utils import instantiate

    return instantiate(cfg.editor, _partial_=True, _convert_="all")(
        handle=handle, anchor=anchor_of(handle, cfg, tmp_path))


def efficacy(handle, records) -> float:
    return float(np.mean(probability_metrics(handle, records, 64, ("efficacy",))["efficacy"]))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("editor", EDITORS)
def test_one_batch_of_eight_edits_lands(editor, arch, tiny_models, toy_records, tmp_path):
    target = [] if editor == "ft" else FAST_TARGET
    cfg = compose_cfg([*tiny_overrides(arch, tiny_models[arch]), f"editor={editor}",
                       *RANDOM_MODEL[editor], *target])
    handle = load_model(cfg.model, torch.device("cpu"))
    # a random network has no circuit from a subject inside the prompt to its last token: the
    # prompts end with the subject, so the edit reaches the prediction through the residual
    batch = [replace(r, prompt="A fact about {}") for r in toy_records[:8]]
    editor_obj = build_editor(cfg, handle, tmp_path)
    stats = editor_obj.edit(batch)
    assert all(np.isfinite(v) for v in stats.values())
    assert efficacy(handle, batch) >= 0.9


def test_batched_targets_equal_one_at_a_time(shipped_handle, toy_records):
    cfg = target_cfg(steps=10, lr=0.5, loss_layer=3, early_stop_loss=0.0)
    templates = context_templates(shipped_handle, [[5, 5]], seed=0)
    batch = toy_records[:6]
    together = optimise_targets(shipped_handle, batch, templates, 2, cfg)
    alone = torch.cat([optimise_targets(shipped_handle, [r], templates, 2, cfg).z for r in batch])
    assert torch.allclose(together.z, alone, rtol=1e-4, atol=1e-4)
    assert (together.final_loss < together.init_loss).all()


def test_early_stopping_freezes_each_request(shipped_handle, toy_records):
    cfg = target_cfg(steps=25, lr=0.5, loss_layer=3, early_stop_loss=1.0)
    templates = context_templates(shipped_handle, [[5, 5]], seed=0)
    batch = toy_records[:6]
    together = optimise_targets(shipped_handle, batch, templates, 2, cfg)
    alone = [optimise_targets(shipped_handle, [r], templates, 2, cfg) for r in batch]
    assert together.steps.tolist() == [int(a.steps[0]) for a in alone]
    assert torch.allclose(together.z, torch.cat([a.z for a in alone]), rtol=1e-4, atol=1e-4)


def test_rlsedit_weights_equal_closed_form_over_the_stream(tiny_models, toy_records, tmp_path,
                                                           monkeypatch):
    cfg = compose_cfg([*tiny_overrides("gpt2", tiny_models["gpt2"]), "editor=rlsedit",
                       "editor.lam=0.5", "editor.mu=1", "editor.n_anchor=10",
                       "editor.precision=float64", *FAST_TARGET])
    handle = load_model(cfg.model, torch.device("cpu"))
    W0 = {layer: handle.weight(layer).detach().double().clone() for layer in (0, 1)}
    C = anchor_of(handle, cfg, tmp_path).moments([0, 1])  # of the unedited model, as the editor's
    seen: dict[int, list] = {0: [], 1: []}
    current = {}
    real_step = rlsedit_mod.rls_step

    def recording_step(P, W, K, V, **kwargs):
        seen[current["layer"]].append((K.clone(), V.clone()))
        return real_step(P, W, K, V, **kwargs)

    monkeypatch.setattr(rlsedit_mod, "rls_step", recording_step)
    editor = build_editor(cfg, handle, tmp_path)
    real_update = editor.update_layer

    def update(layer, K, R):
        current["layer"] = layer
        return real_update(layer, K, R)

    editor.update_layer = update
    for start in range(0, 24, 6):
        editor.edit(toy_records[start : start + 6])
    for layer in (0, 1):
        Ks, Vs = zip(*seen[layer])
        assert len(Ks) == 4
        W = rls_closed_form(W0[layer], C[layer].double(), 0.5, 1.0, 10.0, list(Ks), list(Vs))
        assert float((editor.W[layer] - W).norm() / W.norm()) < 1e-8
        assert torch.allclose(handle.weight(layer).double(), W, rtol=1e-5, atol=1e-5)


def test_reset_each_batch_forgets_the_history(tiny_models, toy_records, tmp_path):
    weights = {}
    for reset in (False, True):
        cfg = compose_cfg([*tiny_overrides("gpt2", tiny_models["gpt2"]), "editor=rlsedit",
                           "editor.n_anchor=10", f"editor.reset_each_batch={reset}",
                           *FAST_TARGET])
        handle = load_model(cfg.model, torch.device("cpu"))
        editor = build_editor(cfg, handle, tmp_path)
        for start in (0, 6, 12):
            stats = editor.edit(toy_records[start : start + 6])
        assert stats["layer1/residual"] >= 0
        weights[reset] = handle.weight(1).detach().clone()
    assert not torch.allclose(weights[False], weights[True])


def test_editor_layers_out_of_range_and_bad_values(tiny_models, tmp_path):
    base = tiny_overrides("gpt2", tiny_models["gpt2"])
    handle = load_model(compose_cfg(base).model, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"editor.layers=\[0, 7\] has layer 7 out of range"):
        build_editor(compose_cfg([*base, "editor=memit", "editor.layers=[0,7]"]), handle, tmp_path)
    with pytest.raises(ConfigError, match="editor.lam=-1.0 must not be negative"):
        check(compose_cfg([*base, "editor=rlsedit", "editor.lam=-1"]))
    with pytest.raises(ConfigError, match="editor.mu=nan must be a finite number"):
        check(compose_cfg([*base, "editor=rlsedit", "editor.mu=nan"]))
    with pytest.raises(ConfigError, match="editor.precision='half' must be float32 or float64"):
        check(compose_cfg([*base, "editor=rlsedit", "editor.precision=half"]))
    with pytest.raises(ConfigError, match="editor.threshold=0.0 must be above 0"):
        check(compose_cfg([*base, "editor=alphaedit", "editor.threshold=0"]))
    with pytest.raises(ConfigError, match="editor.norm_constraint=-1.0 must be above 0"):
        check(compose_cfg([*base, "editor=ft", "editor.norm_constraint=-1"]))


@pytest.mark.parametrize("editor", ["rlsedit", "memit", "alphaedit"])
def test_hundred_edits_on_the_shipped_model(editor, make_cfg):
    summary = run(make_cfg(f"editor={editor}", "stream.num_edits=100", "stream.batch_size=10",
                           "measure.fluency=false", "measure.pre_edit=false",
                           "measure.retention_every=0"))
    assert summary["efficacy"] >= 90.0


@pytest.mark.parametrize("editor", EDITORS)
def test_cli_run_every_editor_on_the_default_model(editor, make_cfg):
    """The default run (toy model, smoke general-ability task) end to end: the edits take, the
    neighbours of the edited facts keep (FT, unconstrained, is known not to), every file is
    written."""
    cfg = make_cfg(f"editor={editor}", "stream.num_edits=4", "stream.batch_size=2",
                   "measure.generation_prompts=1", "measure.max_length=10")
    summary = run(cfg)
    pre = summary["pre"]
    assert summary["editor"] == editor and pre["efficacy"] == 0.0
    assert summary["efficacy"] == 100.0 and summary["generalization"] >= 75.0
    if editor != "ft":  # MEMIT, its KL term read at the subject as in compute_z.py, loses
        # 17.5 points here (RLSEdit and AlphaEdit none): a bound, not a tuned figure
        assert summary["specificity"] >= pre["specificity"] - 20.0
    assert summary["fluency"] > 0 and summary["general"]["rlsedit_smoke/acc"] > 0
    folder = Path(cfg.paths.run_dir)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in rows] == [0, 1] and rows[-1]["edits"] == 4
    assert (folder / "retention.csv").read_text().count("\n") >= 2
    assert any(p.stat().st_size > 0 for p in (folder / "plots").glob("*.png"))


def plain_forward_with_delta(handle, batch, templates, z_layer, delta):
    """(NLL, KL to the unedited model) per request, by the loss's plain definition."""
    with torch.no_grad():
        nll, logp = plain_target_loss(handle, batch, templates, z_layer, delta)
        init = plain_target_loss(handle, batch, ["{}"], z_layer, torch.zeros_like(delta))[1]
    return nll, kl_divergence(logp, init)


def plain_forward_loss(handle, batch, templates) -> torch.Tensor:
    """Mean target NLL over the templates per request, from one full forward per prompt."""
    d_model = handle.weight_shape(0)[0]
    zero = torch.zeros(len(batch), d_model, device=handle.device)
    return plain_forward_with_delta(handle, batch, templates, 0, zero)[0]


CONTEXTS = ["{}", "A much longer context than the others. {}", "Short. {}"]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fast_target_loss_equals_its_plain_definition(arch, tiny_models, toy_records):
    """TargetLoss (cached prefixes, replayed blocks, MLPs cut to the positions that count)
    against editing/reference.py, at delta 0 and then at two deltas on replayed blocks."""
    cfg = compose_cfg(tiny_overrides(arch, tiny_models[arch]))
    handle = load_model(cfg.model, torch.device("cpu"))
    batch = [toy_records[0], replace(toy_records[1], prompt="A fact about {}"), toy_records[2]]
    fast = TargetLoss(handle, batch, CONTEXTS, 0, 2)
    torch.manual_seed(0)
    d_model = handle.weight_shape(0)[0]
    with torch.no_grad():
        for scale in (0.0, 1.0, 3.0):
            delta = scale * torch.randn(len(batch), d_model)
            nll, logp = fast(delta)
            ref_nll, ref_logp = plain_target_loss(handle, batch, CONTEXTS, 0, delta)
            assert torch.allclose(nll, ref_nll, rtol=1e-4, atol=1e-4), scale
            assert torch.allclose(logp, ref_logp, rtol=1e-4, atol=1e-4), scale
            # the references' way (one padded full forward) computes the same
            full_nll, full_logp = FullForwardLoss(handle, batch, CONTEXTS, 0, 2)(delta)
            assert torch.allclose(full_nll, ref_nll, rtol=1e-4, atol=1e-4), scale
            assert torch.allclose(full_logp, ref_logp, rtol=1e-4, atol=1e-4), scale


@pytest.mark.accelerated
def test_grouped_kv_heads_go_to_torch_as_they_are_on_the_cpu(tiny_models, toy_records,
                                                            monkeypatch):
    """Padded rows on a GQA model (the tiny Llama: 4 query heads, 2 key/value heads): inside
    forward_until torch's SDPA gets the grouped heads (enable_gqa) and gives the same hidden
    states as transformers' default (heads repeated); the switch is gone afterwards."""
    import os

    from rlsedit_cli.accel.attention import FORCE_GQA
    from rlsedit_cli.editing.inputs import build_rows, forward_until
    from rlsedit_cli.models.handle import block_hidden

    cfg = compose_cfg(tiny_overrides("llama", tiny_models["llama"]))
    handle = load_model(cfg.model, torch.device("cpu"))
    rows = build_rows(handle, [(c, r.subject, [], 0) for r in toy_records[:3] for c in
                               (r.prompt, "A much longer context than the others. " + r.prompt)])
    assert (rows.mask == 0).any()  # padded: transformers passes a mask
    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("enable_gqa", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.delenv(FORCE_GQA, raising=False)
    out = []

    def keep(module, args, output):
        out.append(block_hidden(output))

    forward_until(handle, rows.inputs, 2, [(handle.layer_module(2), "post", keep)])
    assert seen and all(seen) and FORCE_GQA not in os.environ
    seen.clear()
    hook = handle.layer_module(2).register_forward_hook(keep)
    with torch.no_grad():
        handle.model(**rows.inputs)  # transformers' default: heads repeated, no enable_gqa
    hook.remove()
    assert seen and not any(seen)
    real = rows.mask.bool()
    assert torch.allclose(out[0][real], out[1][real], atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_last_step_loss_and_kl_match_a_plain_forward(arch, tiny_models, toy_records):
    """After steps with replayed blocks and MLPs cut to the positions that count, the NLL and
    KL the optimisation reports equal a plain full forward's with its final delta."""
    cfg = compose_cfg(tiny_overrides(arch, tiny_models[arch]))
    handle = load_model(cfg.model, torch.device("cpu"))
    batch = [toy_records[0], replace(toy_records[1], prompt="A fact about {}"), toy_records[2]]
    tcfg = target_cfg(steps=4, lr=0.5, loss_layer=2, early_stop_loss=0.0)
    result = optimise_targets(handle, batch, CONTEXTS, 0, tcfg)
    delta = result.z - optimise_targets(handle, batch, CONTEXTS, 0,
                                    replace(tcfg, steps=1)).z  # steps=1: delta stays 0
    nll, kl = plain_forward_with_delta(handle, batch, CONTEXTS, 0, delta)
    assert (kl > 1e-4).all()  # the delta moved the KL prompt's distribution
    assert torch.allclose(result.final_loss, nll, rtol=1e-4, atol=1e-4)
    assert torch.allclose(result.final_kl, kl, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("contexts", [CONTEXTS, ["{}"]])
def test_cached_prefix_without_bos_token(contexts, tmp_path, toy_records):
    """GPT-2's own tokenizer adds no BOS: a prompt that starts with a one-token subject has an
    empty prefix (alone, or beside rows that have one); the loss must still be the plain one."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(shared("gpt2-tokenizer"))
    tok.eos_token = "<|endoftext|>"  # as on the hub; the shared copy has no tokenizer_config
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=64,
                               initializer_range=0.1)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    cfg = compose_cfg(tiny_overrides("gpt2", tmp_path / "gpt2"))
    handle = load_model(cfg.model, torch.device("cpu"))
    batch = [replace(toy_records[0], subject="Paris", prompt="{} is the capital of"),
             replace(toy_records[1], subject="Rome", prompt="{} lies in")]
    assert handle.tok("Paris")["input_ids"] == [40313]  # one token, nothing before it
    tcfg = target_cfg(steps=2, lr=0.5, loss_layer=2, early_stop_loss=0.0)
    got = optimise_targets(handle, batch, contexts, 1, tcfg).init_loss
    assert torch.allclose(got, plain_forward_loss(handle, batch, contexts), rtol=1e-4, atol=1e-4)


def test_replayed_blocks_get_their_own_forward_back(shipped_handle, toy_records):
    """Blocks 0..z_layer are replayed during the optimisation; afterwards each has its forward
    back, including an instance-level one such as accelerate installs under device_map."""
    block0, block1 = shipped_handle.layer_module(0), shipped_handle.layer_module(1)
    calls = []

    def wrapped(*args, **kwargs):  # what accelerate's hooks look like: an instance attribute
        calls.append(1)
        return type(block0).forward(block0, *args, **kwargs)

    block0.forward = wrapped
    try:
        cfg = target_cfg(steps=3, lr=0.5, loss_layer=3, early_stop_loss=0.0)
        optimise_targets(shipped_handle, toy_records[:2], ["{}"], 1, cfg, loss=TargetLoss)
        assert len(calls) == 2  # the prefix pass and the first step; then replayed
        assert block0.__dict__["forward"] is wrapped and "forward" not in block1.__dict__
    finally:
        del block0.forward


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_targets_on_cuda_match_the_plain_forward_and_one_at_a_time(toy_records):
    cfg = compose_cfg(["device=cuda"])
    handle = load_model(cfg.model, torch.device("cuda"))
    batch = [toy_records[0], replace(toy_records[1], prompt="A fact about {}"), toy_records[2]]
    tcfg = target_cfg(steps=10, lr=0.5, loss_layer=3, early_stop_loss=0.0)
    together = optimise_targets(handle, batch, CONTEXTS, 1, tcfg)
    want = plain_forward_loss(handle, batch, CONTEXTS).to(together.init_loss.device)
    assert torch.allclose(together.init_loss, want, rtol=1e-4, atol=1e-4)
    alone = torch.cat([optimise_targets(handle, [r], CONTEXTS, 1, tcfg).z for r in batch])
    assert torch.allclose(together.z, alone, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_default_run_on_cuda_edits(make_cfg):
    summary = run(make_cfg("device=cuda", "eval=none", "stream.num_edits=40",
                           "stream.batch_size=10"))
    assert summary["device"].startswith("cuda") and summary["efficacy"] >= 85


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("editor", ["rlsedit", "memit", "alphaedit", "rome", "ft", "ft_m"])
def test_every_editor_makes_the_same_edits_on_cuda_as_on_the_cpu(editor, tmp_path):
    """The same 20 edits on both devices: the figures agree to within rounding-level noise."""
    common = [f"editor={editor}", "eval=none", "stream.num_edits=20", "stream.batch_size=10",
              "measure.fluency=false", "measure.pre_edit=false"]
    cpu = run(compose_cfg(["device=cpu", *common], tmp_path / "cpu"))
    gpu = run(compose_cfg(["device=cuda", *common], tmp_path / "cuda"))
    assert gpu["device"].startswith("cuda")
    for key in ("efficacy", "generalization", "specificity"):
        assert gpu[key] == pytest.approx(cpu[key], abs=10.0), key


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_each_layer_writes_what_the_layers_below_left(arch, tiny_models, toy_records):
    """Layer by layer, the residual is z minus the hidden state read AFTER the lower layers were
    written: with near-exact least squares (lam tiny, mu 0) and the plain prompt only, the last
    edited layer then lands the hidden state on z. A stale h (read once, before any layer was
    written) would overshoot by the lower layers' effect."""
    from rlsedit_cli.editors.rlsedit import RLSEdit

    from .conftest import keys_and_hidden

    cfg = compose_cfg(tiny_overrides(arch, tiny_models[arch]))
    handle = load_model(cfg.model, torch.device("cpu"))
    batch = toy_records[:3]
    target = target_cfg(steps=10, lr=0.5, loss_layer=2, early_stop_loss=0.0,
                          context_templates=[])
    z = optimise_targets(handle, batch, ["{}"], 1, target).z
    h_before = keys_and_hidden(handle, batch, ["{}"], 1, 1)[1]
    editor = RLSEdit(handle, None, layers=[0, 1], lam=1e-9, mu=0.0, n_anchor=0.0,
                     precision="float64", target=target)
    editor.edit(batch)
    h_after = keys_and_hidden(handle, batch, ["{}"], 1, 1)[1]
    assert (z - h_before).norm() > 0.1
    assert torch.allclose(h_after, z, atol=1e-3 * float(z.norm(dim=-1).max()))


def test_rlsedit_in_float32_keeps_w0_apart_from_the_weights_it_updates(make_cfg, toy_records):
    """The update runs in place: W_0 (the objective terms' reference) must not be the same
    tensor as the master W when the model and editor.precision are both float32."""
    from rlsedit_cli.runner.terms import ObjectiveTerms

    cfg = make_cfg("editor=rlsedit", "editor.precision=float32", *FAST_TARGET)
    handle = load_model(cfg.model, torch.device("cpu"))
    original = handle.weight(1).detach().clone()
    terms = ObjectiveTerms(handle, [1], {})
    editor = build_editor(cfg, handle, Path(cfg.paths.cache))
    assert editor.W[1].data_ptr() != handle.weight(1).data_ptr()
    editor.edit(toy_records[:4])
    row = terms.after_batch(editor.written())
    assert torch.equal(terms.W0[1], original) and row["layer1/drift"] > 0
