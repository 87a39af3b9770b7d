"""`rlsedit report`: a markdown table and PNG plots over finished runs."""

from __future__ import annotations

from pathlib import Path

from rlsedit_cli.errors import DataError
from rlsedit_cli.report.paired import paired_table
from rlsedit_cli.report.plots import all_plots
from rlsedit_cli.report.runs import failed_jobs, find_runs
from rlsedit_cli.report.table import (
    cost_table,
    general_settings_table,
    markdown_table,
    speed_table,
)


def make_report(paths: list[str | Path], out: str | Path, metric: str = "efficacy") -> dict:
    """Write report.md and the plots into ``out`` (a sweep's heat map shows ``metric``)."""
    runs = find_runs(paths)
    known = sorted({k for r in runs for k, v in r.summary.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if metric not in known:
        raise DataError(f"report --metric {metric!r} is not a figure of these runs: choose one of "
                        f"{', '.join(known)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    plots = all_plots(runs, out, metric)
    lines = [f"# rlsedit report: {len(runs)} runs", "", table, "## Cost and general ability",
             "", "Median seconds per batch; general ability before → after the stream.", "",
             cost_table(runs)]
    paired = paired_table(runs)
    if paired:
        lines += ["## Paired general-ability differences", "", "On the same documents: each "
                  "run's last point against its unedited one, and each run against the first "
                  "at their last common point. Accuracies in points, perplexities in percent; "
                  "95% interval from a paired bootstrap over the documents, McNemar's exact "
                  "test for accuracies; established: the interval excludes 0.", "", paired]
    failed = failed_jobs(paths)
    if failed:
        lines += ["## Failed jobs", "", "Jobs of the sweep that ended with an error (their "
                  "folder's error.txt); not in the tables above.", "",
                  "| job | error |", "|---|---|",
                  *(f"| {folder.name} | {text.replace('|', '/')} |" for folder, text in failed)]
    settings = general_settings_table(runs)
    if settings:
        lines += ["## General-ability tasks", "", "Documents scored per task (MMLU: over its "
                  "subjects), the limit and how its documents were chosen, few-shot examples, "
                  "where the data came from.", "", settings]
    speed = speed_table(runs)
    if speed:
        lines += ["## Speed and measurement settings", "", "Settings that change figures a "
                  "little for time (conf/speed; docs/benchmarks.md), and the unedited model's "
                  "figures read from the cache (the same figures, measured by an earlier run).",
                  "", speed]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"runs": len(runs), "table": table, "plots": [str(p) for p in plots],
            "report": str(out / "report.md")}
