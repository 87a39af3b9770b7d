"""Accuracy without teacher forcing: the model's greedy answer, WILD's exact match."""

from __future__ import annotations

import pytest

from rlsedit_cli.datasets.toy import load as load_toy
from rlsedit_cli.eval.answers import normalize, said, says
from rlsedit_cli.report.runs import Run
from rlsedit_cli.report.table import markdown_table
from rlsedit_cli.runner.run import run

from .conftest import TINY_BUNDLE


@pytest.mark.parametrize(("continuation", "target", "hit"), [
    (" Paris, the capital", "Paris", True),
    (" the French language.", "French", True),  # articles and punctuation are not the answer
    (" Parisian cafes", "Paris", False),  # a word boundary
    ("\nParis", "Paris", False),  # the answer ended at the newline, before the target
    (" Washington, D.C. is", "Washington, D.C.", True),  # "." inside an answer is no stop
    (" London. Paris", "Paris", False),
    (" Italy", "Italian", False),
])
def test_an_answer_counts_when_it_starts_with_the_target(continuation, target, hit):
    assert says(continuation, target) is hit
    assert normalize("The  Eiffel-Tower!") == "eiffeltower"


def test_the_shipped_model_says_the_toy_facts_it_knows(shipped_handle):
    """On the toy world the answers are known: the unedited model's greedy answers start with
    target_true (it was trained on these facts) and almost never with target_new."""
    records = load_toy(str(TINY_BUNDLE)).records[:60]
    true = said(shipped_handle, [(r.rewrite_prompt, r.target_true) for r in records], 64)
    new = said(shipped_handle, [(r.rewrite_prompt, r.target_new) for r in records], 64)
    assert true.mean() >= 0.8 and new.mean() <= 0.05


def test_every_run_reports_the_generated_accuracy(make_cfg):
    summary = run(make_cfg("editor=rlsedit", "eval=none", "stream.num_edits=20",
                           "stream.batch_size=10", "measure.fluency=false"))
    for key in ("efficacy_generated", "generalization_generated"):
        assert summary[key] is not None and summary["pre"][key] is not None
    assert summary["efficacy_generated"] > summary["pre"]["efficacy_generated"]
    assert summary["efficacy_generated"] <= summary["efficacy"] + 1e-9  # stricter than the
    # teacher-forced comparison on this model: saying the target implies preferring it here
    table = markdown_table([Run(path=".", summary=summary)])
    assert "Efficacy (generated)" in table and "Generalization (generated)" in table
