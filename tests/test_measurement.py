"""Measuring fast without changing a figure (the LM head only where scoring reads it; the
unedited model's figures reused across runs), and the named settings that do change what is
measured (texts of a seeded subset, texts only before and after the stream, bfloat16)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from rlsedit_cli.errors import ConfigError
from rlsedit_cli.eval.scoring import completion_nll, completion_top1
from rlsedit_cli.models.loader import load_model
from rlsedit_cli.models.tokens import encode_prompt, encode_target
from rlsedit_cli.runner.run import run
from rlsedit_cli.runner.unedited import UneditedFigures

from .conftest import compose_cfg, tiny_overrides
from .test_resume import _tmpfs

RUN = ["eval=none", "stream.num_edits=4", "stream.batch_size=2", "editor.target.steps=5",
       "measure.retention_edits=2", "measure.generation_prompts=2"]
PAIRS = [("The capital of France is", "Paris"), ("A much longer prompt about a city that", "is"),
         ("Hi", "a two word answer"), ("Water boils at", "100 degrees"),
         ("The capital of France is", "a two word answer"), ("Hi", "Paris")]  # shared prompts


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scoring_with_the_head_only_where_read_equals_the_full_logits(arch, tiny_models):
    """Prompts run once for all their targets (left-padded into a cache, then the targets'
    tokens), the head only where read, in batches: each pair's own unpadded forward's figures."""
    cfg = compose_cfg(tiny_overrides(arch, tiny_models[arch]))
    handle = load_model(cfg.model, torch.device("cpu"))
    tok, model = handle.tok, handle.model
    expect_nll, expect_top1 = [], []
    with torch.no_grad():
        for prompt, target in PAIRS:  # one unpadded full forward per pair
            p_ids, t_ids = encode_prompt(tok, prompt), encode_target(tok, target)
            logits = model(torch.tensor([p_ids + t_ids])).logits[0].float()
            at = logits[len(p_ids) - 1 : len(p_ids) - 1 + len(t_ids)]
            t = torch.tensor(t_ids)
            expect_nll.append(float(torch.nn.functional.cross_entropy(at, t)))
            expect_top1.append(float((at.argmax(-1) == t).float().mean()))
    got = completion_nll(model, tok, PAIRS, batch_size=2)
    assert torch.allclose(got, torch.tensor(expect_nll), rtol=1e-5, atol=1e-5)
    assert completion_top1(model, tok, PAIRS, batch_size=3).tolist() == expect_top1


def _cfg(tmp_path, name, cache, *extra):
    cfg = compose_cfg([*RUN, *extra], tmp_path / name)
    with open_dict(cfg):
        cfg.paths.cache = str(cache)
    return cfg


def test_a_second_run_reuses_the_unedited_figures_and_they_are_the_measured_ones(tmp_path):
    """Run A measures the figures before editing (and general ability at 0); run B, another
    editor on the same model, records and settings (general ability measured more often),
    reads them (no time spent) and says so; run C, told not to reuse them, measures the very
    same figures again."""
    cache = tmp_path / "cache"
    first = run(_cfg(tmp_path, "a", cache, "editor=rlsedit", "eval=smoke"))
    second = run(_cfg(tmp_path, "b", cache, "editor=memit", "eval=smoke",
                      "eval.every_edits=2"))  # measured more often: the same point at 0
    third = run(_cfg(tmp_path, "c", cache, "editor=memit", "eval=smoke",
                     "measure.reuse_unedited=false"))
    assert first["measure_seconds"]["pre"] > 0 and second["measure_seconds"]["pre"] == 0
    assert set(second["measurement"]["unedited_from_cache"]) == {"pre", "general"}
    assert first["measurement"]["unedited_from_cache"] == {}
    assert third["measurement"]["unedited_from_cache"] == {}
    assert first["pre"] == second["pre"] == third["pre"]
    points = [s["general"]["points"][0] for s in (first, second, third)]
    assert points[0]["scores"] == points[1]["scores"] == points[2]["scores"]
    # other records (or other settings) are not the same measurement
    other = run(_cfg(tmp_path, "d", cache, "stream.seed=1"))
    assert other["measure_seconds"]["pre"] > 0
    assert "pre" not in other["measurement"]["unedited_from_cache"]
    preset = run(_cfg(tmp_path, "e", cache, "speed=long_stream"))  # settings set by a preset
    assert preset["measure_seconds"]["pre"] > 0
    assert "pre" not in preset["measurement"]["unedited_from_cache"]


@pytest.fixture
def read_only_cache(tmp_path):
    yield from _tmpfs(tmp_path / "ro", "size=1m,ro")


def test_a_read_only_cache_costs_the_reuse_not_the_run(read_only_cache, shipped_handle,
                                                       caplog):
    figures = UneditedFigures(read_only_cache, shipped_handle.model, {"batch_size": 8}, 0,
                              "probability")
    with caplog.at_level(logging.WARNING):
        figures.put("pre", [], {"efficacy": 1.0})
    assert "not cached" in caplog.text and "paths.cache" in caplog.text
    assert figures.get("pre", []) is None


def test_texts_of_a_seeded_subset_and_only_at_the_ends(tmp_path):
    """measure.fluency_records=N: fluency from N records (the same ones at the same set);
    measure.fluency_at=ends: the retention points carry no fluency; both in summary.json."""
    cache = tmp_path / "cache"
    every = run(_cfg(tmp_path, "a", cache, "stream.num_edits=6", "stream.batch_size=2",
                     "measure.reuse_unedited=false"))
    some = run(_cfg(tmp_path, "b", cache, "stream.num_edits=6", "stream.batch_size=2",
                    "measure.fluency_records=2", "measure.fluency_at=ends",
                    "measure.reuse_unedited=false"))
    assert some["measurement"]["fluency_records"] == 2
    assert some["measurement"]["fluency_at"] == "ends"
    assert some["fluency"] is not None and some["fluency"] != every["fluency"]
    retention = [line for line in (tmp_path / "b" / "retention.csv").read_text().splitlines()]
    assert "fluency" not in retention[0] or all(
        not row.split(",")[retention[0].split(",").index("fluency")] for row in retention[1:])
    kept = [line for line in (tmp_path / "a" / "retention.csv").read_text().splitlines()]
    assert "fluency" in kept[0]


def test_greedy_answers_only_at_the_ends(tmp_path):
    """measure.generated_at=ends: efficacy_generated before and after the stream (summary.json),
    none after each batch or at the retention points; every: at each of them."""
    import json

    cache = tmp_path / "cache"
    out = {}
    for name, at in (("a", "every"), ("b", "ends")):
        out[at] = run(_cfg(tmp_path, name, cache, "stream.num_edits=4", "stream.batch_size=2",
                           f"measure.generated_at={at}", "measure.fluency=false"))
        lines = [json.loads(x) for x in
                 (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        per_batch = ["batch_efficacy_generated" in x for x in lines]
        retention = (tmp_path / name / "retention.csv").read_text().splitlines()[0]
        assert per_batch == [at == "every"] * 2 and ("efficacy_generated" in retention) == (
            at == "every")
        assert out[at]["measurement"]["generated_at"] == at
        assert out[at]["efficacy_generated"] is not None
        assert out[at]["pre"]["efficacy_generated"] is not None
    assert out["ends"]["efficacy_generated"] == out["every"]["efficacy_generated"]


def test_bfloat16_measurement_is_close_to_float32(tmp_path):
    cache = tmp_path / "cache"
    exact = run(_cfg(tmp_path, "a", cache, "measure.generation=greedy"))
    low = run(_cfg(tmp_path, "b", cache, "measure.generation=greedy",
                   "measure.compute_dtype=bfloat16"))
    assert low["measurement"]["compute_dtype"] == "bfloat16"
    for key in ("efficacy_magnitude", "specificity_magnitude"):
        assert low[key] == pytest.approx(exact[key], abs=2.0)
    assert np.isfinite(low["fluency"])


@pytest.mark.parametrize("override, message", [
    ("measure.fluency_records=0", "measure.fluency_records=0 must be at least 1"),
    ("measure.fluency_at=middle", "measure.fluency_at='middle' must be every or ends"),
    ("measure.generated_at=never", "measure.generated_at='never' must be every or ends"),
    ("measure.compute_dtype=float16", "measure.compute_dtype='float16' must be float32 or"),
    ("editor.target.compute_dtype=half", "editor.target.compute_dtype='half' must be float32"),
])
def test_bad_measurement_settings_stop_at_start(override, message, make_cfg):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        run(make_cfg(*RUN, override))


@pytest.mark.parametrize("preset", ["faithful", "long_stream", "fastest"])
def test_speed_presets_compose_with_every_editor_and_land_where_read(preset):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlsedit_cli import config

    with initialize_config_dir(config_dir=str(config.conf_dir()), version_base="1.3"):
        node = OmegaConf.to_container(compose("config", overrides=[f"speed={preset}"])["speed"])
    for editor in ("rlsedit", "memit", "alphaedit", "rome", "ft", "ft_m", "ultraedit", "none"):
        cfg = compose_cfg([f"speed={preset}", f"editor={editor}", "model=smollm2_135m"])
        assert cfg.speed.name == preset
        if "target" in cfg.editor:
            assert cfg.editor.target.compute_dtype == node["target_dtype"]
            assert cfg.editor.target.stop_when_top1 == node["stop_when_top1"]
            assert cfg.editor.target.stop_below_nll == node["stop_below_nll"]
            assert cfg.editor.target.keys_dtype == node["keys_dtype"]
        assert cfg.measure.compute_dtype == node["measure_dtype"]
        assert cfg.measure.fluency_records == node["fluency_records"]
        assert cfg.measure.fluency_at == node["fluency_at"]
        assert cfg.measure.generated_at == node["generated_at"]


def test_scoring_batches_keep_every_prompt_once_and_cap_padding():
    from rlsedit_cli.models.tokens import little_padding

    lengths = [30, 27, 26, 24, 22, 12, 12, 12, 11, 11, 10, 10, 10, 9, 9, 8]
    batches = little_padding(list(range(len(lengths))), lengths, most=4, waste=0.25)
    assert [i for b in batches for i in b] == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 4
        padded, real = len(b) * lengths[b[0]], sum(lengths[i] for i in b)
        assert len(b) == 1 or padded <= 1.25 * real
    assert len(little_padding(list(range(16)), [5] * 16, most=128)) == 1


def test_small_batches_stay_open_until_they_hold_the_least_tokens():
    from rlsedit_cli.models.tokens import little_padding

    lengths = [40, 30, 20, 10, 9, 8]
    assert len(little_padding(list(range(6)), lengths, most=6, waste=0.05)) == 6
    # a batch of fewer than 100 padded tokens takes the next item whatever its padding
    batches = little_padding(list(range(6)), lengths, most=6, waste=0.05, least=100)
    assert batches == [[0, 1, 2], [3, 4, 5]]
    assert [i for b in batches for i in b] == list(range(6))


def test_continuations_in_passes_of_like_length_read_the_same_states(tiny_models):
    """read_states with ``waste``: each group of continuations over its rows of the cache gives
    the states of the single padded pass (float rounding)."""
    from rlsedit_cli.accel.prefix import read_states

    cfg = compose_cfg(tiny_overrides("llama", tiny_models["llama"]))
    handle = load_model(cfg.model, torch.device("cpu"))
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21]]
    targets = [[30], [31, 32, 33, 34, 35, 36, 37], [38, 39], [40, 41, 42, 43], [44, 45, 46]]
    rows = torch.tensor([0, 0, 1, 2, 2])
    body = handle.model.base_model
    with torch.no_grad():
        one = read_states(body, handle.tok, prompts, targets, rows, handle.device)
        split = read_states(body, handle.tok, prompts, targets, rows, handle.device, waste=0.0)
    assert one.shape == (sum(len(t) for t in targets), body.config.hidden_size)
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-5)


def test_the_final_measurement_keeps_each_edited_records_values(tmp_path):
    """documents/final_records.jsonl: one line per edited record, in stream order, whose means
    are the summary's figures (so that any subset's figures can be read from it)."""
    import json

    summary = run(_cfg(tmp_path, "run", tmp_path / "cache", "editor=rlsedit"))
    folder = tmp_path / "run"
    rows = [json.loads(x) for x in
            (folder / "documents" / "final_records.jsonl").read_text().splitlines()]
    assert len(rows) == summary["num_edits"] == 4
    assert len({r["case_id"] for r in rows}) == 4
    for metric in ("efficacy", "generalization", "specificity", "efficacy_magnitude"):
        values = [r[metric] for r in rows if r[metric] is not None]
        assert 100 * sum(values) / len(values) == pytest.approx(summary[metric], abs=1e-3)
    assert all(0.0 <= r["efficacy"] <= 1.0 for r in rows)
