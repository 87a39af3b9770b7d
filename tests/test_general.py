"""General-ability checkpoints through lm-evaluation-harness, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsedit_cli.errors import RlseditError
from rlsedit_cli.eval import general, specs
from rlsedit_cli.runner.run import run


def test_smoke_suite_runs_at_chosen_points_on_the_edited_model(make_cfg, tmp_path):
    summary = run(make_cfg("editor=rlsedit", "eval=smoke", "eval.every_edits=10",
                           "stream.num_edits=20", "stream.batch_size=10", "measure.fluency=false",
                           "eval.limit=40"))
    points = summary["general"]["points"]
    assert [c["edits"] for c in points] == [0, 10, 20]
    assert all(0.0 <= c["scores"]["rlsedit_smoke"] <= 1.0 for c in points)
    assert points[0]["scores"]["rlsedit_smoke"] >= 0.8  # the tiny model knows its facts
    folder = tmp_path / "run"
    assert (folder / "general.csv").read_text().count("rlsedit_smoke") == 3
    assert (folder / "plots" / "general.png").stat().st_size > 0
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all("general" in r for r in rows)
    # each figure is named with its metric (a bare task name says nothing of it)
    assert set(summary["general"]) >= {"rlsedit_smoke/acc", "points", "settings"}
    assert all(set(r["general"]) == {"rlsedit_smoke/acc"} for r in rows)
    assert (folder / "general.csv").read_text().splitlines()[0] == "edits,task,metric,score"


def test_glue_from_the_hub_offline_fails_in_one_line_and_the_run_goes_on(make_cfg):
    summary = run(make_cfg("editor=none", "eval=glue", "eval.source=hub", "stream.num_edits=4",
                           "stream.batch_size=2", "measure.fluency=false", "eval.limit=5",
                           "measure.pre_edit=false"))
    errors = summary["general"]["errors"]
    assert set(errors) == {"sst2", "mrpc", "cola", "rte", "mnli"}
    for task, message in errors.items():
        assert f"lm-eval task '{task}'" in message and "\n" not in message
        assert "set eval.data_dir=DIR" in message
    assert summary["efficacy"] is not None


def test_strict_stops_the_run(make_cfg):
    with pytest.raises(RlseditError, match="eval.strict=true"):
        run(make_cfg("editor=none", "eval=glue", "eval.tasks=[cola]", "eval.strict=true",
                     "stream.num_edits=2", "stream.batch_size=2", "measure.fluency=false",
                     "measure.pre_edit=false"))


def test_code_tasks_need_the_opt_in(shipped_handle):
    res = general.evaluate_general(shipped_handle, ["humaneval"],
                                   general.GeneralSettings(limit=1, batch_size=4))
    assert "eval.allow_code_execution=true" in res.errors["humaneval"] and not res.scores


def test_local_tasks_do_not_index_the_builtin_ones(shipped_handle, monkeypatch):
    import lm_eval.tasks

    seen = {}
    real = lm_eval.tasks.TaskManager

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", spy)
    res = general.evaluate_general(shipped_handle, ["rlsedit_smoke"],
                                   general.GeneralSettings(limit=8))
    assert seen["include_defaults"] is False and "rlsedit_smoke" in res.scores


def test_smoke_data_is_what_the_generator_writes(tmp_path):
    from rlsedit_cli.datasets.records import parse_rome
    from rlsedit_cli.datasets.world import build_world

    records = [parse_rome(r) for r in build_world(3000, 0).records]
    specs.write_smoke_data(records, tmp_path / "smoke.jsonl")
    assert (tmp_path / "smoke.jsonl").read_text() == specs.SMOKE_DATA.read_text()


def test_a_misspelt_task_is_named_not_blamed_on_the_network(shipped_handle):
    res = general.evaluate_general(shipped_handle, ["hellaswagg"],
                                   general.GeneralSettings(limit=2, batch_size=1))
    assert "lm-eval has no task 'hellaswagg': check eval.tasks (close: hellaswag" in \
        res.errors["hellaswagg"] and not res.scores


def test_the_smoke_task_asks_only_about_facts_no_stream_edits():
    """Its 200 questions are the toy world's held-out records: none can be edited, whatever
    the stream's length, seed or offset."""
    from rlsedit_cli.datasets.toy import load as load_toy

    from .conftest import TINY_BUNDLE

    questions = {json.loads(line)["question"] for line in specs.SMOKE_DATA.open()}
    editable = {r.rewrite_prompt for r in load_toy(str(TINY_BUNDLE)).records}
    assert len(questions) == 200 and not questions & editable
    assert len(editable) == 2800


