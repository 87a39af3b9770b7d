"""`rlsedit tune` on the shipped tiny GPT-2, and the rules that choose its settings."""

from __future__ import annotations

import json

import pytest

from rlsedit_cli.cli import main
from rlsedit_cli.errors import DataError
from rlsedit_cli.tune import jobs
from rlsedit_cli.tune.knowledge import check_usable
from rlsedit_cli.tune.targets import choose_targets, converged_at

from .conftest import compose_cfg, interrupt_after_row

TOY = ["eval.limit=1", "--edits", "30", "--batch", "10", "--trace-samples", "2",
       "--target-records", "4", "--lrs", "0.5,1", "--clamps", "4", "--sample-counts", "100",
       "--grid", "editor.lam=0,1"]


def test_a_toy_tune_runs_every_step_continues_when_stopped_and_writes_its_settings(
        tmp_path, monkeypatch):
    out, conf = tmp_path / "tune", tmp_path / "conf"
    args = ["tune", "paths.cache=" + str(tmp_path / "cache"), *TOY, "--out", str(out),
            "--settings-dir", str(conf)]
    interrupt_after_row(monkeypatch, batch=1)  # a Ctrl-C inside the first job
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.undo()
    assert {p.name for p in out.iterdir()} == {"tune.json", "knowledge.json", "trace",
                                               "targets.json", "jobs"}
    assert main(args) == 0
    first = out / "jobs" / "samples_n100"
    assert "resumed after batch 0" in (first / "run.log").read_text()
    report = (out / "report.md").read_text()
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## Settings"):
        assert section in report
    for plot in ("targets.png", "tradeoff.png", "trace/trace.png"):
        assert (out / plot).stat().st_size > 0
    grid = json.loads((out / "grid.json").read_text())
    names = [p["name"] for p in grid["points"]]
    assert names == ["grid_lam0", "grid_lam1", "configured"]
    assert all(p["num_edits"] == 30 and p["perplexity"] > 0 for p in grid["points"])
    assert grid["chosen"] in names and set(grid["pareto"]) <= set(names)
    # the toy's facts sit in its first MLPs: the trace proposes the configured layers
    trace = json.loads((out / "trace" / "trace.json").read_text())
    assert trace["proposed_layers"] == [0, 1]

    written = conf / "tuned" / "rlsedit_gpt2_tiny.yaml"
    text = written.read_text()
    assert text.startswith("# @package _global_\n# Written by rlsedit tune")
    cfg = compose_cfg([f"hydra.searchpath=[file://{conf}]"])
    assert set(grid["settings"]) >= {"model.edit_layers", "editor.target.lr", "editor.lam"}
    for key, value in grid["settings"].items():
        assert f"{key.rsplit('.', 1)[-1]}: {value}  # " in text  # each value says what chose it
        got = cfg
        for part in key.split("."):
            got = got[part]
        assert json.dumps(got if isinstance(got, (int, float)) else list(got)).replace(
            " ", "") == value or float(got) == float(value)

    # the same command again reads everything back; other settings are refused
    before = {p: p.stat().st_mtime for p in (out / "jobs").rglob("summary.json")}
    assert main(args) == 0
    assert before == {p: p.stat().st_mtime for p in (out / "jobs").rglob("summary.json")}
    assert main([*args[:-4], "--edits", "40", "--out", str(out), "--settings-dir",
                 str(conf)]) == 2
    # a settings file it did not write is not replaced
    written.write_text("editor:\n  lam: 3\n")
    (out / "report.md").unlink()
    assert main(args) == 2
    assert written.read_text() == "editor:\n  lam: 3\n"


def test_tune_refuses_bad_options_in_one_line(tmp_path):
    out = str(tmp_path / "t")
    assert main(["tune", "--edits", "0", "--out", out]) == 2
    assert main(["tune", "--steps", "know,fly", "--out", out]) == 2
    assert main(["tune", "--offset", "100000", "--out", out]) == 2
    assert main(["tune", "--grid", "editor.lam", "--out", out]) == 2
    assert not (tmp_path / "t").exists()


def test_a_spent_budget_stops_before_the_next_step_and_a_broken_result_is_named(tmp_path):
    out = tmp_path / "t"
    args = ["tune", *TOY, "--out", str(out), "--settings-dir", "none"]
    assert main([*args, "--budget", "0"]) == 0  # nothing measured, nothing lost
    assert [p.name for p in out.iterdir()] == ["tune.json"]
    (out / "knowledge.json").write_text("{not json")
    assert main([*args, "--steps", "know"]) == 2


