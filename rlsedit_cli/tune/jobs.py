"""The short held-out runs a tune makes (anchor samples, the trade-off grid, the configured
settings), the points they give, and the rules that choose among them.

A job is an ordinary run (:func:`rlsedit_cli.runner.run.run`) in a folder of the tune: the
tuning records (``stream.offset``), no fluency texts, held-out perplexity before and after, a
checkpoint after every batch. Run again, a finished job is read back and a stopped one goes on
from its checkpoint (``resume_jobs``), so a tune that was stopped continues where it was.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from rlsedit_cli.files import parse_override

log = logging.getLogger(__name__)

PERPLEXITY = "rlsedit_wikitext/word_perplexity"
QUIET = {"logger": "none", "measure.fluency": "false", "measure.generated_accuracy": "false",
         "measure.retention_every": "0", "measure.objective_terms": "false",
         "checkpoint.every": "1", "eval": "wikitext", "eval.every_edits": "0",
         "eval.limit": "4"}  # held-out wikitext-2 articles (4: as eval=signal)
MULTIPLIERS = (1 / 3, 1.0, 3.0)
GRIDS = {  # each editor's strength settings: fixed values, or multiples of the configured one
    "rlsedit": {"editor.lam": (0, 10, 100), "editor.mu": (1, 10)},
    "memit": {"editor.n_anchor": MULTIPLIERS},
    "alphaedit": {"editor.threshold": (0.5, 1.0, 2.0)},
    "ft": {"editor.lr": MULTIPLIERS},
    "ultraedit": {"editor.lr": MULTIPLIERS},
}
SHORT = {"model.anchor_samples": "n"}  # in job names
RELATIVE = {"editor.n_anchor", "editor.threshold", "editor.lr"}  # grid values are multiples


def merged(*parts: dict) -> list[str]:
    """``key=value`` overrides, later parts winning for the same key."""
    out: dict[str, str] = {}
    for part in parts:
        out |= part
    return [f"{k}={v}" for k, v in out.items()]


def as_dict(overrides: list[str]) -> dict:
    return dict(parse_override(o) for o in overrides)


def default_grid(editor: str, cfg) -> dict[str, list]:
    """The editor's grid with relative values made absolute from the configured ``cfg``."""
    grid = {}
    for key, values in GRIDS.get(editor, {}).items():
        if key in RELATIVE:
            base = float(OmegaConf.select(cfg, key))
            values = tuple(float(f"{base * m:.3g}") for m in values)
        grid[key] = list(values)
    return grid


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``--grid KEY=V1,V2`` options as {key: [values]} (one value: a fixed setting)."""
    from rlsedit_cli.errors import ConfigError

    grid = {}
    for item in items:
        key, value = parse_override(item)
        if not key or not value:
            raise ConfigError(f"--grid {item!r}: write it KEY=V1,V2,... (say editor.lam=0,10)")
        grid[key] = [v.strip() for v in value.split(",") if v.strip()]
    return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, as override dicts."""
    keys = list(grid)
    return [dict(zip(keys, (str(v) for v in combo)))
            for combo in itertools.product(*(grid[k] for k in keys))]


def job_name(prefix: str, values: dict) -> str:
    """A folder name from the job's own values: ``grid_lam10_mu1``."""
    from rlsedit_cli.config import folder_name

    parts = [f"{SHORT.get(k, k.rsplit('.', 1)[-1])}{v}" for k, v in values.items()]
    return folder_name("_".join([prefix, *parts]))


def job_config(overrides: list[str], folder: Path):
    """A job's config: ``overrides`` composed, its run folder ``folder``."""
    from rlsedit_cli.config import composed

    cfg = composed(overrides)
    with open_dict(cfg):
        cfg.paths.run_dir = str(folder)
        cfg.resume_jobs = True
    return cfg


