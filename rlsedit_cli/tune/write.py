"""A tune's outputs: the chosen settings where the configs read them (``tuned/EDITOR_MODEL.yaml``
on Hydra's search path, each value with what measured it) and the report (markdown, plots)."""

from __future__ import annotations

import logging
from pathlib import Path

from rlsedit_cli.errors import ConfigError
from rlsedit_cli.files import replaced_atomically
from rlsedit_cli.tune.pipeline import Tune

log = logging.getLogger(__name__)

MARK = "# Written by rlsedit tune"


def settings_yaml(tune: Tune, grid: dict) -> str:
    """The settings file: ``# @package _global_`` and nested keys, one comment each."""
    why = dict(grid["why"])
    n = len(grid["points"])
    for key in grid["settings"]:
        why.setdefault(key, f"trade-off: {grid['rule']}, over {n} points of "
                            f"{tune.settings.edits} held-out edits (grid.json)")
    lines = ["# @package _global_",
             f"{MARK} in {tune.out.resolve()}: the settings it chose for {tune.editor} on "
             f"{tune.model}.",
             f"# A run with model={tune.model} editor={tune.editor} reads this file after "
             f"conf/editor_model/; tuned=none runs without it.", ""]
    if not grid["settings"]:
        lines.append("# The configured settings were chosen: this file changes nothing.")
    tree: dict = {}
    for key, value in grid["settings"].items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = (value, why[key])

    def emit(node: dict, depth: int) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                lines.append(f"{'  ' * depth}{k}:")
                emit(v, depth + 1)
            else:
                lines.append(f"{'  ' * depth}{k}: {v[0]}  # {v[1]}")
    emit(tree, 0)
    return "\n".join(lines) + "\n"


def write_settings(tune: Tune, grid: dict) -> Path | None:
    """Write the settings file; refuse to replace one that ``rlsedit tune`` did not write."""
    if tune.settings_dir is None:
        return None
    path = tune.settings_dir / "tuned" / f"{tune.editor}_{tune.model}.yaml"
    if path.exists() and not path.read_text(encoding="utf-8").startswith(
            f"# @package _global_\n{MARK}"):
        raise ConfigError(f"{path} was not written by rlsedit tune: move it away, or write "
                          "elsewhere with --settings-dir DIR")
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp:
        tmp.write_text(settings_yaml(tune, grid), encoding="utf-8")
    log.info("tune: settings written to %s (a run with model=%s editor=%s reads them%s)", path,
             tune.model, tune.editor, "" if _on_search_path(tune.settings_dir) else
             f" with hydra.searchpath=[file://{tune.settings_dir.resolve()}]")
    return path


def _on_search_path(folder: Path) -> bool:
    from rlsedit_cli.config import conf_dir

    return folder.resolve() == conf_dir().resolve()


def _fmt(p: dict, metric: str) -> str:
    value, ci = p.get(metric), p.get(f"{metric}_ci95")
    return "-" if value is None else f"{value:.1f} ± {ci or 0:.1f}"


def points_table(points: list[dict], extra: tuple[str, ...] = (), marks: dict | None = None
                 ) -> list[str]:
    rows = ["| job | " + " | ".join(extra) + (" | " if extra else "")
            + "efficacy | generalization | specificity | perplexity |",
            "|---|" + "---|" * len(extra) + "---|---|---|---:|"]
    for p in points:
        values = [str(p["values"].get(k, p.get(k, "-"))) for k in extra]
        name = p["name"] + (f" {marks[p['name']]}" if marks and p["name"] in marks else "")
        rows.append(f"| {name} | " + " | ".join(values) + (" | " if values else "")
                    + f"{_fmt(p, 'efficacy')} | {_fmt(p, 'generalization')} | "
                    f"{_fmt(p, 'specificity')} | {p['perplexity']:.2f} |")
    return rows


