"""`rlsedit report` over finished runs: one table, the plots."""

from __future__ import annotations

import pytest

from rlsedit_cli.cli import main
from rlsedit_cli.runner.run import run

from .conftest import compose_cfg


def test_report_over_runs_gives_one_table_and_plots(tmp_path, capsys):
    for editor in ("none", "rlsedit"):
        cfg = compose_cfg([f"editor={editor}", "stream.num_edits=20", "stream.batch_size=10",
                           "eval.retention_edits=10", "eval.retention_every=1",
                           "eval.generation_prompts=1", "eval.max_new_tokens=15"],
                          tmp_path / editor)
        run(cfg)
        assert (tmp_path / editor / "plots" / "retention.png").is_file()
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Method" not in line]
    assert len(rows) == 2 and {r.split("|")[1].strip() for r in rows} == {"none", "rlsedit"}
    for name in ("report.md", "retention.png", "metrics.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "Efficacy" in (tmp_path / "report" / "report.md").read_text()


def test_report_on_empty_folder_is_one_error_line(tmp_path, caplog):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished run" in caplog.text


@pytest.mark.slow
def test_thousand_edits_with_three_editors_give_one_table(tmp_path, capsys):
    """The issue's acceptance run: 1000 toy edits in batches of 50 with rlsedit, memit and
    alphaedit; all five metrics, retention.csv and plots; one table over the three runs."""
    for editor in ("rlsedit", "memit", "alphaedit"):
        summary = run(compose_cfg([f"editor={editor}", "eval=none", "stream.num_edits=1000",
                                   "stream.batch_size=50", "eval.retention_every=4"],
                                  tmp_path / editor))
        for metric in ("efficacy", "generalization", "specificity", "fluency", "consistency"):
            assert summary[metric] is not None
        for name in ("retention.csv", "plots/retention.png", "plots/metrics.png"):
            assert (tmp_path / editor / name).is_file()
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "Method" not in line]
    assert sorted(r.split("|")[1].strip() for r in rows) == ["alphaedit", "memit", "rlsedit"]
