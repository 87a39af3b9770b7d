"""`rlsedit report` over finished runs: one table, the plots."""

from __future__ import annotations

import pytest

from rlsedit_cli.cli import main
from rlsedit_cli.runner.run import run

from .conftest import compose_cfg


def test_report_over_runs_gives_one_table_and_plots(tmp_path, capsys):
    for editor in ("none", "rlsedit"):
        cfg = compose_cfg([f"editor={editor}", "stream.num_edits=20", "stream.batch_size=10",
                           "measure.retention_edits=10", "measure.retention_every=1",
                           "measure.generation_prompts=1", "measure.max_length=15"],
                          tmp_path / editor)
        run(cfg)
        assert (tmp_path / editor / "plots" / "retention.png").is_file()
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Method" not in line]
    assert len(rows) == 2 and {r.split("|")[1].strip() for r in rows} == {"none", "rlsedit"}
    for name in ("report.md", "retention.png", "metrics.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Efficacy" in report and "Cost and general ability" in report
    costs = report.split("## Cost and general ability")[1]
    cost = next(line for line in costs.splitlines() if line.startswith("| rlsedit |")
                and "→" in line)  # the smoke task before -> after the stream
    cells = [c.strip() for c in cost.strip("|").split("|")]
    assert all(float(c) >= 0 for c in cells[5:10]) and cells[10].startswith("rlsedit_smoke ")
    cut = tmp_path / "none" / "summary.json"  # a run whose summary was cut short
    cut.write_text(cut.read_text()[:40])
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report2")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "Method" not in line]
    assert len(rows) == 1 and rows[0].split("|")[1].strip() == "rlsedit"


def test_cost_table_takes_medians_and_general_ability_before_and_after(tmp_path):
    from rlsedit_cli.report.runs import Run
    from rlsedit_cli.report.table import cost_table

    rows = [{"edit_seconds": t, "seconds_targets": t - 1, "seconds_keys": 0.5,
             "seconds_update": 0.25, "eval_seconds": 2.0} for t in (3.0, 5.0, 40.0)]
    general = {"points": [{"edits": 0, "scores": {"rlsedit_wikitext": 21.5}},
                               {"edits": 30, "scores": {"rlsedit_wikitext": 23.25}}]}
    runs = [Run(path=tmp_path, summary={"editor": "memit", "model": "m", "dataset": "d",
                                        "general": general}, metrics=rows),
            Run(path=tmp_path, summary={"editor": "ft", "model": "m", "dataset": "d"},
                metrics=[{"x": 1}])]
    lines = cost_table(runs).splitlines()
    assert lines[2] == "| ft | m | d | - | 1 | - | - | - | - | - | - |"
    assert lines[3] == ("| memit | m | d | - | 3 | 5.00 | 4.00 | 0.50 | 0.25 | 2.00 | "
                        "rlsedit_wikitext 21.50 → 23.25 |")


def test_the_report_states_documents_limit_and_few_shot_per_task(tmp_path):
    from rlsedit_cli.report.runs import Run
    from rlsedit_cli.report.table import general_settings_table

    settings = {"gsm8k": {"limit": 50, "sample": "seeded", "documents": 50, "fewshot": 5,
                          "source": "local", "note": "few-shot examples drawn from the test split",
                          "metric": "exact_match,strict-match"},
                "sst2": {"limit": None, "sample": "seeded", "documents": 872, "fewshot": 0,
                         "source": "local", "metric": "acc,none"}}
    runs = [Run(path=tmp_path, summary={"general": {"settings": settings}}),
            Run(path=tmp_path, summary={"general": {"settings": settings}})]
    lines = general_settings_table(runs).splitlines()
    assert lines[2:] == [
        "| gsm8k | exact_match,strict-match | 50 | 50 (seeded) | 5 | local | few-shot examples "
        "drawn from the test split |",
        "| sst2 | acc | 872 | all | 0 | local |  |"]
    assert general_settings_table([Run(path=tmp_path, summary={})]) == ""


def test_the_report_names_settings_that_trade_figures_for_time(tmp_path):
    """A run with the long-stream preset gets a row saying what it changed; runs that are all
    faithful and measured their own unedited figures get no such table."""
    from rlsedit_cli.report.runs import Run
    from rlsedit_cli.report.table import speed_table

    faithful = {"editor": "rlsedit", "model": "m",
                "speed": {"preset": "faithful", "target_dtype": "float32",
                          "stop_when_top1": False},
                "measurement": {"fluency_records": None, "fluency_at": "every",
                                "compute_dtype": "float32", "unedited_from_cache": {}}}
    fast = {"editor": "memit", "model": "m",
            "speed": {"preset": "long_stream", "target_dtype": "bfloat16",
                      "stop_when_top1": True, "stop_below_nll": 0.1, "keys_dtype": "bfloat16",
                      "target_lr": 1.0},
            "measurement": {"fluency_records": 50, "fluency_at": "ends",
                            "generated_at": "ends", "compute_dtype": "bfloat16",
                            "unedited_from_cache": {"pre": "/c/unedited/pre-1.json"}}}
    assert speed_table([Run(path=tmp_path, summary=faithful), Run(path=tmp_path, summary={})]) == ""
    lines = speed_table([Run(path=tmp_path, summary=faithful),
                         Run(path=tmp_path, summary=fast)]).splitlines()
    assert lines[2:] == [
        "| memit | m | ? | - | long_stream | bfloat16 | ENCORE top-1 or NLL < 0.1 | 1 | bfloat16 "
        "| bfloat16 | 50 | ends | ends | pre |",
        "| rlsedit | m | ? | - | faithful | float32 | references' | - | float32 | float32 | all "
        "| every | every | - |"]


def test_report_on_empty_folder_is_one_error_line(tmp_path, caplog):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished run" in caplog.text
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text('{"editor": "none", "efficacy": 50.0}')
    assert main(["report", str(tmp_path), "--metric", "efficasy"]) == 2
    assert "report --metric 'efficasy' is not a figure of these runs: choose one of" in caplog.text


def test_bench_refuses_empty_sizes(caplog):
    assert main(["bench", "update", "--u", "0"]) == 2
    assert "bench --u=0 must be at least 1" in caplog.text


@pytest.mark.slow
def test_thousand_edits_with_three_editors_give_one_table(tmp_path, capsys):
    """The issue's acceptance run: 1000 toy edits in batches of 50 with rlsedit, memit and
    alphaedit; all five metrics, retention.csv and plots; one table over the three runs."""
    for editor in ("rlsedit", "memit", "alphaedit"):
        summary = run(compose_cfg([f"editor={editor}", "eval=none", "stream.num_edits=1000",
                                   "stream.batch_size=50", "measure.retention_every=4"],
                                  tmp_path / editor))
        for metric in ("efficacy", "generalization", "specificity", "fluency", "consistency"):
            assert summary[metric] is not None
        for name in ("retention.csv", "plots/retention.png", "plots/metrics.png"):
            assert (tmp_path / editor / name).is_file()
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "Method" not in line]
    assert sorted(r.split("|")[1].strip() for r in rows) == ["alphaedit", "memit", "rlsedit"]


