"""`rlsedit bench general`: the eval group's lm-eval tasks on the unedited model.

Per task: the headline figure, its 95% interval (1.96 of lm-eval's standard error), the documents
scored, few-shot, where the data came from, and the seconds it took (what one checkpoint costs).
docs/results.md's table of the unedited SmolLM2-135M is this bench's output.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from rlsedit_cli.eval.general import (
    GeneralResult,
    GeneralSettings,
    TaskManagers,
    evaluate_general,
)
from rlsedit_cli.models.handle import ModelHandle

if TYPE_CHECKING:
    from rlsedit_cli.accel.lower import LowerStates


def stderr_key(metric: str) -> str:
    """lm-eval's name of a metric's standard error: ``acc,none`` -> ``acc_stderr,none``."""
    name, _, flt = metric.partition(",")
    return f"{name}_stderr,{flt}"


def bench_general(handle: ModelHandle, tasks: list[str], opts: GeneralSettings,
                  managers: TaskManagers | None = None,
                  lower: LowerStates | None = None) -> Iterator[dict]:
    """One row per task, task by task: figure, interval, documents, few-shot, source, seconds
    (or its error). ``managers``: lm-eval's task index, built once as a run builds it;
    ``lower``: the blocks below the edited layers, replayed as a run's later points do."""
    managers = managers or TaskManagers()
    for task in tasks:
        yield from _rows(handle, evaluate_general(handle, [task], opts, managers, lower), opts)


def _rows(handle: ModelHandle, res: GeneralResult, opts: GeneralSettings) -> list[dict]:
    base = {"bench": "general", "model": str(handle.spec.name), "device": str(handle.device),
            "batch_size": opts.batch_size, "seed": opts.seed}
    rows = []
    for task, score in res.scores.items():
        settings = res.settings[task]
        stderr = res.metrics[task].get(stderr_key(settings["metric"]))
        rows.append({**base, "task": task, "score": round(score, 4),
                     "ci95": round(1.96 * stderr, 4) if isinstance(stderr, float) else None,
                     **settings, "seconds": res.seconds[task], "metrics": {k: round(float(v), 4)
                                             for k, v in res.metrics[task].items()}})
    rows += [{**base, "task": task, "error": message} for task, message in res.errors.items()]
    return rows


def compare_general(points: list[dict]) -> dict:
    """Each configuration's point against the first's: seconds and speed-up per point and per
    task, and each task's figure and its difference (points; perplexity in percent)."""
    first = points[0]
    scores = [{r["task"]: r for r in p["tasks"] if "score" in r} for p in points]
    out = {"bench": "general_compare", "configs": [p["config"] for p in points],
           "point_seconds": [p["seconds"] for p in points],
           "speedup": [round(first["seconds"] / p["seconds"], 2) if p["seconds"] else None
                       for p in points], "tasks": {}}
    for task, row in scores[0].items():
        entry = {"metric": row["metric"], "scores": [], "difference": [], "seconds": []}
        for per in scores:
            other = per.get(task)
            score = other["score"] if other else None
            entry["scores"].append(score)
            entry["seconds"].append(other["seconds"] if other else None)
            if score is None:
                entry["difference"].append(None)
            elif "perplexity" in row["metric"]:
                entry["difference"].append(round(100 * (score / row["score"] - 1), 3))
            else:
                entry["difference"].append(round(100 * (score - row["score"]), 3))
        out["tasks"][task] = entry
    return out
