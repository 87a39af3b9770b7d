"""The accelerations as a whole: a run with every one off (the plain paths) gives the figures and
maps of a run with all on, on the shipped GPT-2 in float32 and on a tiny Llama (grouped key/value
heads) in bfloat16; each switch is where it says; bad names are one line. Each acceleration's
own equality test sits beside its subject (test_speed.py, test_editors.py, test_measurement.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlsedit_cli.accel import ACCELERATIONS, Accelerations
from rlsedit_cli.datasets.toy import load as load_toy
from rlsedit_cli.errors import ConfigError
from rlsedit_cli.eval.scoring import completion_nll, completion_top1
from rlsedit_cli.runner.run import run

from .conftest import TINY_BUNDLE, compose_cfg, tiny_overrides

RUN = ["editor=rlsedit", "eval=none", "measure.fluency=false", "stream.num_edits=16",
       "stream.batch_size=8", "measure.retention_every=0"]
FIGURES = ("efficacy", "generalization", "specificity")


def _maps(folder):
    return load_file(folder / "final_maps.safetensors")


def _gaps(on, off, base: dict, name: str) -> dict:
    """Per edited map: ||off - on|| / ||on - W0|| (the gap as a share of the edit)."""
    gaps = {}
    for layer, weight in _maps(on).items():
        w0 = base[name.format(layer)]
        w0 = w0.T if w0.shape != weight.shape else w0  # GPT-2's Conv1D stores W transposed
        gaps[layer] = float((_maps(off)[layer] - weight).norm() / (weight - w0).norm())
    return gaps


def test_a_run_without_accelerations_gives_the_same_figures_and_maps(tmp_path):
    on = run(compose_cfg(RUN, tmp_path / "on"))
    off = run(compose_cfg([*RUN, "speed.accelerations=[]"], tmp_path / "off"))
    for key in FIGURES:
        assert off[key] == on[key], key
        assert off[f"{key}_magnitude"] == pytest.approx(on[f"{key}_magnitude"], abs=1e-3), key
    base = load_file(TINY_BUNDLE / "model.safetensors")
    gaps = _gaps(tmp_path / "on", tmp_path / "off", base, "transformer.h.{}.mlp.c_proj.weight")
    assert gaps and max(gaps.values()) < 1e-3, gaps
    summary = json.loads((tmp_path / "off" / "summary.json").read_text())
    assert summary["speed"]["accelerations"] == []
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["speed"]["accelerations"] == sorted(ACCELERATIONS)


def test_bfloat16_llama_run_without_accelerations_is_within_bfloat16_rounding(tmp_path,
                                                                              tiny_models):
    """The tiny Llama (grouped key/value heads: gqa_passthrough, grouped_attention) with the
    target step, keys and measuring in bfloat16 (lowered_weights, float32_attention): the plain
    path runs autocast alone, so attention rounds to bfloat16 there: the edits stay within 10%
    of each other (2% measured), the efficacy counts within one edit."""
    common = [*RUN, *tiny_overrides("llama", tiny_models["llama"]),
              "editor.target.compute_dtype=bfloat16",
              "editor.target.keys_dtype=bfloat16", "measure.compute_dtype=bfloat16"]
    on = run(compose_cfg(common, tmp_path / "on"))
    off = run(compose_cfg([*common, "speed.accelerations=[]"], tmp_path / "off"))
    assert abs(off["efficacy"] - on["efficacy"]) <= 100 / 16 + 1e-9
    base = load_file(tiny_models["llama"] / "model.safetensors")
    gaps = _gaps(tmp_path / "on", tmp_path / "off", base, "model.layers.{}.mlp.down_proj.weight")
    assert gaps and max(gaps.values()) < 0.1, gaps


@pytest.mark.accelerated
def test_each_acceleration_serves_its_devices_only():
    every = Accelerations()
    assert all(every.on(name, "cpu") for name in ACCELERATIONS)
    assert {n for n in ACCELERATIONS if every.on(n, torch.device("cuda", 0))} == {
        "target_loss", "replayed_blocks", "shared_prompts", "unedited_blocks",
        "lowered_weights"}
    assert not any(Accelerations.parse([]).on(n, "cpu") for n in ACCELERATIONS)
    some = Accelerations.parse(["target_loss", "lowered_weights"])
    assert {n for n in ACCELERATIONS if some.on(n, "cpu")} == {"target_loss", "lowered_weights"}
    assert Accelerations.parse(["all"]) == every


def test_an_unknown_acceleration_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="speed.accelerations names 'fast_math': use all"):
        run(compose_cfg([*RUN, "speed.accelerations=[fast_math]"], tmp_path / "run"))
    assert not (tmp_path / "run" / "summary.json").exists()


def test_prompts_run_once_score_as_each_pair_run_whole(shipped_handle):
    """shared_prompts against its plain path (each pair whole) on real toy records, targets of
    one and of several tokens."""
    records = load_toy(str(TINY_BUNDLE)).records[:12]
    pairs = [(r.prompt.format(r.subject), t) for r in records
             for t in (r.target_new, r.target_true, r.target_new + " and more words")]
    model, tok = shipped_handle.model, shipped_handle.tok
    for score in (completion_nll, completion_top1):
        shared = score(model, tok, pairs, 8, shared=True)
        whole = score(model, tok, pairs, 8, shared=False)
        assert torch.allclose(shared, whole, rtol=1e-4, atol=1e-5), score.__name__
