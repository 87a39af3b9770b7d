"""`rlsedit bench stream`: one real run (any model, editor and dataset), timed end to end and by
phase.

It is :func:`rlsedit_cli.runner.run.run` on a composed config, in a fresh folder, with the
general-ability tasks, the tracker, the pre-edit measurement and the generation metrics off by
default (each can be turned back on with an override). The editors already time their phases
per batch (``seconds_templates``, ``seconds_targets``, ``seconds_keys``, ``seconds_update`` in
metrics.jsonl, :class:`rlsedit_cli.progress.PhaseClock`); this sums them, adds the per-batch
evaluation and the final one, and fits the slope of the editing time against the batch index (a
cost that does not grow with the history has a slope within noise). Editing and measuring are
reported side by side in seconds per edit (the measurements by phase: before editing, after each
batch, retention, general ability, final).

:func:`compare_streams` puts runs of several configurations on the same records side by side:
each one's seconds per edit against the first's (the ratio), and its figures.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from omegaconf import DictConfig

from rlsedit_cli.bench.update import slope

PHASES = ("templates", "targets", "keys", "gradients", "update")
DEFAULTS = ("eval=none", "logger=none")  # general ability: `rlsedit bench general`
FIGURES = ("efficacy", "generalization", "specificity", "fluency", "consistency")


def phase_breakdown(rows: list[dict]) -> dict[str, float]:
    """Seconds per phase over ``rows`` (metrics.jsonl lines), "other" the editing time no phase
    covers, "evaluation" the per-batch measurements."""
    total = {p: sum(r.get(f"seconds_{p}", 0.0) for r in rows) for p in PHASES}
    edit = sum(r["edit_seconds"] for r in rows)
    total["other"] = max(0.0, edit - sum(total.values()))
    total["evaluation"] = sum(r.get("eval_seconds", 0.0) for r in rows)
    return total


def bench_stream(cfg: DictConfig) -> dict:
    """Run ``cfg`` (its ``paths.run_dir`` a fresh folder) and report its costs."""
    from rlsedit_cli.runner.run import run

    t0 = time.perf_counter()
    summary = run(cfg)
    wall = time.perf_counter() - t0
    folder = Path(cfg.paths.run_dir)
    rows = [json.loads(line) for line in
            (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    edits = summary["num_edits"]
    per_batch = [r["edit_seconds"] for r in rows]
    phases = phase_breakdown(rows)
    s, se = slope([x * 1e3 for x in per_batch])
    final_eval = summary["eval_seconds"] - phases["evaluation"]
    measured = summary.get("measure_seconds", {})
    return {"bench": "stream", "device": summary["device"], "model": summary["model"],
            "editor": summary["editor"], "dataset": summary["dataset"], "edits": edits,
            "batches": len(rows), "batch_size": summary["batch_size"],
            "wall_s": round(wall, 2),
            "edit_s_per_edit": round(summary["edit_seconds"] / edits, 4),
            "measure_s_per_edit": round(summary["eval_seconds"] / edits, 4),
            "measure_phase_s_per_edit": {p: round(v / edits, 4) for p, v in measured.items()},
            "s_per_edit_with_batch_eval": round(
                (summary["edit_seconds"] + phases["evaluation"]) / edits, 4),
            "phase_s_per_edit": {p: round(v / edits, 4) for p, v in phases.items()},
            "final_eval_s": round(final_eval, 2),
            "setup_s": round(wall - summary["edit_seconds"] - summary["eval_seconds"], 2),
            "edit_s_per_batch": {"median": round(statistics.median(per_batch), 3),
                                 "first": round(per_batch[0], 3), "last": round(per_batch[-1], 3),
                                 "slope_ms_per_batch": round(s, 2),
                                 "slope_se": round(se, 2)},
            **{k: summary.get(k) for k in FIGURES},
            **{f"{k}_ci95": summary.get(f"{k}_ci95") for k in FIGURES},
            "run_dir": str(folder)}


def compare_streams(rows: list[dict], names: list[str]) -> dict:
    """Each run of ``rows`` (:func:`bench_stream` results on the same records) against the
    first: seconds per edit and their ratio (first / this: above 1 is faster), and the figures
    with the first run's 95% intervals."""
    base = rows[0]
    out = []
    for name, row in zip(names, rows):
        out.append({
            "config": name, "edit_s_per_edit": row["edit_s_per_edit"],
            "measure_s_per_edit": row["measure_s_per_edit"],
            "edit_speedup": round(base["edit_s_per_edit"] / row["edit_s_per_edit"], 2),
            "measure_speedup": (round(base["measure_s_per_edit"] / row["measure_s_per_edit"], 2)
                                if row["measure_s_per_edit"] else None),
            "measure_le_edit": row["measure_s_per_edit"] <= row["edit_s_per_edit"],
            **{k: row.get(k) for k in FIGURES},
            "within_first_ci95": {
                k: abs(row[k] - base[k]) <= base[f"{k}_ci95"] for k in FIGURES
                if row.get(k) is not None and base.get(k) is not None
                and base.get(f"{k}_ci95") is not None}})
    return {"bench": "stream_compare", "edits": base["edits"], "device": base["device"],
            "model": base["model"], "editor": base["editor"], "runs": out}
