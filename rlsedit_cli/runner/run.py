"""``run(cfg)``: load, stream the edit batches through the editor, measure, write the run folder.

The Hydra entry point (:mod:`rlsedit_cli.app`) is a thin wrapper over :func:`run`; tests call
:func:`run` directly with a composed config.
"""

from __future__ import annotations

import logging
import platform
import time

import torch
import transformers
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlsedit_cli.datasets.base import EditDataset
from rlsedit_cli.datasets.stream import make_stream
from rlsedit_cli.errors import ConfigError
from rlsedit_cli.eval.counterfact import evaluate
from rlsedit_cli.eval.general import check_strict, evaluate_general
from rlsedit_cli.models.loader import load_model, resolve_device
from rlsedit_cli.runner.folder import RunFolder
from rlsedit_cli.stats.anchor import AnchorStats

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """Value checks the schemas cannot express; each error names the key and the fix."""
    ev = cfg.eval
    for key in ("batch_size", "max_new_tokens"):
        if ev[key] < 1:
            raise ConfigError(f"eval.{key}={ev[key]} must be at least 1")
    for key in ("retention_edits", "retention_every", "generation_prompts", "every_edits"):
        if ev[key] < 0:
            raise ConfigError(f"eval.{key}={ev[key]} must not be negative")


def build(node: DictConfig, **kwargs):
    """Instantiate a ``_target_`` config with runtime objects (model handle, ...).

    The target is called here, not inside Hydra, so that its own errors (a bad record, a bad
    value) reach the user unwrapped, and runtime objects are never converted to configs.
    """
    return instantiate(node, _partial_=True, _convert_="all")(**kwargs)


def _due(index: int, every: int, last: bool) -> bool:
    return last or (every > 0 and (index + 1) % every == 0)


def run(cfg: DictConfig) -> dict:
    """Run one editing experiment; return the summary (also written to summary.json)."""
    folder = RunFolder(cfg.paths.run_dir)
    with folder.log_file():
        return _run(cfg, folder)