def test_records_the_model_already_edits_are_refused():
    check_usable({"efficacy": 31.0, "specificity": 70.0}, "here")
    with pytest.raises(DataError, match="already prefers target_new on 60%"):
        check_usable({"efficacy": 60.0, "specificity": 70.0}, "here")
    with pytest.raises(DataError, match="no neighbourhood prompts"):
        check_usable({"efficacy": 10.0, "specificity": None}, "here")


def _curve(start: float, rate: float, n: int = 50) -> list[float]:
    return [start * rate**i for i in range(n)]


def test_the_target_rule_keeps_the_clamp_and_takes_the_gentlest_step_that_converges():
    configured = {"lr": 0.1, "clamp_norm_factor": 0.75, "steps": 25}
    rows = [{"lr": 0.1, "clamp": 0.75, "nll": _curve(8, 0.95)},  # 8 * 0.95^49 = 0.65: never
            {"lr": 0.5, "clamp": 0.75, "nll": _curve(8, 0.8)},  # below 0.1 after 20 steps
            {"lr": 1.0, "clamp": 0.75, "nll": _curve(8, 0.6)},
            {"lr": 0.1, "clamp": 4.0, "nll": _curve(8, 0.5)}]
    assert converged_at(rows[1]["nll"], 0.1) == 20
    choice = choose_targets(rows, configured)
    assert (choice["lr"], choice["clamp_norm_factor"], choice["steps"]) == (0.5, 0.75, 25)
    # nothing within the configured steps: the fewest steps, rounded up to 5 passes
    slow = [{"lr": 0.5, "clamp": 0.75, "nll": _curve(8, 0.85)}]  # below 0.1 after 27
    choice = choose_targets(slow, configured)
    assert (choice["steps"], choice["converged_at"]) == (30, 27)
    # no clamp-0.75 step converges: the smallest clamp that lets one
    choice = choose_targets([rows[0], rows[3]], configured)
    assert (choice["lr"], choice["clamp_norm_factor"]) == (0.1, 4.0)
    choice = choose_targets([rows[0]], configured)
    assert not choice["converged"] and choice["lr"] == 0.1


def _point(name, eff, ci, ppl, gen=50.0, spec=60.0, **extra):
    return {"name": name, "values": {}, "efficacy": eff, "efficacy_ci95": ci,
            "generalization": gen, "generalization_ci95": 5.0, "specificity": spec,
            "specificity_ci95": 5.0, "perplexity": ppl, **extra}


def test_the_tradeoff_rule_the_front_and_the_sample_count():
    points = [_point("a", 99.0, 2.0, 40.0), _point("b", 97.5, 3.0, 33.0),
              _point("c", 90.0, 4.0, 32.0), _point("d", 96.0, 3.0, 35.0)]
    assert jobs.choose_point(points)["name"] == "b"  # within 2 of 99, the lowest perplexity
    assert jobs.pareto(points) == ["a", "b", "c"]
    counts = [_point("n100", 99.0, 2.0, 34.4, samples=100),
              _point("n300", 98.0, 2.0, 33.8, samples=300),
              _point("n1158", 99.0, 2.0, 33.6, samples=1158)]
    assert jobs.choose_samples(counts, 1158) == 300  # 100 is 2.4% off in perplexity
    assert jobs.sample_counts(1158) == [100, 300, 1158]
    assert jobs.sample_counts(10000) == [100, 300, 1000, 3000, 10000]


def test_grids_and_job_overrides():
    cfg = compose_cfg(["editor=memit"])
    assert jobs.default_grid("memit", cfg) == {"editor.n_anchor": [
        float(f"{cfg.editor.n_anchor / 3:.3g}"), float(cfg.editor.n_anchor),
        float(cfg.editor.n_anchor * 3)]}
    assert jobs.grid_points({"a": [1, 2], "b": ["x"]}) == [{"a": "1", "b": "x"},
                                                            {"a": "2", "b": "x"}]
    assert jobs.merged({"a": "1", "b": "2"}, {"a": "3"}) == ["a=3", "b=2"]
    assert jobs.job_name("grid", {"editor.lam": "10", "editor.mu": "1"}) == "grid_lam10_mu1"
