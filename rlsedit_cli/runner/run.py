"""``run(cfg)``: load, stream the edit batches through the editor, measure, write the run folder.

The Hydra entry point (:mod:`rlsedit_cli.app`) is a thin wrapper over :func:`run`; tests call it
directly with a composed config. With ``resume=RUN_DIR`` the run continues from RUN_DIR's last
checkpoint: no edit lost, none applied twice.
"""

from __future__ import annotations

import logging
import platform
import time

import psutil
import torch
import transformers
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from rlsedit_cli.datasets.stream import make_stream
from rlsedit_cli.errors import ConfigError
from rlsedit_cli.models.loader import load_model, resolve_device
from rlsedit_cli.progress import progress
from rlsedit_cli.runner import checkpoint
from rlsedit_cli.runner.folder import RunFolder
from rlsedit_cli.runner.measure import Measurer, brief
from rlsedit_cli.stats.anchor import AnchorStats

log = logging.getLogger(__name__)


def build(node: DictConfig, **kwargs):
    """Instantiate a ``_target_`` config with runtime objects (model handle, ...).

    The target is called here, not inside Hydra, so that its own errors (a bad record, a bad
    value) reach the user unwrapped, and runtime objects are never converted to configs.
    """
    return instantiate(node, _partial_=True, _convert_="all")(**kwargs)


def check_config(cfg: DictConfig) -> None:
    """Value checks the schemas cannot express; each error names the key and the fix."""
    ev = cfg.eval
    for key in ("batch_size", "max_new_tokens"):
        if ev[key] < 1:
            raise ConfigError(f"eval.{key}={ev[key]} must be at least 1")
    for key in ("retention_edits", "retention_every", "generation_prompts", "every_edits"):
        if ev[key] < 0:
            raise ConfigError(f"eval.{key}={ev[key]} must not be negative")
    if cfg.checkpoint.every < 0:
        raise ConfigError(f"checkpoint.every={cfg.checkpoint.every} must not be negative")


def objective(summary: dict, name: str) -> float | None:
    """The value a sweep maximises: the harmonic mean of efficacy, generalization and
    specificity (``hmean``), or one summary metric."""
    if name == "hmean":
        parts = [summary.get(k) for k in ("efficacy", "generalization", "specificity")]
        parts = [p for p in parts if p is not None]
        if not parts or min(parts) <= 0:
            return 0.0 if parts else None
        return round(len(parts) / sum(1.0 / p for p in parts), 4)
    if name not in summary:
        raise ConfigError(f"objective={name!r} is not a summary metric: use hmean, efficacy, "
                          "generalization, specificity, fluency or consistency")
    return summary[name]