def write_report(tune: Tune) -> None:
    """report.md, targets.png and tradeoff.png in the tune folder; the settings file."""
    grid = tune.load("grid.json")
    know, trace = tune.load("knowledge.json"), tune.load("trace/trace.json")
    targets, samples = tune.load("targets.json"), tune.load("samples.json")
    s = tune.settings
    md = [f"# rlsedit tune: {tune.editor} on {tune.model}", "",
          f"Tuning records: {tune.where()} ({s.edits} records; batches of {s.batch}). "
          "Every job below edits them all and measures held-out wikitext-2 word perplexity "
          "before and after.", ""]
    if know:
        done = (grid or samples or {}).get("points") or [{}]
        ppl = done[0].get("perplexity_unedited")
        md += ["## 1. The unedited model on these records", "",
               f"efficacy {_fmt(know, 'efficacy')}, generalization "
               f"{_fmt(know, 'generalization')}, specificity {_fmt(know, 'specificity')}"
               + (f"; held-out perplexity {ppl:.2f}." if ppl else "."), ""]
    if trace:
        md += ["## 2. Causal trace", "",
               f"{trace['traced']} known facts of {trace['traced'] + trace['skipped']} traced; "
               f"peak at layer {trace['peak_layer']}; proposed layers "
               f"{trace['proposed_layers'] or 'none'} (configured {trace['configured_layers']}"
               "). [trace/report.md](trace/report.md)", "", "![trace](trace/trace.png)", ""]
    if targets:
        md += _targets_section(tune, targets)
    if samples:
        md += ["## 4. Anchor samples", "", f"Rule: {samples['rule']}. Chosen: "
               f"**{samples['chosen']}** of {samples['configured']}.", "",
               *points_table(samples["points"], ("samples",)), ""]
    if grid:
        marks = {n: "(front)" for n in grid["pareto"]}
        marks[grid["chosen"]] = "(front, **chosen**)" if grid["chosen"] in marks else "(**chosen**)"
        keys = tuple(s.grid)
        md += ["## 5. Trade-off", "", f"Rule: {grid['rule']}. \"configured\": the settings "
               "the configs held before this tune (hand-chosen), on the same records; the "
               "other jobs use the settings of steps 2-4.", "",
               *points_table(grid["points"], keys, marks), "",
               "![trade-off](tradeoff.png)", ""]
        _tradeoff_plot(tune, grid)
        path = write_settings(tune, grid)
        md += ["## Settings", "", f"Written to `{path}`:" if path else "Not written "
               "(--settings-dir none):", "", "```yaml", settings_yaml(tune, grid).rstrip(),
               "```", ""]
    with replaced_atomically(tune.out / "report.md") as tmp:
        tmp.write_text("\n".join(md), encoding="utf-8")
    log.info("tune: report in %s", tune.out / "report.md")


def _targets_section(tune: Tune, targets: dict) -> list[str]:
    from rlsedit_cli.tune.targets import converged_at

    c = targets["choice"]
    lines = ["## 3. Target optimisation", "",
             f"{targets['requests']} requests at layer {targets['z_layer']}, every early stop "
             f"off, {len(targets['curves'][0]['nll']) if targets['curves'] else 0} passes. Rule: "
             f"{c['rule']}. Chosen: lr {c['lr']:g}, clamp {c['clamp_norm_factor']:g}, "
             f"{c['steps']} steps (configured: lr {targets['configured']['lr']:g}, clamp "
             f"{targets['configured']['clamp_norm_factor']:g}, "
             f"{targets['configured']['steps']} steps).", "",
             "| lr | clamp | NLL before | NLL after the configured steps | below the threshold "
             "after | seconds |", "|---:|---:|---:|---:|---:|---:|"]
    steps = int(targets["configured"]["steps"])
    for r in targets["curves"]:
        at = converged_at(r["nll"], c["threshold"])
        lines.append(f"| {r['lr']:g} | {r['clamp']:g} | {r['nll'][0]:.3f} | "
                     f"{r['nll'][min(steps, len(r['nll'])) - 1]:.3f} | "
                     f"{'-' if at is None else at} | {r['seconds']:.1f} |")
    _targets_plot(tune, targets)
    return [*lines, "", "![targets](targets.png)", ""]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _targets_plot(tune: Tune, targets: dict) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in targets["curves"]:
        ax.plot(r["nll"], label=f"lr {r['lr']:g}, clamp {r['clamp']:g}")
    ax.axhline(targets["choice"]["threshold"], color="grey", ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("optimiser steps")
    ax.set_ylabel("mean target NLL")
    ax.set_title(f"{tune.model}: target optimisation at layer {targets['z_layer']}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(tune.out / "targets.png", dpi=120)
    plt.close(fig)


def _tradeoff_plot(tune: Tune, grid: dict) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = grid["points"]
    ax.errorbar([p["perplexity"] for p in pts], [p["efficacy"] for p in pts],
                yerr=[p["efficacy_ci95"] or 0 for p in pts], fmt="o", color="steelblue")
    front = sorted((p for p in pts if p["name"] in grid["pareto"]), key=lambda p: p["perplexity"])
    ax.plot([p["perplexity"] for p in front], [p["efficacy"] for p in front], color="grey",
            ls="--", label="Pareto front")
    for p in pts:
        ax.annotate(p["name"], (p["perplexity"], p["efficacy"]), fontsize=6,
                    color="firebrick" if p["name"] == grid["chosen"] else "black")
    ax.set_xlabel("held-out perplexity after the edits")
    ax.set_ylabel("efficacy %")
    ax.set_title(f"{tune.editor} on {tune.model}: {tune.settings.edits} edits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(tune.out / "tradeoff.png", dpi=120)
    plt.close(fig)
