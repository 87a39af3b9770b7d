"""The runner end to end on the shipped tiny model: the run folder and its real figures."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest

from rlsedit_cli.runner.run import run


def test_unedited_run_writes_real_figures(make_cfg, tmp_path):
    cfg = make_cfg("editor=none", "stream.num_edits=20", "stream.batch_size=5",
                   "measure.retention_edits=5", "measure.retention_every=2",
                   "measure.generation_prompts=1", "measure.max_length=20")
    summary = run(cfg)
    folder = tmp_path / "run"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["edits"] for r in rows] == [5, 10, 15, 20]
    on_disk = json.loads((folder / "summary.json").read_text())
    assert on_disk["num_edits"] == 20 and on_disk["efficacy"] == summary["efficacy"]
    # the unedited tiny model knows the true facts: target_new almost never wins
    assert summary["efficacy"] <= 10 and summary["specificity"] >= 90
    assert summary["pre"]["efficacy"] == summary["efficacy"]
    assert summary["fluency"] > 0 and summary["consistency"] is not None
    assert (folder / "config.yaml").read_text().count("num_edits: 20") == 1
    assert "after 20 edits" in (folder / "run.log").read_text()
    retention = (folder / "retention.csv").read_text().splitlines()
    assert retention[0].startswith("batch,edits,measured,efficacy") and len(retention) == 4


def test_bad_stream_values_are_refused(make_cfg):
    from rlsedit_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="stream.batch_size=0"):
        run(make_cfg("editor=none", "stream.batch_size=0"))
    with pytest.raises(ConfigError, match="stream.num_edits=99999"):
        run(make_cfg("editor=none", "stream.num_edits=99999"))


def test_cli_run_makes_dated_run_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rlsedit_cli", "run", "editor=none", "logger=none",
         "stream.num_edits=4", "stream.batch_size=2", "measure.fluency=false",
         f"paths.output_dir={tmp_path}", f"paths.cache={tmp_path}/cache"],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list(tmp_path.glob("none/gpt2_tiny/*/*"))
    assert len(runs) == 1
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}-\d{6}",
                        f"{runs[0].parent.name}/{runs[0].name}")
    assert {"config.yaml", "metrics.jsonl", "summary.json", "run.log"} <= {
        p.name for p in runs[0].iterdir()}


def test_a_run_that_does_not_work_says_so(make_cfg):
    """Targets that do not converge and edits that do not take: a warning with the figures per
    batch, kept in summary["warnings"]; a healthy run has none."""
    bad = run(make_cfg("editor=memit", "stream.num_edits=4", "stream.batch_size=2",
                       "editor.target.steps=1", "measure.fluency=false", "eval=none",
                       "logger=none"))
    assert any("batch 0: the targets did not converge" in w for w in bad["warnings"])
    assert any("of its edits took" in w for w in bad["warnings"])
    good = run(make_cfg("editor=memit", "stream.num_edits=4", "stream.batch_size=2",
                        "measure.fluency=false", "eval=none", "logger=none", "overwrite=true"))
    assert good["warnings"] == []


def test_the_console_ends_with_the_run_folder_and_headline(tmp_path):
    """Libraries' records below WARNING stay in run.log; each library warning shows once; the
    last console lines say where the run is and how it went."""
    import subprocess
    import sys

    folder = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rlsedit_cli", "run", "editor=memit",
                           "logger=none", "eval=none", "stream.num_edits=4",
                           "stream.batch_size=2", "measure.batch_size=8",
                           f"hydra.run.dir={folder}", f"paths.cache={tmp_path}/cache"],
                          capture_output=True, text=True)
    # off a terminal, one plain line per phase of the run's display: before editing, two
    # batches, the final measurements (no carriage-return fragments of bars)
    assert "run (memit): final measurements: 4/4 step" in proc.stderr and "\r" not in proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("[")]
    assert lines[-2].endswith(f"run folder: {folder}")
    assert "after 4 edits: efficacy" in lines[-1]
    library = [x.split("]", 3)[-1] for x in lines if "][transformers" in x]
    assert len(library) == len(set(library))  # each library message at most once
    assert not [x for x in lines if "][transformers" in x and "][INFO]" in x]


def test_retention_measures_one_fixed_set_from_right_after_it_is_made(make_cfg, tmp_path):
    """The first 10 edits take two batches of 5: the first row comes after the second batch and
    every row measures the same 10 records."""
    run(make_cfg("editor=none", "stream.num_edits=20", "stream.batch_size=5",
                 "measure.retention_edits=10", "measure.retention_every=1",
                 "measure.fluency=false", "measure.pre_edit=false"))
    rows = list(csv.DictReader((tmp_path / "run" / "retention.csv").open()))
    assert [(r["batch"], r["edits"], r["measured"]) for r in rows] == [
        ("1", "10", "10"), ("2", "15", "10"), ("3", "20", "10")]


def test_the_default_run_gives_at_least_five_retention_points():
    from .conftest import compose_cfg

    m = compose_cfg([]).measure
    n, batch = compose_cfg([]).stream.num_edits, compose_cfg([]).stream.batch_size
    batches = range(n // batch)
    first = -(-m.retention_edits // batch) - 1  # the batch that completes the set
    rows = [i for i in batches if i >= first and (i == first or (i + 1) % m.retention_every == 0
                                                   or i == batches[-1])]
    assert len(rows) >= 5


def test_the_console_leaves_out_what_lm_eval_says_of_the_in_memory_model():
    """lm-eval warns that it was handed a model object (how every checkpoint is evaluated):
    run.log keeps it, the console does not show it; its other warnings still show."""
    import logging

    from rlsedit_cli.console import ConsoleFilter

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)

    shown = ConsoleFilter().filter
    hf = "lm_eval.models.huggingface"
    assert not shown(record(hf, "`pretrained` model kwarg is not of type `str`. Many other ..."))
    assert not shown(record(hf, "Passed an already-initialized model through `pretrained`, ..."))
    assert shown(record(hf, "the tokenizer has no pad token"))
    assert shown(record("lm_eval.evaluator", "Passed an already-initialized model through "
                                             "`pretrained`"))  # only where it is expected


def test_a_stream_repeats_bit_for_bit_on_two_threads(tmp_path):
    """The same stream run twice with two torch threads edits the same weights, bit for bit:
    a request's prompts add its delta through an embedding lookup, whose backward sums them in
    order (indexing's backward accumulates them with atomics on several CPU threads, in an
    order that changes from run to run)."""
    import torch

    from rlsedit_cli.runner import checkpoint

    from .conftest import compose_cfg

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        weights = []
        for name in ("a", "b"):
            run(compose_cfg(["editor=rlsedit", "eval=none", "stream.num_edits=100",
                             "stream.batch_size=100", "measure.pre_edit=false",
                             "measure.fluency=false", "measure.retention_edits=0",
                             "checkpoint.every=1"], tmp_path / name))
            weights.append(checkpoint.load(tmp_path / name)["weights"])
    finally:
        torch.set_num_threads(threads)
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