def _run(cfg: DictConfig, folder: RunFolder) -> dict:
    check_config(cfg)
    folder.reset()
    folder.write_config(cfg)
    transformers.set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    handle = load_model(cfg.model, device)
    dataset: EditDataset = build(cfg.dataset)
    batches = make_stream(dataset.records, **cfg.stream)
    edited = [r for b in batches for r in b]
    stats = AnchorStats(handle, cfg.paths.cache, **cfg.stats)
    editor = build(cfg.editor, handle=handle, stats=stats)
    tracker = build(cfg.logger, run_dir=str(folder.path), run_name=folder.path.name,
                    run_config=OmegaConf.to_container(cfg, resolve=True))
    refs = dataset.references
    log.info("run folder %s: editor=%s model=%s dataset=%s, %d edits in %d batches on %s",
             folder.path, cfg.editor.name, cfg.model.name, dataset.name, len(edited),
             len(batches), device)
    summary: dict = {"editor": cfg.editor.name, "model": cfg.model.name, "dataset": dataset.name,
                     "num_edits": len(edited), "batch_size": cfg.stream.batch_size,
                     "skipped_records": len(dataset.skipped), "device": str(device)}
    eval_seconds = 0.0
    general: list[dict] = []

    def general_checkpoint(edits: int) -> dict:
        res = evaluate_general(handle, list(cfg.eval.tasks), cfg.eval.limit,
                               cfg.eval.num_fewshot, cfg.eval.lm_batch_size,
                               cfg.eval.allow_code_execution, cfg.seed)
        check_strict(res, cfg.eval.strict)
        for task, score in res.scores.items():
            folder.append_csv("general.csv", {"edits": edits, "task": task, "score": score})
        general.append({"edits": edits, "scores": res.scores, "errors": res.errors})
        log.info("general ability after %d edits: %s", edits, res.scores)
        return res.scores

    ok = False
    try:
        if cfg.eval.pre_edit:
            t0 = time.perf_counter()
            summary["pre"] = evaluate(handle, edited, refs, cfg.eval)
            if cfg.eval.tasks:
                tracker.log({"general": general_checkpoint(0)}, step=0)
            eval_seconds += time.perf_counter() - t0
            log.info("before editing: %s", _brief(summary["pre"]))
        retention = edited[: cfg.eval.retention_edits]
        edit_seconds, done = 0.0, 0
        for i, batch in enumerate(tqdm(batches, desc=f"edit ({cfg.editor.name})", unit="batch")):
            t0 = time.perf_counter()
            stats = editor.edit(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            edit_seconds += dt
            done += len(batch)
            t0 = time.perf_counter()
            now = evaluate(handle, batch, refs, cfg.eval, families=("efficacy",))
            row = {"batch": i, "edits": done, "edit_seconds": round(dt, 4),
                   "batch_efficacy": now["efficacy"], **stats}
            if retention and _due(i, cfg.eval.retention_every, i == len(batches) - 1):
                measured = retention[:done]
                ret = evaluate(handle, measured, refs, cfg.eval)
                folder.append_csv("retention.csv", {"batch": i, "edits": done,
                                                    "measured": len(measured), **ret})
                row["retention"] = {k: v for k, v in ret.items() if not k.endswith("_ci95")}
            every = cfg.eval.every_edits
            if cfg.eval.tasks and (i == len(batches) - 1 or (
                    every > 0 and done // every > (done - len(batch)) // every)):
                row["general"] = general_checkpoint(done)
            eval_seconds += time.perf_counter() - t0
            folder.append_jsonl("metrics.jsonl", row)
            tracker.log(row, step=done)
        t0 = time.perf_counter()
        summary |= evaluate(handle, edited, refs, cfg.eval)
        eval_seconds += time.perf_counter() - t0
        if general:
            summary["general"] = {**general[-1]["scores"], "checkpoints": general,
                                  "errors": general[-1]["errors"]}
        summary |= {"edit_seconds": round(edit_seconds, 3), "eval_seconds": round(eval_seconds, 3),
                    "versions": {"torch": torch.__version__,
                                 "transformers": transformers.__version__,
                                 "python": platform.python_version()}}
        summary["objective"] = objective(summary, cfg.objective)
        folder.write_json("summary.json", summary)
        tracker.log_summary(summary)
        _plots(folder, tracker)
        log.info("after %d edits: %s", len(edited), _brief(summary))
        ok = True
        return summary
    finally:
        tracker.finish(ok)


def _plots(folder: RunFolder, tracker) -> None:
    """The run's own curves, in the run folder and on the tracker."""
    from rlsedit_cli.report.plots import all_plots
    from rlsedit_cli.report.runs import read_run

    done = read_run(folder.path)
    for path in all_plots([done], folder.path / "plots"):
        tracker.log_image(f"plots/{path.stem}", path)
    if done.retention:
        columns = list(done.retention[0])
        tracker.log_table("retention", columns,
                          [[row[c] for c in columns] for row in done.retention])


def objective(summary: dict, name: str) -> float | None:
    """The value a sweep maximises: the harmonic mean of efficacy, generalization and
    specificity (``hmean``), or one summary metric."""
    if name == "hmean":
        parts = [summary.get(k) for k in ("efficacy", "generalization", "specificity")]
        parts = [p for p in parts if p is not None]
        if not parts or min(parts) <= 0:
            return 0.0 if parts else None
        return round(len(parts) / sum(1.0 / p for p in parts), 4)
    value = summary.get(name)
    if value is None and name not in summary:
        raise ConfigError(f"objective={name!r} is not a summary metric: use hmean, efficacy, "
                          "generalization, specificity, fluency or consistency")
    return value


def _brief(metrics: dict) -> str:
    keys = ("efficacy", "generalization", "specificity", "fluency", "consistency")
    return ", ".join(f"{k} {metrics[k]:.2f}" for k in keys if metrics.get(k) is not None)
