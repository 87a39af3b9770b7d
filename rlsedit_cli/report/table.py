"""The paper's Table 1 as markdown: one row per editor / model / setting."""

from __future__ import annotations

from rlsedit_cli.report.runs import Run

METRICS = ("efficacy", "generalization", "specificity", "fluency", "consistency")


def cell(summary: dict, key: str) -> str:
    value = summary.get(key)
    if value is None:
        return "-"
    half = summary.get(f"{key}_ci95")
    return f"{value:.2f} ± {half:.2f}" if half else f"{value:.2f}"


def markdown_table(runs: list[Run]) -> str:
    """Rows sorted by model, then editor, then setting."""
    head = ["Method", "Model", "Setting", "Edits", "Batch",
            *[m.capitalize() for m in METRICS], "Edit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in sorted(runs, key=lambda r: (r.summary.get("model", ""), r.summary.get("editor", ""),
                                          r.setting)):
        s = run.summary
        row = [s.get("editor", "?"), s.get("model", "?"), run.setting or "-",
               str(s.get("num_edits", "?")), str(s.get("batch_size", "?")),
               *[cell(s, m) for m in METRICS],
               f"{s['edit_seconds']:.1f}" if s.get("edit_seconds") is not None else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
