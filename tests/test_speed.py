"""The editing shortcuts that must not change a figure (a request's rows leave the target step
once it stopped; the tokens a context template puts before every prompt run once; keys read
layer after layer replay the unchanged blocks below; AlphaEdit's keys of all layers from one
pass), and the bfloat16 target step (a named setting: close, not equal)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from rlsedit_cli.accel.prefix import build_split_rows, prefix_cache
from rlsedit_cli.accel.target_loss import TargetLoss
from rlsedit_cli.datasets.toy import load as load_toy
from rlsedit_cli.editing.keys import LayerKeys, keys_of_layers
from rlsedit_cli.editing.targets import optimise_targets
from rlsedit_cli.models.loader import load_model

from .conftest import (
    TINY_BUNDLE,
    compose_cfg,
    keys_and_hidden,
    target_cfg,
    tiny_overrides,
    without,
)

CONTEXTS = ["{}", "A much longer context than the others. {}", "Short. {}"]


class EveryRowLoss(TargetLoss):
    """TargetLoss computing every request at every step (as before compaction)."""

    keep = property()  # hasattr(loss, "keep") is false: the optimiser does not compact


@pytest.fixture(scope="module")
def toy_records():
    return load_toy(str(TINY_BUNDLE)).records


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request, tiny_models):
    cfg = compose_cfg(tiny_overrides(request.param, tiny_models[request.param]))
    return load_model(cfg.model, torch.device("cpu"))


def test_stopped_requests_leave_the_step_without_changing_any_target(shipped_handle,
                                                                    toy_records):
    """With a stop that fires at different steps (ENCORE's, and the references' threshold set
    where some requests cross it; the shipped tiny GPT-2), the compacting optimisation ends
    where computing every row at every step ends."""
    batch = toy_records[:6]
    for stop in ({"stop_when_top1": True}, {"early_stop_loss": 3.0}, {"stop_below_nll": 2.5}):
        cfg = target_cfg(steps=12, loss_layer=2, **stop)
        fast = optimise_targets(shipped_handle, batch, CONTEXTS, 1, cfg, loss=TargetLoss)
        full = optimise_targets(shipped_handle, batch, CONTEXTS, 1, cfg, loss=EveryRowLoss)
        assert len(set(fast.steps.tolist())) > 1, stop  # the requests stopped apart
        assert torch.equal(fast.steps, full.steps), stop
        assert torch.allclose(fast.z, full.z, rtol=1e-5, atol=1e-5), stop
        assert torch.allclose(fast.final_loss, full.final_loss, rtol=1e-4, atol=1e-5), stop


def test_context_prefixes_shared_by_a_chunk_run_once_with_the_same_keys_and_values(
        tiny, toy_records):
    """The rows of one context template start with its tokens: they run once per template and
    are copied to its rows; the cache equals the one from running every row whole, on GPT-2's
    and Llama's position and mask handling, with rows that share nothing beside them ("{}"), and
    when every prefix is shared whole (the same request twice: nothing left to run after)."""
    for records in (toy_records[:3], [toy_records[0]] * 2):
        items = [(c.replace("{}", r.prompt), r.subject, [], i)
                 for i, r in enumerate(records) for c in CONTEXTS]
        groups = [j for _ in records for j in range(len(CONTEXTS))]
        shared, plain = build_split_rows(tiny, items, groups), build_split_rows(tiny, items)
        assert shared.shared is not None and plain.shared is None
        long_context = tiny.tok("A much longer context than the")["input_ids"]
        assert shared.shared.cols >= len(long_context)
        real_shared, real_plain = shared.prefix_mask.bool(), plain.prefix_mask.bool()
        assert torch.equal(shared.prefix_ids[real_shared], plain.prefix_ids[real_plain])
        assert torch.equal(shared.prefix_pos[real_shared], plain.prefix_pos[real_plain])
        got, want = prefix_cache(tiny, shared, 1).kv, prefix_cache(tiny, plain, 1).kv
        for (k, v), (k0, v0) in zip(got[:2], want[:2]):  # (N, heads, P, d): the real columns
            for row in range(len(items)):
                for a, b in ((k, k0), (v, v0)):
                    assert torch.allclose(a[row][:, real_shared[row]],
                                          b[row][:, real_plain[row]], atol=1e-5), row
    assert (shared.shared.rep >= 0).all()  # all shared whole
    assert torch.equal(shared.prefix_mask[:, shared.shared.cols:].sum(1),
                       torch.zeros(len(items), dtype=torch.long))


def test_shared_context_prefixes_leave_every_target_as_it_was(tiny, toy_records):
    """The whole optimisation (with stops firing apart) ends at the same steps and targets with
    the templates' tokens run once per chunk as with every row's prefix run whole."""
    cfg = target_cfg(steps=10, loss_layer=2, stop_below_nll=2.5)
    batch = toy_records[:6]
    shared = optimise_targets(tiny, batch, CONTEXTS, 1, cfg, loss=TargetLoss)
    whole = optimise_targets(tiny, batch, CONTEXTS, 1, cfg,
                             loss=partial(TargetLoss, share_prefixes=False))
    assert torch.equal(shared.steps, whole.steps)
    assert torch.allclose(shared.z, whole.z, rtol=1e-5, atol=1e-5)
    assert torch.allclose(shared.final_loss, whole.final_loss, rtol=1e-4, atol=1e-5)


def test_keys_read_layer_after_layer_equal_full_passes(tiny, toy_records):
    """LayerKeys replays the blocks below the layer written last: after each write, its keys
    and h equal a fresh full pass's, to the bit."""
    batch = toy_records[:4]
    layers = [0, 1, 2]
    reader = LayerKeys(tiny, batch, CONTEXTS, 2)
    torch.manual_seed(0)
    for layer in layers:
        K, h = reader.read(layer)
        K_ref, h_ref = keys_and_hidden(tiny, batch, CONTEXTS, layer, 2)
        assert torch.equal(K, K_ref) and torch.equal(h, h_ref), layer
        W = tiny.weight(layer)
        tiny.set_weight(layer, W + 0.05 * torch.randn_like(W))  # the editor writes the layer
    keys = keys_of_layers(tiny, batch, CONTEXTS, layers)
    for layer in layers:
        assert torch.equal(keys[layer], keys_and_hidden(tiny, batch, CONTEXTS, layer, 2)[0])


