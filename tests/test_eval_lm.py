"""The continuation-only scoring path equals lm-eval's own, for every request type it issues."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from rlsedit_cli.eval.lm import EditedLM
from rlsedit_cli.models.loader import load_model

from .conftest import compose_cfg, tiny_overrides


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def handle(request, tiny_models):
    cfg = compose_cfg(tiny_overrides(request.param, tiny_models[request.param]))
    return load_model(cfg.model, torch.device("cpu"))


def _requests(handle, n: int = 24) -> list:
    """(request, context, continuation) token triples: shared contexts with one-token choices,
    multi-token continuations, and contexts longer than the model's window (truncated)."""
    rng = random.Random(0)
    vocab = handle.tok.vocab_size
    out = []
    for i in range(n):
        ctx = [rng.randrange(1, vocab) for _ in range(rng.choice([3, 9, 40, 200]))]
        for k in range(1 + i % 3):
            cont = [rng.randrange(1, vocab) for _ in range(1 if i % 2 else 1 + 5 * k)]
            out.append(((f"c{i}", f"x{k}"), ctx, cont))
    return out


def test_continuation_logits_equal_lm_evals_loglikelihood(handle):
    requests = _requests(handle)
    ours = EditedLM(handle, 4, "continuation")._loglikelihood_tokens(requests)
    theirs = EditedLM(handle, 4, "all")._loglikelihood_tokens(requests)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert torch.allclose(torch.tensor([s for s, _ in ours]),
                          torch.tensor([s for s, _ in theirs]), rtol=1e-5, atol=1e-4)


def test_rolling_and_generation_equal_lm_evals(handle):
    from lm_eval.api.instance import Instance

    text = " ".join(f"w{i % 37}" for i in range(400))  # several windows of the context
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    ours = EditedLM(handle, 2, "continuation").loglikelihood_rolling(rolling)
    theirs = EditedLM(handle, 2, "all").loglikelihood_rolling(rolling)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5)
    asks = [Instance("generate_until", {}, ("w1 w2 w3", {"until": ["\n"], "max_gen_toks": 6}), 0)]
    assert (EditedLM(handle, 2, "continuation").generate_until(asks)
            == EditedLM(handle, 2, "all").generate_until(asks))


def test_bfloat16_scoring_stays_near_float32(handle):
    requests = _requests(handle, 8)
    low = EditedLM(handle, 4, "continuation", "bfloat16")._loglikelihood_tokens(requests)
    full = EditedLM(handle, 4, "continuation")._loglikelihood_tokens(requests)
    diffs = [abs(a - b) / max(1.0, abs(b)) for (a, _), (b, _) in zip(low, full)]
    assert max(diffs) < 0.05 and max(diffs) > 0  # bfloat16 rounding: close, not equal
    assert all(p.dtype == torch.float32 for p in handle.model.parameters())  # restored


