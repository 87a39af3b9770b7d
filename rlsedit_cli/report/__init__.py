"""`rlsedit report`: a markdown table and PNG plots over finished runs."""

from __future__ import annotations

from pathlib import Path

from rlsedit_cli.errors import DataError
from rlsedit_cli.report.plots import all_plots
from rlsedit_cli.report.runs import find_runs
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
