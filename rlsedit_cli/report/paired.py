"""Paired differences between two general-ability points scored on the same documents.

Two points of a run (after N edits against the unedited model), or two runs at the same point
(editor A against editor B), score the same documents; their difference is read from the
document pairs, which removes the documents' own spread from the interval:

- the figure: an accuracy-like metric in points (mean x 100); a perplexity from its documents'
  summed log-likelihoods and units (lm-eval's ``word_perplexity``: exp(-sum ll / sum words));
- the difference: B - A in points, or for a perplexity 100 (B / A - 1), in percent;
- its 95% interval: a paired bootstrap over the documents (the same resampled documents for both
  points; :data:`RESAMPLES` draws, seeded); for 0/1 metrics also McNemar's exact test on the
  documents where the two points disagree;
- *established* when the interval excludes zero.

Two runs compare only when they scored alike: the same figure-changing eval settings
(:data:`SCORING`) and, for bfloat16 points, the same processor (summary.json's
``versions.processor``: AMX and AVX512-BF16 round bfloat16 products differently). Otherwise the
row says what differed and is not established, whatever its interval.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

RESAMPLES = 2000
SCORING = ("compute_dtype", "attention_dtype", "num_fewshot", "fewshot", "gen_kwargs", "source")


def read_points(run: Path) -> dict[int, dict[str, dict[str, dict]]]:
    """edits -> task -> doc_id -> the document's metric values, from ``documents/``."""
    points: dict[int, dict[str, dict[str, dict]]] = {}
    for path in sorted((run / "documents").glob("general_*.jsonl")):
        edits = int(path.stem.removeprefix("general_"))
        tasks: dict[str, dict[str, dict]] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                tasks.setdefault(row.pop("task"), {})[str(row.pop("doc_id"))] = row
        points[edits] = tasks
    return points


def _figure(values: np.ndarray, units: np.ndarray | None, metric: str) -> np.ndarray:
    """The figure over the last axis: mean x 100, or a perplexity / bits per unit."""
    if units is None:
        return 100 * values.mean(-1)
    per_unit = -values.sum(-1) / units.sum(-1)
    return per_unit / math.log(2) if metric == "bits_per_byte" else np.exp(per_unit)


def _columns(docs: dict[str, dict], ids: list[str], metric: str):
    raw = [docs[i][metric] for i in ids]
    if isinstance(raw[0], list):
        both = np.asarray(raw, dtype=np.float64)
        return both[:, 0], both[:, 1]
    return np.asarray(raw, dtype=np.float64), None


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value of paired 0/1 outcomes."""
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(a: dict[str, dict], b: dict[str, dict], metric: str,
                      seed: int = 0) -> dict | None:
    """B against A on the documents both scored (None: no common document with ``metric``)."""
    ids = sorted(i for i in a.keys() & b.keys() if metric in a[i] and metric in b[i])
    if not ids:
        return None
    va, ua = _columns(a, ids, metric)
    vb, ub = _columns(b, ids, metric)
    fa, fb = float(_figure(va, ua, metric)), float(_figure(vb, ub, metric))
    ratio = ua is not None

    def diff(x, y):
        return 100 * (y / x - 1) if ratio else y - x

    draw = np.random.default_rng(seed).integers(0, len(ids), size=(RESAMPLES, len(ids)))
    boot = diff(_figure(va[draw], None if ua is None else ua[draw], metric),
                _figure(vb[draw], None if ub is None else ub[draw], metric))
    lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    out = {"metric": metric, "documents": len(ids), "a": round(fa, 4), "b": round(fb, 4),
           "difference": round(float(diff(fa, fb)), 4), "unit": "%" if ratio else "points",
           "ci95": [round(lo, 4), round(hi, 4)], "established": lo > 0 or hi < 0}
    if not ratio and set(np.unique(np.concatenate([va, vb]))) <= {0.0, 1.0}:
        out["mcnemar_p"] = round(mcnemar(va, vb), 4)
    return out


def scoring(run) -> dict:
    """What decides a run's general-ability figures besides the model and the documents: its
    eval settings in :data:`SCORING` (a run from before a setting existed: the default) and,
    for bfloat16 points, the processor."""
    from dataclasses import MISSING, fields

    from rlsedit_cli.settings import EvalConfig

    saved = run.config.get("eval") or {}
    out = {}
    for f in fields(EvalConfig):
        if f.name in SCORING:
            default = f.default_factory() if f.default is MISSING else f.default
            out[f"eval.{f.name}"] = saved.get(f.name, default)
    if out["eval.compute_dtype"] != "float32":
        out["processor"] = (run.summary.get("versions") or {}).get("processor", "not recorded")
    return out


def _differing(a, b) -> str:
    """'' when runs ``a`` and ``b`` scored alike, else what differed: 'key: A / B; ...'."""
    sa, sb = scoring(a), scoring(b)
    return "; ".join(f"{k}: {sa.get(k)} / {sb.get(k)}" for k in sorted(sa.keys() | sb.keys())
                     if sa.get(k) != sb.get(k))


def paired_rows(runs) -> list[dict]:
    """Each run's last general-ability point against its unedited point, and each later run
    against the first at their last common point, task by task (runs: report/runs.py's)."""
    points = {r.path: read_points(r.path) for r in runs}
    metric = {row["task"]: str(row["metric"]).split(",")[0] for r in runs for row in r.general
              if row.get("metric")}
    rows = []

    def add(label: str, a: dict, b: dict, differing: str = "") -> None:
        for task in sorted(a.keys() & b.keys() & metric.keys()):
            found = paired_difference(a[task], b[task], metric[task])
            if found is not None:
                if differing:  # the difference holds the scoring's too
                    found |= {"established": False, "scored_differently": differing}
                rows.append({"comparison": label, "task": task, **found})

    for r in runs:
        p = points[r.path]
        if 0 in p and max(p) > 0:
            add(f"{r.label}: after {max(p)} edits against unedited", p[0], p[max(p)])
    first = runs[0]
    for other in runs[1:]:
        common = (points[first.path].keys() & points[other.path].keys()) - {0}
        if common:
            at = max(common)
            add(f"{other.label} against {first.label}, after {at} edits",
                points[first.path][at], points[other.path][at], _differing(first, other))
    return rows


def paired_table(runs) -> str:
    """The paired differences as a markdown table ('' when no run kept per-document results)."""
    rows = paired_rows(runs)
    if not rows:
        return ""
    lines = ["| comparison | task | metric | docs | A | B | B - A (95% CI) | McNemar p | "
             "established |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unit = "%" if r["unit"] == "%" else ""
        lines.append(f"| {r['comparison']} | {r['task']} | {r['metric']} | {r['documents']} | "
                     f"{r['a']:.4g} | {r['b']:.4g} | {r['difference']:+.2f}{unit} "
                     f"[{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}] | "
                     f"{r.get('mcnemar_p', '')} | {_verdict(r)} |")
    return "\n".join(lines) + "\n"


def _verdict(row: dict) -> str:
    if row.get("scored_differently"):
        return f"no: scored differently ({row['scored_differently']})"
    return "yes" if row["established"] else "no"