class _AttentionInputs(torch.overrides.TorchFunctionMode):
    """The dtype of every query that reaches torch's attention."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.seen.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_bfloat16_attention_runs_on_bfloat16_inputs_near_float32(handle):
    """eval.attention_dtype=bfloat16: attention takes the pass's bfloat16 queries (float32 with
    the default, with the accelerations off too: the setting decides, not float32_attention),
    and the figures stay within bfloat16 rounding of the float32-attention pass."""
    import dataclasses

    from rlsedit_cli.accel import Accelerations

    requests = _requests(handle, 8)
    scores = {}
    plain = dataclasses.replace(handle, accel=Accelerations.parse([]))
    for attention, on in (("float32", handle), ("float32", plain), ("bfloat16", handle)):
        lm = EditedLM(on, 4, "continuation", "bfloat16", attention_dtype=attention)
        with _AttentionInputs() as spy:
            scores[attention] = lm._loglikelihood_tokens(requests)
        assert spy.seen == {getattr(torch, attention)}
    diffs = [abs(a - b) / max(1.0, abs(b))
             for (a, _), (b, _) in zip(scores["bfloat16"], scores["float32"])]
    assert max(diffs) < 0.05
    with pytest.raises(ValueError, match="needs compute_dtype=bfloat16"):
        EditedLM(handle, 4, "continuation", "float32", attention_dtype="bfloat16")


def test_scored_rows_equal_log_softmax_and_argmax_ties_included():
    """eval/lm.py's _scored: lm-eval's log-softmax at the target and its argmax test, in float32
    and bfloat16 logits, a tie before the target not greedy (argmax takes the first index)."""
    import torch

    from rlsedit_cli.eval.lm import _scored

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen) * 4
    target = torch.tensor([3, 7, 7, 10, 0, 49])
    logits[1, 7] = logits[1].max() + 1  # the target is the maximum
    logits[2, 7] = logits[2, 5] = logits[2].max() + 1  # tied with an earlier index
    logits[3, 10] = logits[3, 30] = logits[3].max() + 1  # tied with a later index
    for low in (logits, logits.bfloat16()):
        lp, greedy = _scored(low, target)
        want = low.float().log_softmax(-1).gather(1, target[:, None])[:, 0]
        assert torch.allclose(lp, want, atol=1e-5)
        assert greedy.tolist() == (low.argmax(-1) == target).tolist()
        assert greedy.tolist() == [False, True, False, True, False, False]
        assert lp.dtype == torch.float32 and greedy.dtype == torch.bool


@contextlib.contextmanager
def _moved(weight: torch.Tensor):
    """``weight`` moved a little for the block, then restored (the fixture's model is shared)."""
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.01)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_later_points_replay_the_unedited_blocks_bit_for_bit(handle, dtype):
    """A point after the first replays block 0 (below the edited block 1) from the first
    point's passes: shared contexts, their continuations and whole rows score exactly as
    without the record, also after an edit of block 1; an edit of block 0 starts it again."""
    from lm_eval.api.instance import Instance

    from rlsedit_cli.accel.lower import LowerStates

    requests = _requests(handle)
    rolling = [Instance("loglikelihood_rolling", {}, (" ".join(f"w{i % 37}" for i in range(300)),),
                        0)]

    def point(lower=None):
        lm = EditedLM(handle, 4, "continuation", dtype, lower)
        return lm._loglikelihood_tokens(requests), lm.loglikelihood_rolling(rolling)

    plain, lower = point(), LowerStates(1, 64)
    assert point(lower) == plain and lower.kept and lower.replayed == 0
    assert point(lower) == plain and lower.replayed > 0
    with _moved(handle.edited_module(1).weight):
        edited, replayed = point(), lower.replayed
        assert point(lower) == edited != plain and lower.replayed > replayed
    with _moved(handle.edited_module(0).weight):
        edited = point()
        assert point(lower) == edited and lower.replayed == 0  # recorded again
    none = LowerStates(1, 0)  # no memory for it: every point computes every block
    assert point(none) == point(none) == plain and not none.kept and none.replayed == 0


def test_a_run_replays_the_blocks_below_its_edits_with_the_same_figures(tmp_path):
    """FT at block 2 of the shipped toy: general ability at 0, 2 and 4 edits, the later points
    replaying blocks 0 and 1 (summary's measurement says so), every figure as without it."""
    from rlsedit_cli.accel import ACCELERATIONS
    from rlsedit_cli.runner.run import run

    common = ["editor=ft", "editor.layer=2", "editor.steps=3", "stream.num_edits=4",
              "stream.batch_size=2", "eval=wikitext", "eval.limit=1", "eval.every_edits=2",
              "measure.fluency=false", "measure.pre_edit=false", "measure.reuse_unedited=false",
              "logger=none"]
    others = ",".join(n for n in ACCELERATIONS if n != "unedited_blocks")
    replayed = run(compose_cfg(common, tmp_path / "on"))
    plain = run(compose_cfg([*common, f"speed.accelerations=[{others}]"], tmp_path / "off"))
    assert replayed["measurement"]["replayed_below"] == 2
    assert replayed["measurement"]["replayed_passes"] > 0
    assert plain["measurement"]["replayed_passes"] == 0
    assert ([p["scores"] for p in replayed["general"]["points"]]
            == [p["scores"] for p in plain["general"]["points"]])


def test_one_ulp_below_the_edits_starts_the_record_again(shipped_handle):
    """The replayed blocks' check reads their bytes: one element moved by one float step is a
    change."""
    from rlsedit_cli.accel.lower import LowerStates

    lower = LowerStates(2, 64)
    lower.check(shipped_handle)
    lower.kept["list"] = [torch.zeros(1, 1, 1)]
    lower.check(shipped_handle)
    assert "list" in lower.kept
    weight = shipped_handle.layer_module(1).mlp.c_proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf")))
    try:
        lower.check(shipped_handle)
        assert lower.kept == {}
    finally:
        with torch.no_grad():
            weight.copy_(saved)
