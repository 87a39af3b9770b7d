"""The tool removes or replaces only what it can prove it wrote, holds a lock on a run's folder,
and resumes only on what the run began with: each case fed as the real condition (real files,
real concurrent processes, a real changed dataset)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlsedit_cli.cli import _check_folder_first, main
from rlsedit_cli.errors import ConfigError
from rlsedit_cli.runner import plan
from rlsedit_cli.runner.run import run

from .test_resume import cli, finish, wait_for_lines

TINY = ["editor=rlsedit", "eval=none", "stream.num_edits=2", "stream.batch_size=2",
        "stream.shuffle=false", "measure.fluency=false", "measure.pre_edit=false",
        "measure.retention_edits=0"]


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _cfg(make_cfg, folder: Path, *extra):
    from omegaconf import open_dict

    cfg = make_cfg(*TINY, *extra)
    with open_dict(cfg):
        cfg.paths.run_dir = str(folder)
    return cfg


def test_a_folder_of_user_files_named_like_outputs_is_refused_even_with_overwrite(
        make_cfg, tmp_path):
    """overwrite=true removed any folder holding a file named like a run output (config.yaml,
    ...), and a new run wrote into plots/ and run.log of a folder with no run: both refused."""
    for files in ({"config.yaml": "my own config\n", "notes.txt": "keep\n"},
                  {"plots/metrics.png": "my figure", "run.log": "my log\n"}):
        folder = tmp_path / f"mine{len(files)}{sorted(files)[0][0]}"
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        before = _tree(folder)
        for overwrite in ("overwrite=false", "overwrite=true"):
            with pytest.raises(ConfigError, match="no rlsedit run marker lists"):
                run(_cfg(make_cfg, folder, overwrite))
            assert _tree(folder) == before and not (folder / plan.MARKER).exists()


def test_overwrite_replaces_only_the_earlier_runs_own_files(make_cfg, tmp_path):
    folder = tmp_path / "run"
    run(_cfg(make_cfg, folder))
    marker = json.loads((folder / plan.MARKER).read_text())
    assert {"config.yaml", "metrics.jsonl", "summary.json", "run.log"} <= set(marker["files"])
    (folder / "analysis.md").write_text("my reading of the run\n")
    (folder / "figures").mkdir()
    (folder / "figures" / "mine.png").write_bytes(b"my figure")
    with pytest.raises(ConfigError, match="holds an earlier run"):
        run(_cfg(make_cfg, folder))
    run(_cfg(make_cfg, folder, "overwrite=true", "stream.num_edits=4"))
    assert (folder / "analysis.md").read_text() == "my reading of the run\n"
    assert (folder / "figures" / "mine.png").read_bytes() == b"my figure"
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2  # this run's only


def test_overwrite_through_a_symlinked_folder(make_cfg, tmp_path):
    """`overwrite` into a symlink to a run folder said 'cannot write None (None)'."""
    real, link = tmp_path / "real", tmp_path / "link"
    run(_cfg(make_cfg, real))
    link.symlink_to(real)
    summary = run(_cfg(make_cfg, link, "overwrite=true"))
    assert summary["num_edits"] == 2 and link.is_symlink() and (real / "summary.json").exists()


def test_the_current_directory_as_run_folder_is_never_emptied(tmp_path):
    """`hydra.run.dir=. overwrite=true` emptied the current directory, then failed."""
    (tmp_path / "config.yaml").write_text("a user's file\n")
    (tmp_path / "data.csv").write_text("1,2\n")
    before = _tree(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "rlsedit_cli", "run", *TINY, "logger=none",
                           "hydra.run.dir=.", "overwrite=true"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
        line for line in proc.stderr.splitlines() if line.strip()]
    assert "no rlsedit run marker lists (config.yaml)" in proc.stderr
    assert _tree(tmp_path) == before and not (tmp_path / ".hydra").exists()


def test_two_runs_started_into_one_folder(tmp_path):
    """Both were accepted and interleaved their files; now the second is refused in one line
    while the first runs, and the first finishes as if alone."""
    folder, cache = tmp_path / "run", f"paths.cache={tmp_path / 'cache'}"
    first = cli(*TINY, "logger=none", "stream.num_edits=12", cache, f"hydra.run.dir={folder}")
    wait_for_lines(first, folder / "run.log", 1)
    second = subprocess.run([sys.executable, "-m", "rlsedit_cli", "run", *TINY, "logger=none",
                             cache, f"hydra.run.dir={folder}", "overwrite=true"],
                            capture_output=True, text=True)
    running = first.poll() is None
    finish(first)
    assert running, "the first run ended before the second was started: no overlap tested"
    assert second.returncode == 2 and "in use by another rlsedit run" in second.stderr
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["num_edits"] == 12
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 6


def _records(path: Path, new: str = "Italy") -> Path:
    rows = [{"case_id": i, "prompt": f"{s} is located in", "subject": s, "target_new": new,
             "ground_truth": "France", "rephrase_prompt": f"Where is {s}? It is in",
             "locality_prompt": "Lyon is in", "locality_ground_truth": "France"}
            for i, s in enumerate(["Paris", "Nice", "Metz", "Lille"])]
    path.write_text(json.dumps(rows))
    return path


def test_resume_refuses_records_that_changed(make_cfg, tmp_path):
    """resume= mixed two datasets when the dataset file changed; now it names the record."""
    data = _records(tmp_path / "cf.json")
    folder = tmp_path / "run"
    args = ("dataset=counterfact_easyedit", f"dataset.path={data}", "stream.num_edits=4",
            "checkpoint.every=1")
    run(_cfg(make_cfg, folder, *args))
    (folder / "summary.json").unlink()  # as if killed after its last checkpoint
    _records(data, new="Spain")
    before = {k: v for k, v in _tree(folder).items() if k.name != "run.log"}
    with pytest.raises(ConfigError, match=r"record 0 differs: case_id 0 then, 0 now"):
        run(_cfg(make_cfg, folder, *args, f"resume={folder}"))
    assert {k: v for k, v in _tree(folder).items() if k.name != "run.log"} == before


def test_a_run_killed_in_its_first_seconds_is_named_so(tmp_path):
    folder = tmp_path / "early"
    folder.mkdir()
    plan.start(folder, [])
    (folder / "run.log").write_text("[...] loaded the model\n")
    with pytest.raises(ConfigError, match="no batch had been checkpointed yet"):
        plan.plan(folder, resume=True, overwrite=False)


def test_export_keeps_what_it_did_not_write(make_cfg, tmp_path):
    """`export --full` removed whatever OUT/model held; now only an earlier export's files are
    replaced."""
    folder, out = tmp_path / "run", tmp_path / "out"
    run(_cfg(make_cfg, folder))
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_bytes(b"someone's model")
    assert main(["export", str(folder), "--out", str(out), "--full"]) == 2
    assert (out / "model" / "weights.bin").read_bytes() == b"someone's model"
    fresh = tmp_path / "fresh"
    assert main(["export", str(folder), "--out", str(fresh), "--full"]) == 0
    assert main(["export", str(folder), "--out", str(fresh), "--full"]) == 0  # its own: replaced
    (fresh / "edited_maps.safetensors").write_bytes(b"not an export")
    assert main(["export", str(folder), "--out", str(fresh)]) == 2
    assert (fresh / "edited_maps.safetensors").read_bytes() == b"not an export"


def test_a_sweep_folder_holding_a_sweep_is_refused_before_hydra_writes(tmp_path):
    """A sweep run again into its folder rewrote multirun.yaml and .hydra/ and wrote error.txt
    into finished jobs."""
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(ConfigError, match="holds an earlier sweep: continue it with "
                                          "resume_jobs=true"):
        _check_folder_first(["-m", f"hydra.sweep.dir={tmp_path}", "editor.lam=0,1"])
    assert _check_folder_first(["-m", f"hydra.sweep.dir={tmp_path}", "resume_jobs=true"]) is None


def test_a_failed_jobs_error_never_lands_in_a_finished_job(tmp_path):
    from rlsedit_cli.app import write_error

    (tmp_path / "summary.json").write_text("{}\n")
    write_error(tmp_path, "a later failure")
    assert not (tmp_path / "error.txt").exists()
    fresh = tmp_path / "job"
    fresh.mkdir()
    write_error(fresh, "stats.num_samples=0 must be at least 1")
    assert "error.txt" in json.loads((fresh / plan.MARKER).read_text())["files"]