def test_the_table_names_every_setting_that_differs_and_what_its_figures_are(tmp_path):
    """eval.* and measure.* differences show (they change the figures); editor settings are
    compared within one editor; objective and general ability have columns; ± is explained."""
    from rlsedit_cli.report.runs import Run, mark_settings
    from rlsedit_cli.report.table import markdown_table

    def one(editor, lam, limit, every):
        config = {"editor": {"name": editor, **({"lam": lam} if lam is not None else {})},
                  "eval": {"limit": limit}, "measure": {"retention_every": every},
                  "paths": {"run_dir": str(tmp_path / editor)}}
        summary = {"editor": editor, "model": "m", "efficacy": 90.0, "efficacy_ci95": 1.5,
                   "objective": 80.0, "general": {"points": [
                       {"scores": {"sst2": 0.5}}, {"scores": {"sst2": 0.25}}]}}
        return Run(path=tmp_path, summary=summary, config=config)

    runs = [one("rlsedit", 1.0, 10, 5), one("rlsedit", 2.0, 10, 5), one("memit", None, 20, 1)]
    mark_settings(runs)
    assert [r.setting for r in runs] == [
        "lam=1.0, eval.limit=10, measure.retention_every=5",
        "lam=2.0, eval.limit=10, measure.retention_every=5",
        "eval.limit=20, measure.retention_every=1"]
    table = markdown_table(runs)
    assert "| Objective | General ability |" in table and "| 80.00 | sst2 0.50 → 0.25 |" in table
    assert "± is the half-width of a 95% interval" in table


def test_plots_use_fixed_percentage_axes_and_interval_bands():
    """98 -> 97 efficacy must not look like a collapse: percentages on 0-100, each curve with
    its 95% band, fluency labelled as the entropy it is."""
    import matplotlib.pyplot as plt

    from rlsedit_cli.report.plots import _axes, _curve

    rows = [{"edits": 10, "efficacy": 98.0, "efficacy_ci95": 2.0, "fluency": 500.0},
            {"edits": 20, "efficacy": 97.0, "efficacy_ci95": 2.5, "fluency": 490.0}]
    fig, (left, right) = plt.subplots(1, 2)
    _curve(left, rows, "efficacy", "run")
    _axes(left, "efficacy", "efficacy")
    _curve(right, rows, "fluency", "run")
    _axes(right, "fluency", "fluency")
    assert left.get_ylim() == (-2, 102) and len(left.collections) == 1  # the band
    assert right.get_ylabel() == "fluency (n-gram entropy x 100)" and not right.collections
    plt.close(fig)


