"""``run(cfg)``: load, stream the edit batches through the editor, measure, write the run folder.

The Hydra entry point (:mod:`rlsedit_cli.app`) is a thin wrapper over :func:`run`; tests call it
directly with a composed config. With ``resume=RUN_DIR`` the run continues from RUN_DIR's last
checkpoint: no edit lost, none applied twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch
import transformers
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from rlsedit_cli import validate
from rlsedit_cli.accel import Accelerations
from rlsedit_cli.accel.lower import lower_states
from rlsedit_cli.console import route_library_logs
from rlsedit_cli.datasets.stream import stream_of
from rlsedit_cli.errors import DataError, RlseditError
from rlsedit_cli.models.loader import load_configured, resolve_device
from rlsedit_cli.models.tokens import encode_prompt, encode_target
from rlsedit_cli.progress import progress, quiet_library_bars, resumed
from rlsedit_cli.runner import checkpoint, plan
from rlsedit_cli.runner.folder import RunFolder
from rlsedit_cli.runner.measure import Measurer, brief
from rlsedit_cli.runner.record import RunRecord
from rlsedit_cli.runner.terms import ObjectiveTerms
from rlsedit_cli.runner.unedited import UneditedFigures
from rlsedit_cli.stats.anchor import AnchorStats, parameters_digest

TEMPLATES = "context_templates.json"  # the editor's context templates, written once
log = logging.getLogger(__name__)


def build(node: DictConfig, **kwargs):
    """Instantiate a ``_target_`` config with runtime objects (model handle, ...).

    The target is called here, not inside Hydra, so that its own errors (a bad record, a bad
    value) reach the user unwrapped, and runtime objects are never converted to configs.
    """
    return instantiate(node, _partial_=True, _convert_="all")(**kwargs)


def speed_settings(cfg: DictConfig) -> dict:
    """The speed preset and the editor's target-step settings it shapes (summary.json)."""
    target = cfg.editor.get("target") or {}
    return {"preset": cfg.speed.name, "target_dtype": target.get("compute_dtype"),
            "stop_when_top1": target.get("stop_when_top1"),
            "stop_below_nll": target.get("stop_below_nll"),
            "keys_dtype": target.get("keys_dtype"), "target_lr": target.get("lr"),
            "accelerations": sorted(Accelerations.parse(cfg.speed.accelerations).names)}


TEMPLATE_ROOM = 24  # tokens a context template may put before a prompt


def too_long(handle, records) -> list[str]:
    """One line per record whose prompts do not fit the model's context (with a context
    template before them and the target after them), naming it."""
    limit = handle.context_length
    if limit is None:
        return []
    found = []
    for r in records:
        target = len(encode_target(handle.tok, r.target_new))
        needs = [(p, target + TEMPLATE_ROOM) for p in (r.rewrite_prompt, *r.paraphrase_prompts,
                                                       *r.neighborhood_prompts)]
        needs += [(p, 1) for p in r.generation_prompts]
        for prompt, extra in needs:
            length = len(encode_prompt(handle.tok, prompt))
            if length + extra > limit:
                found.append(f"record case_id={r.case_id}: a prompt of {length} tokens (+{extra} "
                             "for templates, target or generation) exceeds the model's context "
                             f"of {limit}: shorten or drop the record, or set "
                             "dataset.skip_invalid=true to skip it")
                break
    return found


def fitting_stream(handle, dataset, stream, skip_invalid: bool) -> list[list]:
    """The stream's batches of records that fit the model's context: a record that does not
    is refused, or with ``skip_invalid`` left out of the dataset (the stream drawn again, so
    it still holds ``stream.num_edits`` records where the dataset has them)."""
    while True:
        batches = stream_of(dataset.records, stream)
        found = too_long(handle, [r for b in batches for r in b])
        if not found:
            return batches
        if not skip_invalid:
            raise DataError(found[0])
        bad = {line.split(":")[0] for line in found}
        dataset.records = [r for r in dataset.records if f"record case_id={r.case_id}" not in bad]
        dataset.skipped += found
        log.warning("dataset %s: skipped %d records longer than the model's context (first: "
                    "%s)", dataset.name, len(found), found[0].split(": shorten")[0])
        if not dataset.records:
            raise DataError(f"dataset {dataset.name} has no record that fits the model's "
                            "context")


