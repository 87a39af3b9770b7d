"""The paper's Table 1 as markdown (one row per editor / model / setting), and a table of what
each run cost per batch and what it did to general ability."""

from __future__ import annotations

from statistics import median

from rlsedit_cli.report.runs import Run

METRICS = ("efficacy", "generalization", "specificity", "fluency", "consistency",
           "efficacy_generated", "generalization_generated")
HEADS = {"efficacy_generated": "Efficacy (generated)",
         "generalization_generated": "Generalization (generated)"}


IDENT = ("Method", "Model", "Dataset", "Setting")


def ident(run: Run) -> list[str]:
    """A row's first cells: editor, model, dataset (each its own column) and the settings that
    tell the run apart from the others reported."""
    s = run.summary
    return [s.get("editor", "?"), s.get("model", "?"), s.get("dataset", "?"), run.setting or "-"]


def ordered(runs: list[Run]) -> list[Run]:
    """Rows sorted by model, dataset, editor, then setting."""
    return sorted(runs, key=lambda r: (r.summary.get("model", ""), r.summary.get("dataset", ""),
                                       r.summary.get("editor", ""), r.setting))


def cell(summary: dict, key: str) -> str:
    value = summary.get(key)
    if value is None:
        return "-"
    half = summary.get(f"{key}_ci95")
    return f"{value:.2f} ± {half:.2f}" if half else f"{value:.2f}"


INTERVALS = ("± is the half-width of a 95% interval over the edited records (1.96 standard "
             "errors); (generated): the share of rewrite / paraphrase prompts whose greedy answer, "
             "without teacher forcing, starts with the new target (WILD's exact match); "
             "Objective is what a sweep maximises (summary.json's objective); General "
             "ability is each lm-eval task before → after the stream.")


def markdown_table(runs: list[Run]) -> str:
    """Rows sorted by model, then editor, then setting; a note on what the figures are."""
    head = [*IDENT, "Edits", "Batch",
            *[HEADS.get(m, m.capitalize()) for m in METRICS], "Objective", "General ability",
            "Edit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in ordered(runs):
        s = run.summary
        row = [*ident(run), str(s.get("num_edits", "?")), str(s.get("batch_size", "?")),
               *[cell(s, m) for m in METRICS],
               f"{s['objective']:.2f}" if isinstance(s.get("objective"), (int, float)) else "-",
               _general(s),
               f"{s['edit_seconds']:.1f}" if s.get("edit_seconds") is not None else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n" + INTERVALS + "\n"


PHASES = ("targets", "keys", "update")  # the key-value editors' phases (seconds_<phase>)


def _median(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return f"{median(values):.2f}" if values else "-"


def _general(summary: dict) -> str:
    """``task before -> after`` for each lm-eval task measured before and after the stream."""
    general = summary.get("general") or {}
    points = general.get("points") or general.get("checkpoints") or []  # the older name
    if not points:
        return "-"
    first, last = points[0], points[-1]
    parts = []
    for task, after in sorted(last.get("scores", {}).items()):
        before = first.get("scores", {}).get(task) if first is not last else None
        shown = f"{before:.2f} → {after:.2f}" if before is not None else f"{after:.2f}"
        metric = ((last.get("settings") or {}).get(task) or {}).get("metric")
        parts.append(f"{task}{' ' + metric.removesuffix(',none') if metric else ''} {shown}")
    return "; ".join(parts) or "-"


def cost_table(runs: list[Run]) -> str:
    """Median seconds per batch (the edit, its phases, the measurements after it) and general
    ability before and after the stream (lm-eval's main score per task)."""
    head = [*IDENT, "Batches", "Edit s / batch",
            *[f"{p.capitalize()} s" for p in PHASES], "Eval s / batch", "General ability"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in ordered(runs):
        s, rows = run.summary, run.metrics
        row = [*ident(run), str(len(rows)),
               _median(rows, "edit_seconds"), *[_median(rows, f"seconds_{p}") for p in PHASES],
               _median(rows, "eval_seconds"), _general(s)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def general_settings_table(runs: list[Run]) -> str:
    """What each lm-eval figure was measured on: documents scored, the limit and how its documents
    were chosen, few-shot, the data's source and any difference from lm-eval's own task."""
    rows = {}
    for run in runs:
        settings = (run.summary.get("general") or {}).get("settings") or {}
        for task, s in settings.items():
            rows.setdefault((task, json_key(s)), s)
    if not rows:
        return ""
    head = ["Task", "Metric", "Documents", "Limit", "Few-shot", "Source", "Note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (task, _), s in sorted(rows.items()):
        limit = "all" if s.get("limit") is None else f"{s['limit']} ({s.get('sample', '?')})"
        metric = str(s.get("metric", "?")).removesuffix(",none")
        lines.append("| " + " | ".join([task, metric, str(s.get("documents", "?")), limit,
                                        str(s.get("fewshot", "?")), s.get("source", "?"),
                                        s.get("note", "")]) + " |")
    return "\n".join(lines) + "\n"


def _stop(speed: dict) -> str:
    """How a request's target optimisation stops, in a few words."""
    parts = ["ENCORE top-1"] if speed.get("stop_when_top1") else []
    if speed.get("stop_below_nll") is not None:
        parts.append(f"NLL < {speed['stop_below_nll']:g}")
    return " or ".join(parts) or "references'"


def speed_table(runs: list[Run]) -> str:
    """The settings that trade exactness for time (conf/speed), per run, and where the unedited
    model's figures came from; empty when every run is faithful and measured its own."""
    rows = []
    for run in ordered(runs):
        s = run.summary
        speed, measured = s.get("speed") or {}, s.get("measurement") or {}
        cached = ", ".join(sorted(measured.get("unedited_from_cache") or {})) or "-"
        lr = speed.get("target_lr")
        values = [speed.get("preset", "faithful"), str(speed.get("target_dtype", "float32")),
                  _stop(speed), "-" if lr is None else f"{lr:g}",
                  str(speed.get("keys_dtype") or "float32"),
                  str(measured.get("compute_dtype", "float32")),
                  "all" if measured.get("fluency_records") is None
                  else str(measured["fluency_records"]),
                  str(measured.get("fluency_at", "every")),
                  str(measured.get("generated_at", "every")), cached]
        rows.append([*ident(run), *values])
    if all(r[4] == "faithful" and r[5:7] == ["float32", "references'"]
           and r[8:] == ["float32", "float32", "all", "every", "every", "-"] for r in rows):
        return ""
    head = [*IDENT, "Speed preset", "Target step dtype", "Target stop",
            "Target lr", "Keys dtype", "Measuring dtype", "Fluency records", "Fluency at",
            "Greedy answers at", "Unedited figures from cache"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def json_key(value: dict) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)