def test_a_sweep_plots_edit_success_against_general_ability_per_run(tmp_path):
    """The paper's trade-off: per task, each (lam, mu) run is one point (the metric at the end,
    the task's score at the last general-ability point), the unedited score a reference line."""
    from rlsedit_cli.report.plots import tradeoff_plot, tradeoff_points
    from rlsedit_cli.report.runs import Run

    def one(lam, mu, efficacy, ppl, sst2):
        general = [{"edits": 0, "task": "rlsedit_wikitext", "score": 32.0},
                   {"edits": 0, "task": "sst2", "score": 0.62},
                   {"edits": 500, "task": "rlsedit_wikitext", "score": 40.0},
                   {"edits": 1000, "task": "rlsedit_wikitext", "score": ppl},
                   {"edits": 1000, "task": "sst2", "score": sst2}]
        return Run(path=tmp_path, summary={"editor": "rlsedit", "efficacy": efficacy},
                   overrides=[f"editor.lam={lam}", f"editor.mu={mu}", "stream.num_edits=1000"],
                   general=general)

    runs = [one(0, 1, 99.0, 80.0, 0.5), one(0, 100, 95.0, 40.0, 0.6), one(10, 1, 97.0, 50.0, 0.55),
            Run(path=tmp_path, summary={"editor": "rlsedit", "efficacy": 90.0},
                overrides=["editor.lam=10", "editor.mu=100"])]  # no general ability: left out
    points, before = tradeoff_points(runs, "efficacy")
    assert before == {"rlsedit_wikitext": 32.0, "sst2": 0.62}
    assert points["rlsedit_wikitext"] == [(99.0, 80.0, "lam=0, mu=1"),
                                          (95.0, 40.0, "lam=0, mu=100"),
                                          (97.0, 50.0, "lam=10, mu=1")]
    assert points["sst2"][1] == (95.0, 0.6, "lam=0, mu=100")
    assert tradeoff_plot(runs, tmp_path, "efficacy").stat().st_size > 0
    assert tradeoff_plot(runs[:1], tmp_path, "efficacy") is None  # one run is not a sweep


def test_coinciding_tradeoff_points_share_one_label():
    """Runs whose figures coincide (every lam at mu = 100) get one joined label, not a pile of
    overprinted ones; distinct points keep their own."""
    from rlsedit_cli.report.plots import _merged_labels

    points = [(32.0, 32.08, "lam=0, mu=100"), (97.6, 45.6, "lam=0, mu=1"),
              (32.3, 32.08, "lam=10, mu=100"), (31.9, 32.09, "lam=100, mu=100"),
              (70.1, 33.4, "lam=0, mu=10")]
    assert _merged_labels(points) == [
        (32.0, 32.08, "lam=0, mu=100; lam=10, mu=100; lam=100, mu=100"),
        (97.6, 45.6, "lam=0, mu=1"), (70.1, 33.4, "lam=0, mu=10")]
    assert _merged_labels(points[:1]) == points[:1]


def test_a_setting_an_older_runs_config_lacks_is_not_a_difference(tmp_path):
    """A run of an older commit keeps a config without a key newer code added: the key does
    not label the newer run; a key both configs hold and set apart does."""
    from rlsedit_cli.report.runs import Run, mark_settings

    def one(editor, speed, limit):
        config = {"editor": {"name": editor}, "speed": speed, "eval": {"limit": limit}}
        return Run(path=tmp_path, summary={"editor": editor, "model": "m"}, config=config)

    runs = [one("rlsedit", {"name": "long"}, 10),
            one("ultraedit", {"name": "long", "accelerations": ["all"]}, 20)]
    mark_settings(runs)
    assert [r.setting for r in runs] == ["eval.limit=10", "eval.limit=20"]


def test_runs_of_two_checkouts_do_not_differ_by_the_shipped_assets_path(tmp_path):
    """A worktree or a clone ships the same assets under another absolute path: that is not a
    setting that tells two runs apart."""
    from rlsedit_cli.report.runs import Run, mark_settings

    def one(checkout, lr):
        config = {"editor": {"name": "ultraedit", "lr": lr},
                  "stats": {"corpus": f"{checkout}/rlsedit_cli/assets/english/anchor.txt.gz"}}
        return Run(path=tmp_path, summary={"editor": "ultraedit", "model": "m"}, config=config)

    runs = [one("/work/a", 1e-3), one("/work/b", 3e-5)]
    mark_settings(runs)
    assert [r.setting for r in runs] == ["lr=0.001", "lr=3e-05"]