def memory_mb(device: torch.device) -> float:
    """Memory in use: CUDA memory allocated on a GPU, the process's resident set on the CPU."""
    if device.type == "cuda":
        return round(torch.cuda.memory_allocated(device) / 2**20, 1)
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Run (or resume) one editing experiment; return the summary (also in summary.json).

    Args:
        overrides: the command line's overrides, when there is one; on resume they are checked
            against the checkpoint's settings (without them the whole config is compared).
    """
    folder = RunFolder(cfg.resume or cfg.paths.run_dir)
    with folder.log_file():
        state = None
        if cfg.resume:
            state = checkpoint.load(folder.path)
            if overrides is None:
                checkpoint.check_matches(state["config"], checkpoint.edit_config(cfg), folder.path)
            else:
                checkpoint.check_overrides(state["config"], overrides, folder.path)
            with open_dict(cfg):  # the run goes on with its own settings
                for key, value in state["config"].items():
                    fixed_schema = key in ("model", "stream", "stats", "checkpoint")
                    cfg[key] = OmegaConf.merge(cfg[key], value) if fixed_schema else value
        return Runner(cfg, folder, overrides).run(state)


class Runner:
    """One run: set-up, the stream of batches with checkpoints, the final measurements."""

    def __init__(self, cfg: DictConfig, folder: RunFolder, overrides: list[str] | None) -> None:
        check_config(cfg)
        self.cfg, self.folder, self.overrides = cfg, folder, overrides or []
        transformers.set_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.handle = load_model(cfg.model, self.device, cfg.paths.cache)
        self.dataset = build(cfg.dataset)
        self.batches = make_stream(self.dataset.records, **cfg.stream)
        self.edited = [r for b in self.batches for r in b]
        stats = AnchorStats(self.handle, cfg.paths.cache, **cfg.stats)
        self.editor = build(cfg.editor, handle=self.handle, stats=stats)

    def _start_tracker(self, resumed: bool):
        cfg = self.cfg
        return build(cfg.logger, run_dir=str(self.folder.path),
                     run_name=self.folder.path.name + ("-resumed" if resumed else ""),
                     run_config=OmegaConf.to_container(cfg, resolve=True))

    def run(self, state: dict | None) -> dict:
        cfg, folder = self.cfg, self.folder
        if state is None:
            folder.reset()
            folder.write_config(cfg)
        tracker = self._start_tracker(state is not None)
        measure = Measurer(self.handle, self.dataset.references, cfg.eval, cfg.seed, folder,
                           tracker, self.edited[: cfg.eval.retention_edits])
        summary = {"editor": cfg.editor.name, "model": cfg.model.name,
                   "dataset": self.dataset.name, "num_edits": len(self.edited),
                   "batch_size": cfg.stream.batch_size,
                   "skipped_records": len(self.dataset.skipped), "device": str(self.device),
                   "overrides": self.overrides}
        start, done, edit_seconds = 0, 0, 0.0
        log.info("run folder %s: editor=%s model=%s dataset=%s, %d edits in %d batches on %s",
                 folder.path, cfg.editor.name, cfg.model.name, self.dataset.name,
                 len(self.edited), len(self.batches), self.device)
        ok = False
        try:
            if state is not None:
                start, done, edit_seconds = self._restore(state, measure)
                summary = state["summary"]
            elif cfg.eval.pre_edit:
                summary["pre"] = measure.before(self.edited)
            bar = progress(range(start, len(self.batches)), desc=f"edit ({cfg.editor.name})",
                           unit="batch", initial=start, total=len(self.batches))
            for i in bar:
                batch, last = self.batches[i], i == len(self.batches) - 1
                t0 = time.perf_counter()
                stats = self.editor.edit(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                edit_seconds += dt
                done += len(batch)
                measured_before = measure.seconds
                row = {"batch": i, "edits": done, "edit_seconds": round(dt, 4),
                       "memory_mb": memory_mb(self.device),
                       **measure.after_batch(i, last, batch, done), **stats}
                row["eval_seconds"] = round(measure.seconds - measured_before, 4)
                folder.append_jsonl("metrics.jsonl", row)
                tracker.log(row, step=done)
                every = cfg.checkpoint.every
                if every > 0 and ((i + 1) % every == 0 or last):
                    self._save(i + 1, done, edit_seconds, summary, measure)
            summary |= measure.final(self.edited)
            summary |= {"edit_seconds": round(edit_seconds, 3),
                        "eval_seconds": round(measure.seconds, 3),
                        "versions": {"torch": torch.__version__,
                                     "transformers": transformers.__version__,
                                     "python": platform.python_version()}}
            summary["objective"] = objective(summary, cfg.objective)
            folder.write_json("summary.json", summary)
            tracker.log_summary(summary)
            self._plots(tracker)
            log.info("after %d edits: %s", len(self.edited), brief(summary))
            ok = True
            return summary
        finally:
            tracker.finish(ok)

    def _save(self, next_batch: int, done: int, edit_seconds: float, summary: dict,
              measure: Measurer) -> None:
        state = {
            "config": checkpoint.edit_config(self.cfg), "next_batch": next_batch, "done": done,
            "edit_seconds": edit_seconds, "summary": summary, "measure": measure.state_dict(),
            "editor": self.editor.state_dict(),
            "weights": {layer: self.handle.weight(layer).detach().cpu().clone()
                        for layer in self.editor.edited_layers},
            "rng": checkpoint.rng_state(),
            "lines": {name: checkpoint.count_lines(self.folder.path / name)
                      for name in RunFolder.LINE_FILES},
        }
        checkpoint.save(self.folder.path, state)

    def _restore(self, state: dict, measure: Measurer) -> tuple[int, int, float]:
        for layer, weight in state["weights"].items():
            self.handle.set_weight(layer, weight)
        self.editor.load_state_dict(state["editor"])
        measure.load_state_dict(state["measure"])
        for name, keep in state["lines"].items():
            checkpoint.truncate_lines(self.folder.path / name, keep)
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed after batch %d (%d edits made)", state["next_batch"], state["done"])
        return state["next_batch"], state["done"], state["edit_seconds"]

    def _plots(self, tracker) -> None:
        """The run's own curves, in the run folder and on the tracker."""
        from rlsedit_cli.report.plots import all_plots
        from rlsedit_cli.report.runs import read_run

        done = read_run(self.folder.path)
        for path in all_plots([done], self.folder.path / "plots"):
            tracker.log_image(f"plots/{path.stem}", path)
        if done.retention:
            columns = list(done.retention[0])
            tracker.log_table("retention", columns,
                              [[row[c] for c in columns] for row in done.retention])