COVERED = {"generalization": "paraphrase_prompts",
           "specificity": "neighborhood_prompts"}  # metric: the record field it reads


def uncovered(records) -> dict[str, int]:
    """How many edited records have no prompt for each metric (null or empty field): those
    records are left out of that metric; said in the log and in summary.json."""
    counts = {metric: sum(not getattr(r, name) for r in records)
              for metric, name in COVERED.items()}
    counts = {k: v for k, v in counts.items() if v}
    for metric, n in counts.items():
        log.warning("%d of the %d edited records have no %s (null or empty): %s is measured "
                    "without them", n, len(records), COVERED[metric], metric)
    return counts


def objective(summary: dict, name: str) -> float | None:
    """The value a sweep maximises: the harmonic mean of efficacy, generalization and
    specificity (``hmean``), or one summary metric (None where the run has no such figure)."""
    if name == "hmean":
        parts = [summary.get(k) for k in ("efficacy", "generalization", "specificity")]
        parts = [p for p in parts if p is not None]
        if not parts or min(parts) <= 0:
            return 0.0 if parts else None
        return round(len(parts) / sum(1.0 / p for p in parts), 4)
    return summary.get(name)


def memory_mb(device: torch.device) -> float:
    """Memory in use: CUDA memory allocated on a GPU, the process's resident set on the CPU."""
    if device.type == "cuda":
        return round(torch.cuda.memory_allocated(device) / 2**20, 1)
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def processor(device: torch.device) -> str:
    """What ran the passes: the GPU's name, or the CPU's model and the unit its bfloat16
    products use (AMX, AVX512-BF16 or neither), which moves bfloat16 figures by rounding."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    unit = ("AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags
            else "no bfloat16 unit")
    return f"{model} ({unit})"


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Run (or resume) one editing experiment; return the summary (also in summary.json).

    Args:
        overrides: the command line's overrides, when there is one; on resume they are checked
            against the checkpoint's settings (without them the whole config is compared).
    """
    target = Path(cfg.resume or cfg.paths.run_dir).expanduser()
    lock, decided = plan.claim(target, bool(cfg.resume), cfg.overwrite,
                               resume_jobs=cfg.resume_jobs)
    try:
        if decided.kind == "keep":
            return kept(cfg, target)
        again = decided.kind == "resume" and not cfg.resume  # a sweep job's earlier attempt
        if again:
            with open_dict(cfg):
                cfg.resume = str(target)
        return _run_in(cfg, RunFolder(target), overrides, again)
    finally:
        lock.release()


def _run_in(cfg: DictConfig, folder: RunFolder, overrides: list[str] | None,
            again: bool = False) -> dict:
    """The run in its claimed folder: its log file, its checkpoint read when it resumes."""
    folder.begin()
    with folder.log_file():
        state = None
        if again:
            log.info("this job's earlier attempt (preempted, out of time or interrupted) left a "
                     "checkpoint: it continues from there")
        if cfg.resume:
            state = checkpoint.load(folder.path)
            checkpoint.fill_later_keys(state["config"])
            if overrides is None:
                checkpoint.check_matches(state["config"], checkpoint.edit_config(cfg), folder.path)
            else:
                checkpoint.check_overrides(state["config"], overrides, folder.path)
            checkpoint.restore_config(cfg, state["config"], overrides, folder.path)
        with cache_errors(cfg.paths.cache):
            runner = Runner(cfg, folder, overrides)
            if state is not None:
                checkpoint.check_identity(state.get("identity"), runner.identity, folder.path)
                folder.log_resume(overrides or [])
            return runner.run(state)


def kept(cfg: DictConfig, folder: Path) -> dict:
    """A finished job of a sweep run again with resume_jobs=true: its summary, unchanged (after
    checking that it was made with this job's settings)."""
    checkpoint.check_matches(checkpoint.saved_edit_config(folder), checkpoint.edit_config(cfg),
                             folder)
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    log.info("resume_jobs=true: %s finished earlier (%s edits); kept as it is", folder,
             summary.get("num_edits"))
    return summary


