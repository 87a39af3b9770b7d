"""The five steps of a tune (:mod:`rlsedit_cli.tune.pipeline`), each writing its result file in
the tune's folder; a step whose file is there already is kept as it is."""

from __future__ import annotations

import json
import logging

from omegaconf import OmegaConf

from rlsedit_cli.tune import jobs
from rlsedit_cli.tune.pipeline import Tune

log = logging.getLogger(__name__)


def _done(tune: Tune, name: str) -> bool:
    if (tune.out / name).is_file():
        log.info("tune: %s is done (%s)", name.split("/")[0].split(".")[0], tune.out / name)
        return True
    return False


def know(tune: Tune) -> None:
    """The unedited model on the tuning records; refuses records an edit cannot show on."""
    from rlsedit_cli.runner.run import build
    from rlsedit_cli.tune.knowledge import check_usable, knowledge

    if not _done(tune, "knowledge.json"):
        tune.check_budget("the knowledge check")
        protocol = build(tune.cfg.dataset).protocol
        figures = knowledge(tune.handle, tune.tuning_records, tune.cfg.measure, protocol)
        figures["where"] = tune.where()
        tune.save("knowledge.json", figures)
        log.info("tune know: the unedited model on %d tuning records: efficacy %.1f, "
                 "generalization %.1f, specificity %.1f", figures["records"],
                 figures["efficacy"], figures.get("generalization") or float("nan"),
                 figures["specificity"] or float("nan"))
    check_usable(tune.load("knowledge.json"), tune.where())


def trace(tune: Tune) -> None:
    """Causal tracing over the first ``trace_records`` tuning records."""
    from rlsedit_cli.tune.layers import trace_records, write_trace

    if _done(tune, "trace/trace.json"):
        return
    editor = tune.cfg.editor
    if "layers" not in editor and not ("layer" in editor and "target" in editor):
        log.info("tune trace: %s edits no layer a trace chooses; skipped", tune.editor)
        return
    tune.check_budget("the causal trace")
    s = tune.settings
    records = tune.tuning_records[: s.trace_records]
    configured = list(tune.cfg.model.edit_layers)
    result = trace_records(tune.handle, records, tune.where(), s.trace_samples, s.window,
                           s.noise, len(configured), configured)
    (tune.out / "trace").mkdir(parents=True, exist_ok=True)
    write_trace(tune.out / "trace", result, tune.model)  # trace.json last: the step's mark
    log.info("tune trace: peak at layer %d over %d known facts; proposed layers %s",
             result["peak_layer"], result["traced"], result["proposed_layers"])


def targets(tune: Tune) -> None:
    """Step size, clamp and steps of the target optimisation at the inject layer."""
    from rlsedit_cli.editing.templates import context_templates
    from rlsedit_cli.editors.base import target_config
    from rlsedit_cli.tune.targets import choose_targets, target_curves

    if _done(tune, "targets.json") or "target" not in tune.cfg.editor:
        return
    tune.check_budget("the target settings")
    chosen = tune.chosen()
    if "layers" in tune.cfg.editor:
        layers = OmegaConf.to_container(tune.cfg.model.edit_layers)
        if "model.edit_layers" in chosen:
            layers = json.loads(chosen["model.edit_layers"][0])  # written by json.dumps
        z_layer, scale_by = max(layers), "residual"
    else:  # ROME: its layer's MLP output
        z_layer = int(chosen.get("model.single_layer", (tune.cfg.model.single_layer,))[0])
        scale_by = "map"
    target = target_config(OmegaConf.to_container(tune.cfg.editor.target, resolve=True))
    s = tune.settings
    requests = tune.tuning_records[: s.target_records]
    templates = context_templates(tune.handle, target.context_templates,
                                  seed=int(tune.cfg.editor.seed))
    rows = target_curves(tune.handle, requests, templates, z_layer, target, s.lrs, s.clamps,
                         2 * target.steps, scale_by)
    configured = {"lr": target.lr, "clamp_norm_factor": target.clamp_norm_factor,
                  "steps": target.steps}
    choice = choose_targets(rows, configured)
    tune.save("targets.json", {"z_layer": z_layer, "requests": len(requests),
                               "configured": configured, "curves": rows, "choice": choice})
    log.info("tune targets: lr %g, clamp %g, %d steps (%s)", choice["lr"],
             choice["clamp_norm_factor"], choice["steps"],
             "converged" if choice["converged"] else "nothing converged")


def samples(tune: Tune) -> None:
    """The anchor statistics' sample count (editors that read them: those with targets)."""
    if _done(tune, "samples.json") or "target" not in tune.cfg.editor:
        return
    full = int(tune.cfg.model.anchor_samples)
    counts = tune.settings.sample_counts or jobs.sample_counts(full)
    if full not in counts:
        counts = [*counts, full]
    points = tune.run_jobs("samples", [{"model.anchor_samples": str(n)} for n in counts])
    for p, n in zip(points, counts):
        p["samples"] = n
    chosen = jobs.choose_samples(points, full)
    tune.save("samples.json", {"configured": full, "points": points, "chosen": chosen,
                               "rule": jobs.SAMPLES_RULE})
    log.info("tune samples: %d of %d anchor samples (%s)", chosen, full, jobs.SAMPLES_RULE)


def grid(tune: Tune) -> None:
    """The trade-off grid and the configured settings on the same records; the choice."""
    from rlsedit_cli.tune.write import write_report

    if not _done(tune, "grid.json"):
        values = jobs.grid_points(tune.settings.grid) if tune.settings.grid else [{}]
        points = tune.run_jobs("grid", values) + tune.run_jobs("configured", [{}])
        choice = jobs.choose_point(points)
        chosen = tune.chosen() if choice["name"] != "configured" else {}
        settings = {k: v for k, (v, _) in chosen.items()} | choice["values"]
        tune.save("grid.json", {"points": points, "pareto": jobs.pareto(points),
                                "chosen": choice["name"], "rule": jobs.TRADEOFF_RULE,
                                "settings": settings,
                                "why": {k: why for k, (_, why) in chosen.items()}})
        log.info("tune grid: chose %s (%s)", choice["name"], jobs.TRADEOFF_RULE)
    write_report(tune)