def test_code_tasks_get_what_the_code_eval_metric_needs(shipped_handle, monkeypatch):
    """With eval.allow_code_execution=true, HumanEval runs with HF_ALLOW_CODE_EVAL=1 (without
    it lm-eval's code_eval metric refuses); the setting does not outlive the task."""
    import os

    import lm_eval

    seen = {}

    def fake_evaluate(**kwargs):
        seen["env"] = os.environ.get("HF_ALLOW_CODE_EVAL")
        seen["unsafe"] = kwargs["confirm_run_unsafe_code"]
        return {"results": {"humaneval": {"pass@1,create_test": 0.25}}}

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    res = general.evaluate_general(shipped_handle, ["humaneval"], general.GeneralSettings(
        batch_size=1, allow_code_execution=True))
    assert seen == {"env": "1", "unsafe": True} and res.scores == {"humaneval": 0.25}
    assert "HF_ALLOW_CODE_EVAL" not in os.environ


def test_eval_data_dir_points_the_datasets_library_at_a_local_cache(shipped_handle, tmp_path,
                                                                    monkeypatch, make_cfg):
    """An offline cluster's copy of a datasets cache: lm-eval reads from it while it runs."""
    import datasets
    import lm_eval

    from rlsedit_cli.errors import ConfigError

    seen = {}

    def fake_evaluate(**kwargs):
        seen["cache"] = datasets.config.HF_DATASETS_CACHE
        return {"results": {"sst2": {"acc,none": 0.5}}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    before = datasets.config.HF_DATASETS_CACHE
    res = general.evaluate_general(shipped_handle, ["sst2"], general.GeneralSettings(
        batch_size=1, data_dir=str(tmp_path), source="hub"))
    assert seen["cache"] == tmp_path and res.scores == {"sst2": 0.5}
    assert before == datasets.config.HF_DATASETS_CACHE
    with pytest.raises(ConfigError, match="eval.data_dir=/no/such is not a folder"):
        run(make_cfg("eval=glue", "eval.data_dir=/no/such"))


def _paper_glue_folder(folder, rows: int = 12):
    """Files in the layout of AlphaEdit's glue_eval/dataset (as JSON lines, one as a pickle)."""
    import pickle

    folder.mkdir()
    make = {
        "sst2": lambda i: {"sentence": f"film number {i} is fine", "label": i % 2},
        "mrpc": lambda i: {"sentence1": f"A {i}.", "sentence2": f"B {i}.", "label": i % 2},
        "cola": lambda i: {"sentence": f"The cat {i} sat.", "label": i % 2},
        "rte": lambda i: {"sentence1": f"A {i}.", "sentence2": f"B {i}.", "label": i % 2},
        "nli": lambda i: {"sentence1": f"A {i}.", "sentence2": f"B {i}.",
                          "label": "entailment" if i % 2 else "neutral"},
        "mmlu": lambda i: {"question": f"Q {i}?", "choices": ["w", "x", "y", "z"],
                           "answer": i % 4},
    }
    for name, row in make.items():
        data = [{"idx": i, **row(i)} for i in range(rows)]
        if name == "sst2":
            (folder / "sst2.pkl").write_bytes(pickle.dumps(data))
        else:
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return folder


def test_paper_glue_prompts_and_answers_are_alphaedits():
    """glue_eval's prompts, the words each task looks for and their order, and -1 for none."""
    from rlsedit_cli.eval.paper_glue import TASKS

    assert TASKS["paper_sst2"].prompt({"sentence": "great"}) == "Review :great\nSentiment :"
    assert TASKS["paper_mrpc"].prompt({"sentence1": "a", "sentence2": "b"}) == (
        "Are the sentences paraphrases of each other.\nSentence 1: a\nSentence 2: b\nAnswer:")
    assert TASKS["paper_cola"].prompt({"sentence": "s"}) == (
        "Is this sentence linguistically acceptable?\nSentence: s\nAnswer: ")
    assert TASKS["paper_rte"].prompt({"sentence1": "a", "sentence2": "b"}) == (
        "a\nquestion: b True or False?\nanswer:")
    assert TASKS["paper_nli"].prompt({"sentence1": "a", "sentence2": "b"}) == (
        "a entails the b True or False? Answer:")
    assert TASKS["paper_mmlu"].prompt({"question": "q", "choices": list("wxyz")}) == (
        "Question: q\n(A) w\n(B) x\n(C) y\n(D) z\nAnswer:")
    assert TASKS["paper_mrpc"].answer(" No, yes") == 1  # "yes" is looked for first
    assert TASKS["paper_rte"].answer(" True or false") == 0  # "false" first
    assert TASKS["paper_sst2"].answer(" positive\nReview :x\nSentiment : negative") == 0
    assert TASKS["paper_cola"].answer(" maybe") == -1
    assert TASKS["paper_mmlu"].answer(" B\n\nQuestion") == 1
    assert TASKS["paper_nli"].label({"label": "entailment"}) == 1
    assert TASKS["paper_nli"].label({"label": "contradiction"}) == 0


def test_paper_glue_scores_as_sklearn_does_with_invalid_answers():
    from sklearn.metrics import f1_score, matthews_corrcoef

    from rlsedit_cli.eval.paper_glue import mcc, weighted_f1

    pairs = [(1, 1), (0, 1), (1, -1), (0, 0), (1, 0), (0, -1)]
    labels, preds = zip(*pairs)
    assert weighted_f1(pairs) == pytest.approx(f1_score(labels, preds, average="weighted"))
    assert weighted_f1(pairs) == pytest.approx((2 / 5 + 2 / 5) / 2)  # class 1 F1 .4, class 0 .4
    assert mcc(pairs) == pytest.approx(matthews_corrcoef(labels, preds))


def test_eval_paper_glue_runs_the_tests_after_the_fewshot_pool(shipped_handle, tmp_path,
                                                               make_cfg):
    """Every task of eval=paper_glue runs offline from local files (AlphaEdit's .pkl or JSON
    lines) on the rows after the first 10; CoLA reports Matthews' correlation, the rest F1."""
    from rlsedit_cli.eval.paper_glue import TASKS, lm_eval_task

    folder = _paper_glue_folder(tmp_path / "glue")
    spec = lm_eval_task("paper_mrpc", str(folder), tmp_path / "scratch")
    data = Path(spec["dataset_kwargs"]["data_files"]["test"]).read_text(encoding="utf-8")
    used = [json.loads(x)["idx"] for x in data.splitlines()]
    assert used == [10, 11] and spec["generation_kwargs"]["max_gen_toks"] == 5
    cfg = make_cfg("eval=paper_glue", f"eval.paper_glue_dir={folder}")
    res = general.evaluate_general(shipped_handle, list(cfg.eval.tasks),
                                   general.GeneralSettings.from_cfg(cfg.eval, 0))
    assert not res.errors and set(res.scores) == set(TASKS)
    assert res.scores["paper_cola"] == res.metrics["paper_cola"]["mcc,none"]
    assert res.scores["paper_sst2"] == res.metrics["paper_sst2"]["f1,none"]
    missing = general.evaluate_general(shipped_handle, ["paper_cola"],
                                       general.GeneralSettings(batch_size=4))
    assert "set eval.paper_glue_dir to AlphaEdit's" in missing.errors["paper_cola"]
    (folder / "rte.jsonl").unlink()
    gone = general.evaluate_general(shipped_handle, ["paper_rte"], general.GeneralSettings(
        batch_size=4, paper_glue_dir=str(folder)))
    assert "holds no rte.pkl or rte.jsonl" in gone.errors["paper_rte"]


def test_few_shot_is_set_per_task(shipped_handle, monkeypatch, make_cfg):
    """eval.fewshot gives a task its own number of examples (eval=paper: MMLU 5-shot, as
    eval=mmlu); the others keep num_fewshot."""
    import lm_eval

    seen = {}

    def fake_evaluate(**kwargs):
        seen[kwargs["tasks"][0]] = kwargs["num_fewshot"]
        return {"results": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    assert make_cfg("eval=paper").eval.fewshot == {"mmlu": 5}
    general.evaluate_general(shipped_handle, ["mmlu", "sst2"], general.GeneralSettings(
        batch_size=1, fewshot={"mmlu": 5}, source="hub"))
    assert seen == {"mmlu": 5, "sst2": None}


def test_lm_eval_bars_stay_off_the_console(shipped_handle, capfd, caplog):
    """lm-eval's own request bars go to the log, never to the console."""
    import logging

    with caplog.at_level(logging.DEBUG, logger="rlsedit_cli.eval.general"):
        res = general.evaluate_general(shipped_handle, ["rlsedit_smoke"],
                                       general.GeneralSettings(limit=8))
    err = capfd.readouterr().err
    assert "rlsedit_smoke" in res.scores  # (off a terminal the bar over the tasks is a plain
    # log line, only when the tasks outlast 30 s: progress.PlainLines)
    assert "Running loglikelihood requests" not in err
    assert "Running loglikelihood requests" in caplog.text


def test_a_runs_points_build_each_tasks_requests_once(shipped_handle, monkeypatch):
    """The points of a run share lm-eval's task objects and requests (eval/prepared.py): a later
    point builds none and goes straight to lm-eval's evaluate, and scores the model as it is
    then, as a fresh evaluation does."""
    import lm_eval
    import torch
    from lm_eval.api.task import ConfigurableTask

    built, simple = [], []
    construct, evaluate = ConfigurableTask.construct_requests, lm_eval.simple_evaluate
    monkeypatch.setattr(ConfigurableTask, "construct_requests",
                        lambda self, *a, **k: built.append(1) or construct(self, *a, **k))
    monkeypatch.setattr(lm_eval, "simple_evaluate",
                        lambda **k: simple.append(1) or evaluate(**k))
    tasks = ["rlsedit_smoke", "rlsedit_wikitext", "gsm8k"]
    opts = general.GeneralSettings(batch_size=4, limits={"rlsedit_smoke": 16,
                                   "rlsedit_wikitext": 2, "gsm8k": 2},
                                   gen_kwargs={"max_gen_toks": 6})
    managers = general.TaskManagers()
    first = general.evaluate_general(shipped_handle, tasks, opts, managers)
    assert not first.errors and len(built) == 20 and len(simple) == 3
    head = shipped_handle.model.get_output_embeddings().weight
    kept = head.detach().clone()
    try:
        with torch.no_grad():
            head.add_(0.05 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
        later = general.evaluate_general(shipped_handle, tasks, opts, managers)
        assert len(built) == 20 and len(simple) == 3  # nothing built, nor set up, again
        fresh = general.evaluate_general(shipped_handle, tasks, opts)
    finally:
        with torch.no_grad():
            head.copy_(kept)
    assert later.scores == fresh.scores and later.documents == fresh.documents
    assert later.documents["rlsedit_wikitext"] != first.documents["rlsedit_wikitext"]