@contextlib.contextmanager
def cache_errors(cache: str) -> Iterator[None]:
    """A failed write under ``paths.cache`` (anchor statistics, unedited figures, converted
    models) as one line naming that setting, not the run folder's."""
    try:
        yield
    except OSError as e:
        root = Path(cache).expanduser().resolve()
        written = Path(e.filename or "/").expanduser().resolve()
        if written != root and root not in written.parents:
            raise
        raise RlseditError(f"cannot write the cache {e.filename} ({e.strerror}): make "
                           f"paths.cache={cache} writable, free space there, or set "
                           "paths.cache=DIR to another folder") from e


class Runner:
    """One run: set-up, the stream of batches with checkpoints, the final measurements."""

    def __init__(self, cfg: DictConfig, folder: RunFolder, overrides: list[str] | None) -> None:
        validate.check(cfg)
        quiet_library_bars()
        route_library_logs()
        self.cfg, self.folder, self.overrides = cfg, folder, overrides or []
        transformers.set_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.handle = load_configured(cfg, self.device)
        self.dataset = build(cfg.dataset)
        self.batches = fitting_stream(self.handle, self.dataset, cfg.stream,
                                      bool(cfg.dataset.get("skip_invalid")))
        self.edited = [r for b in self.batches for r in b]
        self.uncovered = uncovered(self.edited)
        anchor = AnchorStats(self.handle, cfg.paths.cache, **cfg.stats)
        self.editor = build(cfg.editor, handle=self.handle, anchor=anchor)
        layers = self.editor.edited_layers if cfg.measure.objective_terms else []
        self.terms = ObjectiveTerms(self.handle, layers,
                                    anchor.moments(layers) if layers else {})
        self.edit_seconds = 0.0
        self.identity = {"records": checkpoint.record_prints(self.edited),
                         "case_ids": [r.case_id for r in self.edited],
                         "model": parameters_digest(self.handle.model.named_parameters())}

    def run(self, state: dict | None) -> dict:
        cfg, folder = self.cfg, self.folder
        if state is None:
            folder.write_config(cfg)
        tracker_files = not (folder.path / "wandb").exists()
        tracker = build(cfg.logger, run_dir=str(folder.path),
                        run_name=folder.path.name + ("-resumed" if state else ""),
                        run_config=OmegaConf.to_container(cfg, resolve=True))
        if tracker_files and (folder.path / "wandb").exists():  # the tracker made it
            folder.claim("wandb/")
        record = RunRecord(folder, tracker)
        settings = OmegaConf.to_container(cfg.measure, resolve=True)  # presets' values, resolved
        unedited = UneditedFigures(cfg.paths.cache if cfg.measure.reuse_unedited else None,
                                   self.handle.model, settings, cfg.seed, self.dataset.protocol,
                                   self.identity["model"])  # taken before any edit
        lower = lower_states(self.handle, self.editor.edited_layers, cfg.eval.kept_states_mb)
        measure = Measurer(self.handle, self.dataset.references, cfg.measure, cfg.eval, cfg.seed,
                           record, self.edited[: cfg.measure.retention_edits],
                           self.dataset.protocol, unedited, lower)
        log.info("run folder %s: editor=%s model=%s dataset=%s, %d edits in %d batches on %s",
                 folder.path, cfg.editor.name, cfg.model.name, self.dataset.name,
                 len(self.edited), len(self.batches), self.device)
        ok = False
        pre = state is None and cfg.measure.pre_edit
        # one display for the whole run: the measurement before, each batch, the final one
        bar = progress(total=int(pre) + len(self.batches) + 1, unit="step",
                       desc=f"run ({cfg.editor.name}): before editing")
        try:
            start, done = 0, 0
            if state is not None:
                start, done = self._restore(state, measure, record)
                resumed(bar, start)
            elif pre:
                measure.before(self.edited)
                bar.update(1)
            bar.set_description(f"run ({cfg.editor.name}): editing")
            for i in range(start, len(self.batches)):
                batch, last = self.batches[i], i == len(self.batches) - 1
                done += len(batch)
                row = {"batch": i, "edits": done, **self._edit(batch)}
                row |= self.terms.after_batch(self.editor.written())
                seconds = measure.seconds
                row |= measure.after_batch(i, last, batch, done)
                row["eval_seconds"] = round(measure.seconds - seconds, 4)
                measure.check_batch(row)
                record.batch(row)
                stop = cfg.stream.stop_on_collapse and measure.collapse is not None
                if cfg.checkpoint.every > 0 and (
                        (i + 1) % cfg.checkpoint.every == 0 or last or stop):
                    self._save(i + 1, done, measure, record)
                bar.update(1)
                if stop and not last:
                    log.warning("stream.stop_on_collapse: the stream ends after batch %d (%d "
                                "edits); the final measurements cover those edits", i, done)
                    break
            bar.set_description(f"run ({cfg.editor.name}): final measurements")
            summary = self._summary(measure.final(self.edited[:done]), measure.seconds, done)
            bar.update(1)
            if cfg.checkpoint.every == 0:  # so that every finished run exports
                self.folder.claim(checkpoint.FINAL_MAPS)
                checkpoint.save_final_maps(self.folder.path, self._weights(), done)
            record.summary(summary)
            record.plots()
            ok = True
            return summary
        finally:
            bar.close()  # before any error line, which must stay the console's last
            record.finish(ok)
            if ok:  # the last lines of the console: where the run is, and its headline
                log.info("run folder: %s", folder.path)
                log.info("after %d edits: %s", summary["num_edits"], brief(summary))

    def _edit(self, batch: list) -> dict:
        """One batch through the editor: its time, memory and the editor's statistics."""
        t0 = time.perf_counter()
        edit_stats = self.editor.edit(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.edit_seconds += seconds
        templates = getattr(self.editor, "templates", None)
        if templates is not None and not (self.folder.path / TEMPLATES).is_file():
            # as the references nest them: another run (or code) takes them as they were
            self.folder.write_json(TEMPLATES, templates.groups())
        return {"edit_seconds": round(seconds, 4), "memory_mb": memory_mb(self.device),
                **edit_stats}

    def _summary(self, measured: dict, eval_seconds: float, done: int) -> dict:
        """summary.json: what ran, the final measurements, the time spent, the objective."""
        cfg = self.cfg
        summary = {"editor": cfg.editor.name, "model": cfg.model.name,
                   "dataset": self.dataset.name, "num_edits": done,
                   "planned_edits": len(self.edited),
                   "batch_size": cfg.stream.batch_size,
                   "skipped_records": len(self.dataset.skipped), "device": str(self.device),
                   "records_without_prompts": self.uncovered,
                   "overrides": self.overrides, **measured,
                   "speed": speed_settings(cfg),
                   "edit_seconds": round(self.edit_seconds, 3),
                   "eval_seconds": round(eval_seconds, 3),
                   "versions": {"torch": torch.__version__,
                                "transformers": transformers.__version__,
                                "python": platform.python_version(),
                                "processor": processor(self.device)}}
        summary["objective"] = objective(summary, cfg.objective)
        return summary

    def _save(self, next_batch: int, done: int, measure: Measurer, record: RunRecord) -> None:
        self.folder.claim(checkpoint.NAME)
        checkpoint.save(self.folder.path, {"identity": self.identity,
            "config": checkpoint.edit_config(self.cfg), "next_batch": next_batch, "done": done,
            "edit_seconds": self.edit_seconds, "measure": measure.state_dict(),
            "editor": self.editor.state_dict(), "terms": self.terms.state_dict(),
            "weights": self._weights(),
            "rng": checkpoint.rng_state(), "lines": record.lines()})

    def _weights(self) -> dict[int | str, torch.Tensor]:
        """The edited maps' weights as the handle keeps them, on the CPU."""
        return {layer: self.handle.weight(layer).detach().cpu().clone()
                for layer in self.editor.edited_layers}

    def _restore(self, state: dict, measure: Measurer, record: RunRecord) -> tuple[int, int]:
        for layer, weight in state["weights"].items():
            self.handle.set_weight(layer, weight)
        self.editor.load_state_dict(state["editor"])
        self.terms.load_state_dict(state.get("terms"))
        measure.load_state_dict(state["measure"])
        if measure.pre is None and "summary" in state:  # a checkpoint of an older version
            measure.pre = state["summary"].get("pre")
        record.rewind(state["lines"])
        self.edit_seconds = state["edit_seconds"]
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed after batch %d (%d edits made; batches count from 0, as in "
                 "metrics.jsonl)", state["next_batch"] - 1, state["done"])
        return state["next_batch"], state["done"]