def same_job(cfg, folders) -> Path | None:
    """A finished job among ``folders`` that ran exactly ``cfg``'s settings (say, the
    configured settings when the tune proposed them too)."""
    from rlsedit_cli.runner.checkpoint import edit_config, saved_edit_config

    mine = edit_config(cfg)
    for folder in folders:
        if not (folder / "summary.json").is_file() or folder == Path(cfg.paths.run_dir):
            continue
        if saved_edit_config(folder) == mine:
            return folder
    return None


def run_job(overrides: list[str], folder: Path) -> dict:
    """One job: run it into ``folder`` (or read or resume an earlier attempt there); its
    summary. A finished job of the same settings in a sibling folder is read instead."""
    from rlsedit_cli.runner.run import run

    cfg = job_config(overrides, folder)
    twin = same_job(cfg, sorted(folder.parent.glob("*/"))) if folder.parent.is_dir() else None
    if twin is not None:
        log.info("job %s has the settings of the finished job %s: its figures are used",
                 folder.name, twin.name)
        return json.loads((twin / "summary.json").read_text(encoding="utf-8"))
    return run(cfg)


def point(name: str, values: dict, summary: dict) -> dict:
    """A job's figures at its end: the editing metrics with their intervals, and perplexity."""
    general = summary.get("general") or {}
    points = general.get("points") or []
    unedited = points[0]["scores"].get("rlsedit_wikitext") if points else None
    out = {"name": name, "values": values, "num_edits": summary.get("num_edits"),
           "perplexity": general.get(PERPLEXITY), "perplexity_unedited": unedited,
           "edit_seconds": summary.get("edit_seconds")}
    for metric in ("efficacy", "generalization", "specificity"):
        out[metric] = summary.get(metric)
        out[f"{metric}_ci95"] = summary.get(f"{metric}_ci95")
        out[f"{metric}_unedited"] = (summary.get("pre") or {}).get(metric)
    return out


def pareto(points: list[dict]) -> list[str]:
    """Names of the points no other point beats on both efficacy (higher) and perplexity
    (lower)."""
    def beaten(p):
        return any(q["efficacy"] >= p["efficacy"] and q["perplexity"] <= p["perplexity"]
                   and (q["efficacy"] > p["efficacy"] or q["perplexity"] < p["perplexity"])
                   for q in points)
    return [p["name"] for p in points if not beaten(p)]


TRADEOFF_RULE = ("the lowest held-out perplexity among the points whose efficacy is within one "
                 "95% interval of the best efficacy")


def choose_point(points: list[dict]) -> dict:
    """:data:`TRADEOFF_RULE` (ties: the higher generalization, then the higher specificity)."""
    best = max(points, key=lambda p: p["efficacy"])
    floor = best["efficacy"] - (best["efficacy_ci95"] or 0.0)
    near = [p for p in points if p["efficacy"] >= floor]
    return min(near, key=lambda p: (p["perplexity"], -p["generalization"], -p["specificity"]))


SAMPLES_RULE = ("the fewest samples whose efficacy, generalization and specificity lie within "
                "the all-samples run's 95% intervals and whose perplexity is within 1% of it")


def choose_samples(points: list[dict], full: int) -> int:
    """:data:`SAMPLES_RULE`; ``points`` carry ``samples``; ``full``: the configured count."""
    ref = next(p for p in points if p["samples"] == full)
    for p in sorted(points, key=lambda p: p["samples"]):
        same = all(abs(p[m] - ref[m]) <= (ref[f"{m}_ci95"] or 0.0)
                   for m in ("efficacy", "generalization", "specificity"))
        if same and abs(p["perplexity"] - ref["perplexity"]) <= 0.01 * ref["perplexity"]:
            return p["samples"]
    return full


def sample_counts(full: int) -> list[int]:
    """100, 300, 1,000, 3,000, ... below ``full`` (by a factor of 1.5 at least), and ``full``."""
    counts, n = [], 100
    while n * 1.5 <= full:
        counts.append(n)
        n = n * 3 if str(n).startswith("1") else n * 10 // 3
    return [*counts, full]
