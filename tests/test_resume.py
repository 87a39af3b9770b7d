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
from pathlib import Path

import pytest
import torch

from rlsedit_cli.errors import ConfigError, DataError, RlseditError, Terminated
from rlsedit_cli.runner import checkpoint
from rlsedit_cli.runner.run import run

RUN = ["editor=rlsedit", "logger=none", "eval=none", "stream.num_edits=30",
       "stream.batch_size=5", "measure.fluency=false", "measure.retention_edits=5",
       "measure.retention_every=2", "checkpoint.every=1"]
METRICS = ("efficacy", "generalization", "specificity", "efficacy_magnitude")


def cli(*args) -> subprocess.Popen:
    """``rlsedit run ARGS`` in a child process; its output goes to a file (a pipe that nobody
    reads would block it). Ctrl-C works in it even when the tests run in the background (a
    shell starts background jobs with SIGINT ignored, and children inherit that)."""
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "rlsedit_cli", "run", *args], stdout=log,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.log_path = log.name
    return proc


def wait_for_lines(proc, path: Path, lines: int, timeout: float = 300) -> None:
    """Wait until the running ``proc`` has written ``lines`` lines to ``path`` (or ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.05)


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
    wait_for_lines(proc, metrics, 3)
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
        for term in ("fit", "drift", "preservation"):  # the terms over all edits so far
            assert a[f"layer1/{term}"] == pytest.approx(b[f"layer1/{term}"], rel=1e-5)
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


def unfinished(uninterrupted, tmp_path) -> Path:
    """A copy of the uninterrupted run as if killed after its last checkpoint (no summary)."""
    import shutil

    folder = Path(shutil.copytree(uninterrupted, tmp_path / "unfinished"))
    (folder / "summary.json").unlink()
    return folder


def test_resume_with_other_settings_is_refused(uninterrupted, tmp_path):
    folder = unfinished(uninterrupted, tmp_path)
    proc = cli(f"resume={folder}", "editor.lam=7", f"paths.cache={tmp_path}/cache")
    proc.wait(timeout=300)
    with open(proc.log_path) as f:
        err = f.read()
    assert proc.returncode == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "editor.lam" in lines[0] and "resumed run keeps" in lines[0]


def test_resume_checks_the_whole_config_when_called_directly(uninterrupted, make_cfg,
                                                             tmp_path):
    cfg = make_cfg(*RUN, "editor.mu=3", f"resume={unfinished(uninterrupted, tmp_path)}")
    with pytest.raises(ConfigError, match=r"editor.mu: checkpoint 1.0, this run 3.0"):
        run(cfg)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(DataError, match="no checkpoint in"):
        checkpoint.load(tmp_path)
    (tmp_path / checkpoint.NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot be read"):
        checkpoint.load(tmp_path)


def test_resume_rewinds_the_line_files_and_the_measurements(tmp_path, monkeypatch):
    """Stopped after batch 3's rows were written but with the last checkpoint after batch 1,
    the resumed run drops those rows (metrics, retention, general ability) and restores what was
    measured before the checkpoint: every file and the summary's general-ability history end as
    in a run that never stopped."""
    from .conftest import compose_cfg, interrupt_after_row

    args = [*RUN, "eval=smoke", "eval.every_edits=10", "eval.limit=4", "checkpoint.every=2"]
    whole = compose_cfg(args, tmp_path / "whole")
    ref = run(whole)
    interrupt_after_row(monkeypatch, 3)
    cut = compose_cfg(args, tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        run(cut)
    folder = tmp_path / "cut"
    assert checkpoint.load(folder)["next_batch"] == 2
    monkeypatch.undo()
    done = run(compose_cfg([*args, f"resume={folder}"], tmp_path / "cut"))
    for name in ("retention.csv", "general.csv"):
        assert (folder / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in rows] == list(range(6))
    assert [c["edits"] for c in done["general"]["points"]] == [0, 10, 20, 30]
    assert done["general"]["points"] == ref["general"]["points"]


QUICK = ["editor=none", "logger=none", "eval=none", "stream.num_edits=2", "stream.batch_size=2",
         "measure.fluency=false", "measure.retention_every=0"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlsedit_cli", "run", *args],
                          capture_output=True, text=True)


def test_a_folder_holding_a_run_is_refused_and_overwrite_replaces_it(tmp_path):
    """Reusing hydra.run.dir of an earlier run never mixes two runs: it is refused before
    anything is written (Hydra's .hydra/ included); overwrite=true removes the old run's own
    files first (a file the run did not write stays)."""
    folder = tmp_path / "run"
    cache = f"paths.cache={tmp_path / 'cache'}"
    assert _run(*QUICK, cache, f"hydra.run.dir={folder}").returncode == 0
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    (folder / "wandb").mkdir()
    (folder / "wandb" / "old-run.log").write_text("the earlier run's tracker files\n")
    refused = _run(*QUICK, "editor=memit", cache, f"hydra.run.dir={folder}")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "holds an earlier run" in refused.stderr and "overwrite=true" in refused.stderr
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*")
             if p.is_file() and "wandb" not in p.parts}
    assert after == before  # not one byte changed
    assert _run(*QUICK, "editor=rlsedit", cache, f"hydra.run.dir={folder}",
                "overwrite=true").returncode == 0
    assert (folder / "wandb" / "old-run.log").exists()  # not the run's: it stays
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["editor"] == "rlsedit"
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1  # this run's only


def test_resume_checks_its_folder_before_writing_into_it(tmp_path):
    """A missing folder is not created; a finished run without a checkpoint keeps its .hydra/;
    a run killed before its first checkpoint is named as such."""
    missing = tmp_path / "no-such-run"
    proc = _run(f"resume={missing}")
    assert proc.returncode == 2 and "no such run folder" in proc.stderr and not missing.exists()
    finished = tmp_path / "finished"
    assert _run(*QUICK, f"paths.cache={tmp_path / 'cache'}",
                f"hydra.run.dir={finished}").returncode == 0
    hydra_files = {p: p.read_bytes() for p in (finished / ".hydra").iterdir()}
    proc = _run(f"resume={finished}")
    assert proc.returncode == 2 and "that run finished" in proc.stderr
    assert {p: p.read_bytes() for p in (finished / ".hydra").iterdir()} == hydra_files
    early = tmp_path / "killed-early"
    early.mkdir()
    (early / "config.yaml").write_text("checkpoint:\n  every: 5\n")
    (early / "metrics.jsonl").write_text('{"batch": 0}\n')
    proc = _run(f"resume={early}")
    assert proc.returncode == 2 and "no batch had been checkpointed yet" in proc.stderr


@pytest.mark.parametrize(("sig", "code", "said"), [
    (signal.SIGINT, 130, "interrupted"),
    # SIGTERM (kill, Slurm, a container's stop) ended a run with exit 143 and no word
    (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(sig, code, said, tmp_path):
    """SIGINT (Ctrl-C) or SIGTERM mid-run: one error line with the resume command, no
    traceback, the last checkpoint kept and no summary."""
    folder = tmp_path / "run"  # 300 edits: the interrupt lands mid-stream even on a busy machine
    proc = cli(*RUN, "stream.num_edits=300", f"hydra.run.dir={folder}",
               f"paths.cache={tmp_path}/cache")
    metrics = folder / "metrics.jsonl"
    wait_for_lines(proc, metrics, 2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, sig)
    proc.wait(timeout=120)
    out = Path(proc.log_path).read_text()
    assert proc.returncode == code, out[-2000:]
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    assert said in last and f"continue with `rlsedit run resume={folder}`" in last
    assert (folder / "checkpoint.pt").is_file() and not (folder / "summary.json").exists()


def _tmpfs(mnt: Path, options: str):
    """A real file system mounted at ``mnt`` for the test; skipped where mounting is not
    allowed (root ignores file permissions, so a read-only or full disk must be real)."""
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs",
                                            str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs to make a small or read-only file system")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system to fill."""
    yield from _tmpfs(tmp_path / "small", "size=1m")


def test_a_real_full_disk_is_one_line_and_leaves_no_temporary_files(small_disk, tmp_path):
    """ENOSPC for real: torch.save raises RuntimeError, appends and logs fail as OSError. The
    run ends with one error line (no logging tracebacks) and leaves no hidden temporary file
    that would keep the disk full; resuming on the still-full disk says the same."""
    folder = small_disk / "run"
    proc = subprocess.run([sys.executable, "-m", "rlsedit_cli", "run", *RUN,
                           f"hydra.run.dir={folder}", f"paths.cache={tmp_path}/cache"],
                          capture_output=True, text=True, timeout=600)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr
    assert "][rlsedit][ERROR] error: cannot write" in err[-1] and "free space" in err[-1]
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_real_full_disk_keeps_the_previous_checkpoint(small_disk):
    checkpoint.save(small_disk, {"next_batch": 1, "w": torch.zeros(10_000)})
    with open(small_disk / "filler", "wb") as f:  # fill the disk for real
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with pytest.raises(RlseditError, match="disk full.*previous checkpoint is intact"):
        checkpoint.save(small_disk, {"next_batch": 2, "w": torch.zeros(100_000)})
    assert sorted(p.name for p in small_disk.iterdir()) == [checkpoint.NAME, "filler"]
    assert checkpoint.load(small_disk)["next_batch"] == 1


@pytest.fixture
def read_only_disk(tmp_path):
    yield from _tmpfs(tmp_path / "ro", "size=1m,ro")


def test_a_read_only_output_folder_is_one_line(read_only_disk, tmp_path):
    proc = _run(*QUICK, f"hydra.run.dir={read_only_disk}/run", f"paths.cache={tmp_path}/cache")
    out = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(out) == 1, out
    assert "error: cannot write" in out[0] and "Read-only file system" in out[0]
    assert _run(*QUICK, f"hydra.run.dir={tmp_path}/done",
                f"paths.cache={tmp_path}/cache").returncode == 0
    report = subprocess.run([sys.executable, "-m", "rlsedit_cli", "report", str(tmp_path / "done"),
                             "--out", str(read_only_disk / "report")], capture_output=True,
                            text=True)
    err = report.stderr.strip().splitlines()
    assert report.returncode == 2 and "Traceback" not in report.stderr
    assert "error: cannot write" in err[-1] and "report --out DIR" in err[-1]


def test_a_resumed_run_keeps_its_own_tracker(uninterrupted, tmp_path, monkeypatch):
    """Made with logger=none, resumed without saying so: still no W&B."""
    import shutil

    from rlsedit_cli.loggers import wandb as wandb_logger

    from .conftest import compose_cfg

    folder = shutil.copytree(uninterrupted, tmp_path / "run")
    (folder / "summary.json").unlink()  # killed after its last checkpoint

    def no_wandb(*args, **kwargs):
        raise AssertionError("the resumed run started W&B")

    monkeypatch.setattr(wandb_logger.WandbLogger, "__init__", no_wandb)
    cfg = compose_cfg([f"resume={folder}", f"paths.cache={tmp_path}/cache", "logger=wandb"],
                      folder)
    assert cfg.logger.name == "wandb"  # the default outside tests: not given on the command line
    summary = run(cfg, overrides=[f"resume={folder}", f"paths.cache={tmp_path}/cache"])
    assert summary["num_edits"] == 30


def test_a_checkpoint_from_before_a_new_setting_resumes_measured_as_it_began(make_cfg,
                                                                           tmp_path):
    """A run checkpointed before measure.generated_accuracy existed (the long runs of
    docs/results.md) resumes without it: its retention.csv keeps its columns."""
    cfg = make_cfg(*RUN[:2], "eval=none", "stream.num_edits=10", "stream.batch_size=5",
                   "measure.fluency=false", "measure.retention_edits=5",
                   "measure.retention_every=1", "checkpoint.every=1",
                   "measure.generated_accuracy=false")  # as the runs made before the setting
    run(cfg)
    folder = tmp_path / "run"
    state = torch.load(folder / checkpoint.NAME, weights_only=False)
    del state["config"]["measure"]["generated_accuracy"]
    state["next_batch"], state["done"] = 1, 5  # as if killed after the first batch
    state["lines"] = {k: 2 if k != "metrics.jsonl" else 1 for k in state["lines"]}
    torch.save(state, folder / checkpoint.NAME)
    (folder / "summary.json").unlink()
    summary = run(make_cfg(f"resume={folder}"), overrides=[f"resume={folder}"])  # as the CLI
    assert "efficacy_generated" not in summary  # (the default, true, would add it)
    lines = (folder / "retention.csv").read_text().splitlines()
    assert len({line.count(",") for line in lines}) == 1 and len(lines) == 3


def test_a_line_file_gains_the_columns_a_later_version_writes(tmp_path):
    """A run resumed by a version that writes a column more (general.csv's metric): the header
    gains it, the earlier lines stay (empty there) and every line parses under the header."""
    import csv

    from rlsedit_cli.runner.folder import RunFolder

    folder = RunFolder(tmp_path / "run")
    (folder.path / "general.csv").write_text("edits,task,score\r\n0,sst2,0.62\r\n")
    folder.append_csv("general.csv", {"edits": 500, "task": "sst2", "metric": "acc",
                                      "score": 0.6})
    folder.append_csv("general.csv", {"edits": 1000, "task": "sst2", "score": 0.5})
    with open(folder.path / "general.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["edits", "task", "score", "metric"]
    assert lines[1:] == [["0", "sst2", "0.62", ""], ["500", "sst2", "0.6", "acc"],
                         ["1000", "sst2", "0.5", ""]]


@pytest.mark.parametrize(("stop", "code", "said"), [
    (KeyboardInterrupt, 130, "interrupted"), (Terminated, 143, "terminated (SIGTERM)")])
def test_a_sweep_stopped_between_its_jobs_says_so_in_one_line(stop, code, said, monkeypatch,
                                                             caplog):
    """Ctrl-C or SIGTERM while a sweep's launcher is between jobs (outside any run): the exit
    status of the signal and one line saying what each job's folder keeps."""
    from rlsedit_cli import app
    from rlsedit_cli.cli import run_command

    def stopped():
        raise stop()

    monkeypatch.setattr(app, "main", stopped)
    assert run_command(["-m", "editor=rlsedit,memit"]) == code
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and lines[0].startswith(f"error: {said}; each job's folder keeps")
