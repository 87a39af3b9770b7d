"""Per-document general-ability results and the paired differences read from them."""

from __future__ import annotations

import json
import math

import pytest

from rlsedit_cli.report.paired import mcnemar, paired_difference, read_points
from rlsedit_cli.runner.run import run


def test_mcnemar_of_a_known_table():
    import numpy as np

    a = np.array([1] * 2 + [0] * 10 + [1] * 30 + [0] * 8)  # 2 only A right, 10 only B right
    b = np.array([0] * 2 + [1] * 10 + [1] * 30 + [0] * 8)
    assert mcnemar(a, b) == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)
    assert mcnemar(a, a) == 1.0


def test_paired_accuracy_difference():
    same = {str(i): {"acc": float(i % 2)} for i in range(60)}
    flat = paired_difference(same, same, "acc")
    assert flat["difference"] == 0 and flat["ci95"] == [0, 0] and not flat["established"]
    better = {i: {"acc": 1.0} for i in same}
    up = paired_difference(same, better, "acc")
    assert up["a"] == 50 and up["b"] == 100 and up["difference"] == 50
    assert up["established"] and up["ci95"][0] > 30 and up["mcnemar_p"] < 1e-6
    one_doc_less = {i: v for i, v in better.items() if i != "0"}
    assert paired_difference(same, one_doc_less, "acc")["documents"] == 59  # common documents


def test_paired_perplexity_is_read_from_summed_loglikelihoods():
    a = {str(i): {"word_perplexity": [-2.0 * (i + 1), i + 1]} for i in range(40)}
    b = {i: {"word_perplexity": [2 * v["word_perplexity"][0], v["word_perplexity"][1]]}
         for i, v in a.items()}
    d = paired_difference(a, b, "word_perplexity")
    assert d["a"] == pytest.approx(math.exp(2), abs=1e-4)
    assert d["b"] == pytest.approx(math.exp(4), abs=1e-4)
    assert d["unit"] == "%" and d["difference"] == pytest.approx(100 * (math.exp(2) - 1), rel=1e-4)
    assert d["ci95"][0] == pytest.approx(d["difference"], rel=1e-4)  # the same ratio everywhere


def test_a_run_keeps_each_points_documents_and_reports_their_pairs(make_cfg, tmp_path, capsys):
    from rlsedit_cli.cli import main

    run(make_cfg("editor=rlsedit", "eval=smoke", "eval.every_edits=4", "stream.num_edits=4",
                 "stream.batch_size=4", "measure.fluency=false",
                 "measure.retention_edits=0", "measure.reuse_unedited=false"))
    folder = tmp_path / "run"
    lines = (folder / "documents" / "general_0000000.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert set(first) == {"task", "doc_id", "acc"} and first["task"] == "rlsedit_smoke"
    points = read_points(folder)
    assert sorted(points) == [0, 4] and len(points[4]["rlsedit_smoke"]) == len(lines)
    assert main(["report", str(folder)]) == 0
    report = (folder / "report" / "report.md").read_text()
    assert "## Paired general-ability differences" in report
    assert json.loads((folder / "summary.json").read_text())["versions"]["processor"]
    assert "after 4 edits against unedited | rlsedit_smoke | acc |" in report


def _documents(folder, edits: int, accs: list[float]) -> None:
    docs = folder / "documents"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"general_{edits:07d}.jsonl").write_text("".join(
        json.dumps({"task": "t", "doc_id": i, "acc": a}) + "\n" for i, a in enumerate(accs)))


def test_runs_scored_differently_are_not_established(tmp_path):
    """Run against run: an established difference only when both scored alike (eval settings
    that change figures; for bfloat16 points the processor too), else the row says what
    differed. A run from before eval.attention_dtype existed counts as float32 attention."""
    from rlsedit_cli.report.paired import paired_rows
    from rlsedit_cli.report.runs import Run

    def make(name: str, accs: list[float], config: dict, processor: str) -> Run:
        folder = tmp_path / name
        _documents(folder, 0, [0.0] * 60)
        _documents(folder, 100, accs)
        return Run(path=folder, summary={"editor": name, "model": "m",
                                         "versions": {"processor": processor}},
                   config=config, general=[{"task": "t", "metric": "acc,none"}])

    low = {"eval": {"compute_dtype": "bfloat16", "attention_dtype": "bfloat16"}}
    older = make("a", [0.0] * 60, {"eval": {"compute_dtype": "bfloat16"}}, "X (AMX)")
    alike = make("b", [1.0] * 60, low, "X (AMX)")
    other_cpu = make("c", [1.0] * 60, low, "Y (AVX512-BF16)")
    same_run = make("d", [1.0] * 60, {"eval": {"compute_dtype": "bfloat16",
                                               "attention_dtype": "float32"}}, "X (AMX)")

    def across(runs):
        return [r for r in paired_rows(runs) if "against unedited" not in r["comparison"]]

    (row,) = across([older, alike])
    assert not row["established"] and row["difference"] == 100
    assert row["scored_differently"] == "eval.attention_dtype: float32 / bfloat16"
    (row,) = across([alike, other_cpu])
    assert row["scored_differently"] == "processor: X (AMX) / Y (AVX512-BF16)"
    (row,) = across([older, same_run])
    assert row["established"] and "scored_differently" not in row
