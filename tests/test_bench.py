"""The benchmark commands run and report what docs/benchmarks.md quotes (no timing asserted)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from rlsedit_cli.bench.gemm import GEMM_N, share_of_gemm
from rlsedit_cli.bench.targets import bench_targets
from rlsedit_cli.bench.update import rls_step_flops
from rlsedit_cli.cli import main
from rlsedit_cli.datasets.toy import load as load_toy

from .conftest import TINY_BUNDLE, target_cfg


def test_bench_update_prints_one_line_per_editor(capsys, tmp_path):
    out = tmp_path / "bench.jsonl"
    assert main(["bench", "update", "--d-in", "48", "--d-out", "16", "--u", "4",
                 "--batches", "4", "--device", "cpu", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["editor"] for x in lines] == ["rlsedit", "alphaedit", "memit"]
    assert all(x["last_batch_residual"] < 0.9 for x in lines)  # each really updates W
    rls = lines[0]
    flops = rls_step_flops(48, 16, 4)
    assert rls["gflops"] == pytest.approx(flops / (rls["median_ms"] / 1e3) / 1e9, rel=0.02,
                                          abs=0.01)
    assert rls["gemm_gflops"] > 0 and rls["share_of_gemm"] >= 0  # tiny sizes: near 0
    assert out.read_text().count("\n") == 3


def test_share_of_gemm_of_the_reference_product_itself_is_about_one():
    """The share arithmetic: the reference GEMM, timed between two of itself, reaches about
    its own rate (not 1000x off, nor 1/1000)."""
    a = torch.randn(GEMM_N, GEMM_N)
    measure = share_of_gemm(torch.device("cpu"))
    out, seconds, rate, share = measure(lambda: a @ a, 2 * GEMM_N**3)
    assert out.shape == (GEMM_N, GEMM_N) and seconds > 0 and rate > 0
    assert 0.2 < share < 5


def test_bench_targets_reports_equal_targets(shipped_handle):
    records = load_toy(str(TINY_BUNDLE)).records[:3]
    row = bench_targets(shipped_handle, records, z_layer=1,
                        target=target_cfg(loss_layer=3), steps=3, repeat=1, step_repeat=3)
    assert row["requests"] == 3 and row["repeat"] == 1
    assert row["batched_s"] > 0 and row["one_at_a_time_s"] > 0
    assert row["relative_difference"] < 1e-4 and row["relative_difference_references_way"] < 1e-4
    assert row["relative_difference_whole_prefixes"] < 1e-5 and row["batched_whole_prefixes_s"] > 0
    assert row["references_way_s"] > 0 and row["speedup_vs_references_way"] > 0
    assert row["step_gflop"] > 0 and row["gemm_gflops"] > 0
    assert row["step_gflops_achieved"] == pytest.approx(row["step_gflop"] / row["step_s"],
                                                        rel=0.01)
    assert len(row["step_share_runs"]) == 3 and row["step_share_of_gemm"] > 0


def test_bench_stream_times_a_real_run_by_phase(capsys, tmp_path):
    """`bench stream` runs the configured stream (any model, editor, dataset) in its own folder
    and breaks the editing time into the editor's phases."""
    run_dir = tmp_path / "stream"
    assert main(["bench", "stream", "--device", "cpu", "--run-dir", str(run_dir),
                 "stream.num_edits=6", "stream.batch_size=2", "editor.target.steps=3",
                 "measure.retention_edits=0", f"paths.cache={tmp_path / 'cache'}"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (row["bench"], row["editor"], row["edits"], row["batches"]) == ("stream", "rlsedit",
                                                                           6, 3)
    assert (run_dir / "summary.json").is_file()
    phases = row["phase_s_per_edit"]
    assert set(phases) == {"templates", "targets", "keys", "gradients", "update", "other",
                           "evaluation"}
    assert phases["targets"] > 0 and phases["update"] > 0
    edit_phases = sum(v for k, v in phases.items() if k != "evaluation")
    assert edit_phases == pytest.approx(row["edit_s_per_edit"], abs=6e-4)
    assert row["edit_s_per_batch"]["slope_se"] >= 0


def test_bench_stream_compares_configurations_on_the_same_records(capsys, tmp_path):
    """--against runs another configuration on the same records: editing and measuring seconds
    per edit side by side for each, the ratio to the first run, the figures against the first
    run's 95% intervals; every measurement phase is timed."""
    run_dir = tmp_path / "stream"
    common = ["stream.num_edits=4", "stream.batch_size=2", "editor.target.steps=3",
              "measure.retention_edits=2", "measure.generation_prompts=1",
              f"paths.cache={tmp_path / 'cache'}"]
    assert main(["bench", "stream", "--device", "cpu", "--run-dir", str(run_dir), *common,
                 "--against", "editor.target.compute_dtype=bfloat16 stream.batch_size=4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    first, second, compare = lines[-3:]
    assert (first["config"], second["config"]) == (
        "(as given)", "editor.target.compute_dtype=bfloat16 stream.batch_size=4")
    assert (first["batches"], second["batches"]) == (2, 1)
    assert set(first["measure_phase_s_per_edit"]) == {"pre", "batch", "retention", "general",
                                                      "final"}
    assert first["measure_phase_s_per_edit"]["pre"] > 0  # measure.pre_edit stays on
    assert first["measure_phase_s_per_edit"]["retention"] > 0
    assert compare["bench"] == "stream_compare" and len(compare["runs"]) == 2
    base, other = compare["runs"]
    assert base["edit_speedup"] == 1.0
    assert other["edit_speedup"] == pytest.approx(  # rounded to 2 decimals (and their inputs)
        first["edit_s_per_edit"] / second["edit_s_per_edit"], rel=0.02, abs=0.006)
    assert other["measure_s_per_edit"] == second["measure_s_per_edit"]
    assert set(other["within_first_ci95"]) >= {"efficacy", "generalization", "specificity"}
    assert (run_dir / "config0" / "summary.json").is_file()
    assert (run_dir / "config1" / "summary.json").is_file()


def test_bench_refuses_overrides_it_cannot_use(caplog):
    assert main(["bench", "update", "model=smollm2_135m"]) == 2
    assert "bench update takes no config overrides (model=smollm2_135m)" in caplog.text


def test_bench_checks_every_configuration_before_it_runs_one(capsys, caplog):
    """A bad value in a bench's configuration (here in --against's second one) is the one-line
    error `rlsedit run` gives, before any configuration runs."""
    assert main(["bench", "general", "--device", "cpu", "eval=smoke", "eval.limit=5",
                 "--against", "eval.attention_dtype=bfloat16"]) == 2
    assert "eval.attention_dtype=bfloat16 needs eval.compute_dtype=bfloat16" in caplog.text
    assert capsys.readouterr().out == ""  # no row: nothing ran
    assert main(["bench", "targets", "--device", "cpu", "stream.batch_size=0"]) == 2
    assert "stream.batch_size=0 must be at least 1" in caplog.text


def test_bench_stats_compares_the_statistics_with_a_plain_forward(capsys):
    assert main(["bench", "stats", "--device", "cpu", "--samples", "24"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["bench"] == "stats" and row["samples"] == 24 and row["tokens"] > 0
    assert row["stats_s"] > 0 and row["forward_s"] > 0 and 0 <= row["padding_share"] < 1


def test_bench_general_reports_each_figure_with_its_interval_and_cost(capsys):
    """The unedited model on the eval group's tasks: figure, 95% interval, documents, seconds;
    a task that cannot run is a row with its one-line error."""
    assert main(["bench", "general", "--device", "cpu", "eval=smoke", "eval.limit=30",
                 "eval.tasks=[rlsedit_smoke,hellaswagg]"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    smoke, bad, point = rows
    assert point["bench"] == "general_point" and point["seconds"] >= smoke["seconds"]
    assert point["first_point_seconds"] > 0  # the point reported is a run's later one
    assert smoke["task"] == "rlsedit_smoke" and smoke["documents"] == 30
    assert smoke["metric"] == "acc,none" and smoke["seconds"] > 0
    assert smoke["ci95"] == pytest.approx(1.96 * smoke["metrics"]["acc_stderr,none"], abs=1e-4)
    assert smoke["score"] >= 0.8  # the tiny model knows its held-out facts
    assert "lm-eval has no task 'hellaswagg'" in bad["error"]
    assert point["real_tokens"] > 0 and point["tokens"] >= point["real_tokens"]
    assert point["head_rows"] >= 30 and point["gemm_gflops"] > 0
    gflop = point["gflop"]
    assert gflop["blocks"] > 0 and gflop["head"] > 0 and gflop["attention"] > 0
    assert point["floor_seconds"] == pytest.approx(
        (sum(gflop.values()) - gflop["padding"]) / point["gemm_gflops"], rel=0.05, abs=2e-3)
    # the one task that ran did all of the point's passes: its floor is the point's (at the
    # rate measured before the point, not the average around it)
    assert smoke["floor_seconds"] > 0 and "floor_seconds" not in bad
    assert smoke["floor_seconds"] == pytest.approx(point["floor_seconds"], rel=0.5, abs=2e-3)


def test_pass_counter_counts_tokens_causal_pairs_and_head_rows(tiny_models):
    """Two rows of 5 tokens (one padded), then 3 more tokens each after their cache of 5."""
    from transformers import DynamicCache

    from rlsedit_cli.bench.floor import PassCounter, point_flops
    from rlsedit_cli.models.loader import load_model

    from .conftest import compose_cfg, tiny_overrides

    handle = load_model(compose_cfg(tiny_overrides("llama", tiny_models["llama"])).model,
                        torch.device("cpu"))
    model, body = handle.model, handle.model.base_model
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad(), PassCounter(model) as counts:
        cache = DynamicCache(config=body.config)
        hidden = body(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=mask,
                      past_key_values=cache, use_cache=True).last_hidden_state
        first = replace(counts)
        body(input_ids=torch.ones(2, 3, dtype=torch.long), past_key_values=cache,
             attention_mask=torch.ones(2, 8, dtype=torch.long), use_cache=True)
        model.get_output_embeddings()(hidden[:, -1])
    assert (counts.tokens, counts.real, counts.head_rows) == (16, 15, 2)
    assert counts.pairs == 2 * 15 + 2 * (3 * 5 + 6)  # query i of a pass sees past + i + 1 keys
    later = counts.since(first)  # the second pass and the head
    assert (later.tokens, later.real, later.pairs, later.head_rows) == (6, 6, 2 * (3 * 5 + 6), 2)
    flops = point_flops(model, counts)
    maps = sum(m.weight.numel() for m in body.modules() if isinstance(m, torch.nn.Linear))
    assert flops["blocks"] == 2 * maps * 15 and flops["padding"] == 2 * maps
    assert flops["head"] == 2 * model.get_output_embeddings().weight.numel() * 2


def test_bench_general_compares_settings_on_the_same_documents(capsys):
    assert main(["bench", "general", "--device", "cpu", "eval=smoke", "eval.limit=20",
                 "--against", "eval.logits=all", "--against", "eval.compute_dtype=bfloat16"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    compare = rows[-1]
    assert compare["bench"] == "general_compare" and len(compare["point_seconds"]) == 3
    smoke = compare["tasks"]["rlsedit_smoke"]
    assert smoke["difference"][0] == 0 and smoke["difference"][1] == 0  # the same figure
    assert all(s is not None for s in smoke["seconds"])
