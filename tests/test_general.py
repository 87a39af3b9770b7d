"""General-ability checkpoints through lm-evaluation-harness, offline."""

from __future__ import annotations

import json

import pytest

from rlsedit_cli.errors import RlseditError
from rlsedit_cli.eval import general
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


def test_glue_offline_fails_in_one_line_and_the_run_goes_on(make_cfg):
    summary = run(make_cfg("editor=none", "eval=glue", "stream.num_edits=4",
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
        run(make_cfg("editor=none", "eval=glue", "eval.tasks=[sst2]", "eval.strict=true",
                     "stream.num_edits=2", "stream.batch_size=2", "measure.fluency=false",
                     "measure.pre_edit=false"))


def test_code_tasks_need_the_opt_in(shipped_handle):
    res = general.evaluate_general(shipped_handle, ["humaneval"], 1, None, 4, False)
    assert "eval.allow_code_execution=true" in res.errors["humaneval"] and not res.scores


def test_local_tasks_do_not_index_the_builtin_ones(shipped_handle, monkeypatch):
    import lm_eval.tasks

    seen = {}
    real = lm_eval.tasks.TaskManager

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", spy)
    res = general.evaluate_general(shipped_handle, ["rlsedit_smoke"], 8, None, 8, False)
    assert seen["include_defaults"] is False and "rlsedit_smoke" in res.scores


def test_smoke_data_is_what_the_generator_writes(tmp_path):
    from rlsedit_cli.datasets.records import parse_rome
    from rlsedit_cli.datasets.world import build_world

    records = [parse_rome(r) for r in build_world(3000, 0).records]
    general.write_smoke_data(records, tmp_path / "smoke.jsonl")
    assert (tmp_path / "smoke.jsonl").read_text() == general.SMOKE_DATA.read_text()


def test_a_misspelt_task_is_named_not_blamed_on_the_network(shipped_handle):
    res = general.evaluate_general(shipped_handle, ["hellaswagg"], 2, None, 1, False)
    assert "lm-eval has no task 'hellaswagg': check eval.tasks (close: hellaswag" in \
        res.errors["hellaswagg"] and not res.scores


def test_the_smoke_task_asks_only_about_facts_no_stream_edits():
    """Its 200 questions are the toy world's held-out records: none can be edited, whatever
    the stream's length, seed or offset."""
    from rlsedit_cli.datasets.toy import load as load_toy

    from .conftest import TINY_BUNDLE

    questions = {json.loads(line)["question"] for line in general.SMOKE_DATA.open()}
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
    res = general.evaluate_general(shipped_handle, ["humaneval"], 1, None, 1, True)
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
    res = general.evaluate_general(shipped_handle, ["sst2"], 1, None, 1, False,
                                   data_dir=str(tmp_path))
    assert seen["cache"] == tmp_path and res.scores == {"sst2": 0.5}
    assert before == datasets.config.HF_DATASETS_CACHE
    with pytest.raises(ConfigError, match="eval.data_dir=/no/such is not a folder"):
        run(make_cfg("eval=glue", "eval.data_dir=/no/such"))
