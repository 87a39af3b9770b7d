"""Checkpoints and resume: a run killed mid-stream ends as if it had never stopped."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from rlsedit_cli.errors import ConfigError, DataError, RlseditError
from rlsedit_cli.runner import checkpoint
from rlsedit_cli.runner.run import run

RUN = ["editor=rlsedit", "logger=none", "eval=none", "stream.num_edits=30",
       "stream.batch_size=5", "measure.fluency=false", "measure.retention_edits=5",
       "measure.retention_every=2", "checkpoint.every=1"]
METRICS = ("efficacy", "generalization", "specificity", "efficacy_magnitude")


def cli(*args) -> subprocess.Popen:
    """``rlsedit run ARGS`` in a child process; its output goes to a file (a pipe that nobody
    reads would block it)."""
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "rlsedit_cli", "run", *args], stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.log_path = log.name
    return proc


def finish(proc) -> str:
    proc.wait(timeout=600)
    with open(proc.log_path) as f:
        err = f.read()
    assert proc.returncode == 0, err[-3000:]
    return err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    finish(cli(*RUN, f"hydra.run.dir={root}/run", f"paths.cache={root}/cache"))
    return root / "run"


def test_killed_run_resumes_without_losing_or_repeating_an_edit(uninterrupted, tmp_path):
    folder = tmp_path / "run"
    proc = cli(*RUN, f"hydra.run.dir={folder}", f"paths.cache={tmp_path}/cache")
    metrics = folder / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (folder / "summary.json").exists()
    finish(cli(f"resume={folder}", f"paths.cache={tmp_path}/cache", "logger=none"))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["batch"] for r in rows] == list(range(6))  # each batch once, in order
    ref_rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text()
                .splitlines()]
    for a, b in zip(rows, ref_rows):
        assert a["batch_efficacy"] == b["batch_efficacy"]
        assert a["layer1/param_dev"] == pytest.approx(b["layer1/param_dev"], rel=1e-5)
    done = json.loads((folder / "summary.json").read_text())
    ref = json.loads((uninterrupted / "summary.json").read_text())
    for key in METRICS:
        assert done[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-6)
    assert done["num_edits"] == 30
    assert (folder / "retention.csv").read_text() == (uninterrupted / "retention.csv").read_text()
    w_done = checkpoint.load(folder)["weights"]
    w_ref = checkpoint.load(uninterrupted)["weights"]
    for layer in w_ref:
        assert torch.allclose(w_done[layer], w_ref[layer], rtol=1e-5, atol=1e-6)


def test_resume_with_other_settings_is_refused(uninterrupted, tmp_path):
    proc = cli(f"resume={uninterrupted}", "editor.lam=7", f"paths.cache={tmp_path}/cache")
    proc.wait(timeout=300)
    with open(proc.log_path) as f:
        err = f.read()
    assert proc.returncode == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "editor.lam" in lines[0] and "resumed run keeps" in lines[0]


def test_resume_checks_the_whole_config_when_called_directly(uninterrupted, make_cfg):
    cfg = make_cfg(*RUN, "editor.mu=3", f"resume={uninterrupted}")
    with pytest.raises(ConfigError, match=r"editor.mu: checkpoint 1.0, this run 3.0"):
        run(cfg)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(DataError, match="no checkpoint in"):
        checkpoint.load(tmp_path)
    (tmp_path / checkpoint.NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot be read"):
        checkpoint.load(tmp_path)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"next_batch": 1})

    def full(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(RlseditError, match="disk full.*previous checkpoint is intact"):
        checkpoint.save(tmp_path, {"next_batch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.NAME]
    assert checkpoint.load(tmp_path)["next_batch"] == 1


def test_resume_rewinds_the_line_files_and_the_measurements(tmp_path, monkeypatch):
    """Stopped after batch 3's rows were written but with the last checkpoint after batch 1,
    the resumed run drops those rows (metrics, retention, general ability) and restores what was
    measured before the checkpoint: every file and the summary's general-ability history end as
    in a run that never stopped."""
    from rlsedit_cli.runner.folder import RunFolder

    from .conftest import compose_cfg

    args = [*RUN, "eval=smoke", "eval.every_edits=10", "eval.limit=4", "checkpoint.every=2"]
    whole = compose_cfg(args, tmp_path / "whole")
    ref = run(whole)
    real_append = RunFolder.append_jsonl

    def stop_after_batch_3(self, name, row):
        real_append(self, name, row)
        if row.get("batch") == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "append_jsonl", stop_after_batch_3)
    cut = compose_cfg(args, tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        run(cut)
    folder = tmp_path / "cut"
    assert checkpoint.load(folder)["next_batch"] == 2
    monkeypatch.setattr(RunFolder, "append_jsonl", real_append)
    done = run(compose_cfg([*args, f"resume={folder}"], tmp_path / "cut"))
    for name in ("retention.csv", "general.csv"):
        assert (folder / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in rows] == list(range(6))
    assert [c["edits"] for c in done["general"]["points"]] == [0, 10, 20, 30]
    assert done["general"]["points"] == ref["general"]["points"]