def test_bfloat16_key_passes_are_close_to_float32(tiny, toy_records):
    """keys_dtype=bfloat16: the key passes' products in bfloat16; keys and h float32, within a
    few percent of the float32 passes, read layer after layer as the editors read them."""
    batch = toy_records[:4]
    exact, low = LayerKeys(tiny, batch, CONTEXTS, 2), LayerKeys(tiny, batch, CONTEXTS, 2,
                                                                 "bfloat16")
    for layer in (0, 1):
        (K, h), (K_low, h_low) = exact.read(layer), low.read(layer)
        assert K_low.dtype == h_low.dtype == torch.float32
        for a, b in ((K, K_low), (h, h_low)):
            gap = float((a - b).norm() / a.norm())
            assert 0 < gap < 0.05, (layer, gap)


@pytest.mark.accelerated
def test_bfloat16_target_step_is_close_and_keeps_attention_in_float32(tiny, toy_records):
    """compute_dtype=bfloat16: the blocks' products in bfloat16, torch's attention on float32
    inputs, targets within 10% of float32's (random tiny models)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):  # sees the kernels torch runs, below autocast and autograd
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__:
                seen.append(args[0].dtype)
            if func.__name__.startswith("mm"):
                seen_mm.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    seen_mm = []
    batch = toy_records[:4]
    exact = optimise_targets(tiny, batch, CONTEXTS, 1, target_cfg(steps=8, loss_layer=2))
    with Spy():
        low = optimise_targets(tiny, batch, CONTEXTS, 1,
                               target_cfg(steps=8, loss_layer=2, compute_dtype="bfloat16"))
    assert torch.bfloat16 in seen_mm
    assert seen and set(seen) == {torch.float32}
    assert low.z.dtype == torch.float32
    gap = float((low.z - exact.z).norm() / exact.z.norm())
    assert 0 < gap < 0.1  # random 2-layer models; SmolLM2: docs/benchmarks.md


@pytest.mark.accelerated
def test_linear_weights_lowered_once_give_the_same_bfloat16_passes(tiny):
    """Measuring passes in bfloat16 with the linear maps' weights cast once (LoweredLinears)
    produce exactly autocast's logits and greedy tokens; afterwards every map holds its own
    float32 weight again, GPT-2's head still tied to its embedding."""
    from rlsedit_cli.accel.precision import LoweredLinears, compute_dtype

    model = tiny.model
    before = {name: p for name, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (3, 9),
                        generator=torch.Generator().manual_seed(0))

    def passes():
        logits = model(input_ids=ids).logits
        tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                do_sample=False, max_new_tokens=5, min_new_tokens=5,
                                pad_token_id=0)
        return logits, tokens

    with torch.no_grad(), compute_dtype(tiny, "bfloat16"):
        plain = passes()
        with LoweredLinears(tiny, [model], "bfloat16").swapped():
            assert model.get_output_embeddings().weight.dtype == torch.bfloat16
            assert model.get_input_embeddings().weight.dtype == torch.float32
            lowered = passes()
    assert torch.equal(plain[0], lowered[0]) and torch.equal(plain[1], lowered[1])
    assert all(p is before[name] for name, p in model.named_parameters())
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.accelerated
def test_every_parameter_lowered_runs_the_whole_pass_in_bfloat16(tiny):
    """LoweredLinears(every=True), the measuring passes of eval.compute_dtype=bfloat16: every
    float32 parameter (norms, embeddings) held in bfloat16 inside the block, a tied head and
    embedding sharing one copy; the hidden states are bfloat16, the logits close to float32's;
    afterwards the model holds its own float32 parameters again."""
    from rlsedit_cli.accel.precision import LoweredLinears, compute_dtype

    model = tiny.model
    before = {name: p for name, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (3, 9),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(input_ids=ids).logits
        with compute_dtype(tiny, "bfloat16"), LoweredLinears(tiny, [model], "bfloat16",
                                                             every=True).swapped():
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
            if model.config.tie_word_embeddings:
                assert (model.get_output_embeddings().weight
                        is model.get_input_embeddings().weight)
            out = model(input_ids=ids, output_hidden_states=True)
    assert out.hidden_states[-1].dtype == torch.bfloat16
    assert 0 < (out.logits.float() - exact).abs().max() < 0.1
    assert all(p is before[name] and p.dtype == torch.float32
               for name, p in model.named_parameters())


@pytest.mark.accelerated
def test_bfloat16_target_step_with_weights_lowered_once_gives_autocasts_targets(tiny,
                                                                               toy_records):
    """The bfloat16 target step holds the blocks' and the LM head's weights cast once: the same
    targets, bit for bit, as autocast casting them at every pass; afterwards every parameter is
    the model's own again (GPT-2's head tied to its embedding)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    head_shape = tuple(tiny.model.get_output_embeddings().weight.shape)  # (vocab, d_model)
    head_casts = []

    class Spy(TorchDispatchMode):  # counts the casts of the head's weight to bfloat16
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.startswith("_to_copy") and tuple(args[0].shape) == head_shape:
                head_casts.append(out.dtype)
            return out

    before = {name: p for name, p in tiny.model.named_parameters()}
    cfg = target_cfg(steps=6, loss_layer=2, compute_dtype="bfloat16")
    with Spy():
        once = optimise_targets(tiny, toy_records[:4], CONTEXTS, 1, cfg, loss=TargetLoss)
    cast_once = len(head_casts)
    with Spy():
        every = optimise_targets(without(tiny, "lowered_weights"), toy_records[:4], CONTEXTS, 1,
                                 cfg, loss=TargetLoss)
    assert torch.equal(once.z, every.z) and torch.equal(once.steps, every.steps)
    # once: when the loss is made; without lowered_weights: one per pass (6)
    assert (cast_once, len(head_casts) - cast_once) == (1, 6)
    assert all(p is before[name] for name, p in tiny.model.named_parameters())
    model = tiny.model
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_grouped_attention_equals_torchs_kernel_and_its_gradients(heads, mask_kind):
    """grouped_attention (the target step's short queries on the CPU) gives torch's
    scaled_dot_product_attention (enable_gqa) and its gradients within float32 rounding:
    grouped and plain heads; a padding mask, an additive mask, none."""
    from rlsedit_cli.accel.attention import grouped_attention

    hq, hkv = heads
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, s, 8, generator=gen, requires_grad=True)
               for h, s in ((hq, 4), (hkv, 7), (hkv, 7)))
    keep = torch.ones(3, 1, 4, 7, dtype=torch.bool).tril(3)  # causal over a 3-token prefix
    keep[1, :, :, :2] = False  # a row whose first two keys are padding
    mask = {"bool": keep, "none": None,
            "float": torch.zeros(3, 1, 4, 7).masked_fill(~keep, torch.finfo(torch.float32).min)
            }[mask_kind]
    ours = grouped_attention(q, k, v, mask, scale=0.3)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                              scale=0.3, enable_gqa=True)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-6)
    up = torch.randn(ours.shape, generator=gen)
    mine = torch.autograd.grad((ours * up).sum(), (q, k, v))
    ref = torch.autograd.grad((theirs * up).sum(), (q, k, v))
    for a, b in zip(mine, ref):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.accelerated
def test_bfloat16_target_step_takes_grouped_attention_for_its_short_queries(tiny, toy_records,
                                                                           monkeypatch):
    """The bfloat16 target step's suffixes go through grouped_attention (no torch attention
    kernel is called), and its targets stay within bfloat16 rounding of the kernel's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import rlsedit_cli.accel.precision as precision

    kernels, grouped_calls = [], []
    plain = precision.grouped_attention
    monkeypatch.setattr(precision, "grouped_attention",
                        lambda *a, **k: grouped_calls.append(1) or plain(*a, **k))

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__:
                kernels.append(func.__name__)
            return func(*args, **(kwargs or {}))

    cfg = target_cfg(steps=6, loss_layer=2, compute_dtype="bfloat16")
    loss = TargetLoss(tiny, toy_records[:4], CONTEXTS, 1, 2, dtype="bfloat16")
    delta = torch.zeros(4, tiny.weight_shape(1)[0], requires_grad=True)
    loss(delta)  # the first call records blocks 0..1; later calls are the steps
    grouped_calls.clear()
    with Spy():
        nll, _ = loss(delta)
        nll.sum().backward()
    assert kernels == [] and len(grouped_calls) == 1  # block 2, the one block above block 1
    grouped = optimise_targets(tiny, toy_records[:4], CONTEXTS, 1, cfg, loss=TargetLoss)
    kernel = optimise_targets(without(tiny, "grouped_attention"), toy_records[:4], CONTEXTS, 1,
                              cfg, loss=TargetLoss)  # every query to torch's kernel
    gap = float((grouped.z - kernel.z).norm() / kernel.z.norm())
    assert gap < 0.02, gap
