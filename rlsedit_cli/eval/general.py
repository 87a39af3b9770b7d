"""General ability through lm-evaluation-harness, on the in-memory edited model.

Tasks are evaluated one by one, so that a task whose dataset cannot be had (offline, not cached)
fails alone with one line naming it and the fix; ``eval.strict`` decides whether that stops the
run. The project's own ``rlsedit_smoke`` task ships with the package and runs fully offline; the
harness is started without indexing its built-in tasks when only local tasks are asked for.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rlsedit_cli.datasets.toy import HELD_OUT
from rlsedit_cli.errors import DataError, RlseditError, first_line
from rlsedit_cli.eval.paper_glue import TASKS as PAPER_TASKS
from rlsedit_cli.eval.paper_glue import lm_eval_task as paper_task
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.progress import progress

log = logging.getLogger(__name__)
SMOKE_DATA = Path(__file__).resolve().parent / "tasks" / "rlsedit_smoke.jsonl"
HELDOUT_TEXT = Path(__file__).resolve().parents[1] / "assets" / "english" / "heldout.jsonl.gz"
CODE_TASKS = ("humaneval", "mbpp")


def smoke_task() -> dict:
    """The shipped multiple-choice task: true facts of the toy world that the stream does not
    edit (held-out subjects), four choices each."""
    return {
        "task": "rlsedit_smoke",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(SMOKE_DATA)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def wikitext_task() -> dict:
    """Perplexity on the held-out half of wikitext-2's test split (text the anchor statistics
    never saw; assets/english), as lm-eval's ``wikitext`` task measures it: rolling
    log-likelihood over whole detokenised articles, word and byte perplexity, bits per byte."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import (
        process_results,
        wikitext_detokenizer,
    )

    return {
        "task": "rlsedit_wikitext",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(HELDOUT_TEXT)}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": wikitext_detokenizer,
        "process_results": process_results,
        "metric_list": [{"metric": m, "higher_is_better": False}
                        for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
    }


LOCAL_TASKS = {"rlsedit_smoke": smoke_task, "rlsedit_wikitext": wikitext_task}


@dataclass
class GeneralResult:
    """Scores per task (the task's main metric) and one-line failures per task."""

    scores: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


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


def evaluate_general(handle: ModelHandle, tasks: list[str], limit: int | None,
                     num_fewshot: int | None, batch_size: int, allow_code_execution: bool,
                     seed: int = 0, data_dir: str | None = None,
                     fewshot: dict[str, int] | None = None,
                     paper_glue_dir: str | None = None) -> GeneralResult:
    """Run each lm-eval task on the model as it is now (no checkpoint written).

    ``fewshot``: per-task numbers of examples in the prompt, over ``num_fewshot`` (None: each
    task's own); the paper's GLUE tasks (eval/paper_glue.py) are always zero-shot.
    """
    with tempfile.TemporaryDirectory(prefix="rlsedit_tasks_") as scratch:
        return _evaluate(handle, tasks, limit, num_fewshot, batch_size, allow_code_execution,
                         seed, data_dir, fewshot or {}, paper_glue_dir, Path(scratch))


def _evaluate(handle, tasks, limit, num_fewshot, batch_size, allow_code_execution, seed,
              data_dir, fewshot, paper_glue_dir, scratch: Path) -> GeneralResult:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    result = GeneralResult()
    local = set(LOCAL_TASKS) | set(PAPER_TASKS)
    builtin = [t for t in tasks if t not in local]
    manager = TaskManager(include_defaults=bool(builtin), verbosity="ERROR")
    lm = HFLM(pretrained=handle.model, tokenizer=handle.tok, batch_size=batch_size,
              device=str(handle.device))
    known = set(manager.all_tasks) if builtin else set()
    for task in progress(tasks, desc="general ability (lm-eval)", unit="task", leave=False):
        if task not in local and task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=3)
            result.errors[task] = (f"lm-eval has no task '{task}': check eval.tasks"
                                   + (f" (close: {', '.join(close)})" if close else ""))
            log.warning("%s", result.errors[task])
            continue
        if task in CODE_TASKS and not allow_code_execution:
            result.errors[task] = (f"lm-eval task '{task}' executes generated code: set "
                                   "eval.allow_code_execution=true to run it")
            log.warning("%s", result.errors[task])
            continue
        shots = 0 if task in PAPER_TASKS else fewshot.get(task, num_fewshot)
        try:
            spec = (LOCAL_TASKS[task]() if task in LOCAL_TASKS
                    else paper_task(task, paper_glue_dir, scratch) if task in PAPER_TASKS
                    else task)
            with _code_eval(task in CODE_TASKS), _datasets_cache(data_dir), _quiet(task):
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[spec], task_manager=manager, limit=limit,
                    num_fewshot=shots, log_samples=False, bootstrap_iters=0,
                    confirm_run_unsafe_code=allow_code_execution, random_seed=seed,
                    numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        except DataError as e:  # the paper's GLUE files: missing or unreadable
            result.errors[task] = f"lm-eval task '{task}' could not run: {first_line(e)}"
            log.warning("%s", result.errors[task])
            continue
        except Exception as e:  # any harness/dataset failure is this task's failure only
            result.errors[task] = _unavailable(task, e)
            log.warning("%s", result.errors[task])
            continue
        for name, values in (out or {}).get("results", {}).items():
            main = _main_metric(values, f"{PAPER_TASKS[name].metric},none"
                                if name in PAPER_TASKS else None)
            if main is not None:
                result.scores[name] = main[1]
                result.metrics[name] = {k: v for k, v in values.items()
                                        if isinstance(v, (int, float))}
    handle.model.eval()
    return result


def check_strict(result: GeneralResult, strict: bool) -> None:
    if strict and result.errors:
        raise RlseditError(next(iter(result.errors.values())) + " (eval.strict=true stops the run)")


def write_smoke_data(records, path: Path = SMOKE_DATA, count: int = HELD_OUT) -> None:
    """Build the smoke task's data from the toy world's held-out records (its last ``count``,
    which the toy dataset leaves out of every stream)."""
    rows = []
    for r in records[-count:]:
        pool = sorted({x.target_true for x in records if x.relation_id == r.relation_id}
                      - {r.target_true})
        rng = random.Random(str(r.case_id))
        choices = sorted([r.target_true, *rng.sample(pool, 3)])
        rows.append({"question": r.rewrite_prompt, "choices": choices,
                     "answer": choices.index(r.target_true)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
