"""`rlsedit bench stream`: one real run (any model, editor and dataset), timed end to end and by
phase.

It is :func:`rlsedit_cli.runner.run.run` on a composed config, in a fresh folder, with the
general-ability tasks, the tracker, the pre-edit measurement and the generation metrics off by
default (each can be turned back on with an override). The editors already time their phases
per batch (``seconds_templates``, ``seconds_targets``, ``seconds_keys``, ``seconds_update`` in
metrics.jsonl, :class:`rlsedit_cli.progress.PhaseClock`); this sums them, adds the per-batch
evaluation and the final one, and fits the slope of the editing time against the batch index (a
cost that does not grow with the history has a slope within noise).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from omegaconf import DictConfig

from rlsedit_cli.bench.update import slope

PHASES = ("templates", "targets", "keys", "update")
DEFAULTS = ("eval=none", "logger=none", "measure.pre_edit=false", "measure.fluency=false")


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
    return {"bench": "stream", "device": summary["device"], "model": summary["model"],
            "editor": summary["editor"], "dataset": summary["dataset"], "edits": edits,
            "batches": len(rows), "batch_size": summary["batch_size"],
            "wall_s": round(wall, 2),
            "edit_s_per_edit": round(summary["edit_seconds"] / edits, 4),
            "s_per_edit_with_batch_eval": round(
                (summary["edit_seconds"] + phases["evaluation"]) / edits, 4),
            "phase_s_per_edit": {p: round(v / edits, 4) for p, v in phases.items()},
            "final_eval_s": round(final_eval, 2),
            "setup_s": round(wall - summary["edit_seconds"] - summary["eval_seconds"], 2),
            "edit_s_per_batch": {"median": round(statistics.median(per_batch), 3),
                                 "first": round(per_batch[0], 3), "last": round(per_batch[-1], 3),
                                 "slope_ms_per_batch": round(s, 2),
                                 "slope_se": round(se, 2)},
            "efficacy": summary.get("efficacy"), "generalization": summary.get("generalization"),
            "specificity": summary.get("specificity"), "run_dir": str(folder)}
