"""Multirun sweeps over lam and mu, launchers, paper experiment presets, the wheel install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlsedit_cli.cli import main
from rlsedit_cli.config import conf_dir

from .conftest import TINY_BUNDLE, compose_cfg

REPO = Path(__file__).resolve().parents[1]
SMALL = ["logger=none", "eval=none", "stream.num_edits=10", "stream.batch_size=5",
         "measure.fluency=false", "measure.retention_edits=5"]


def rlsedit(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlsedit_cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env)


def test_lam_mu_sweep_gives_one_folder_per_job_and_a_heat_map(tmp_path, capsys):
    proc = rlsedit("run", "-m", "editor.lam=0.5,2", "editor.mu=0.5,2", *SMALL,
                   f"paths.output_dir={tmp_path}", f"paths.cache={tmp_path}/cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next(tmp_path.glob("multirun/rlsedit/gpt2_tiny/*/*"))
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "summary.json").is_file())
    assert [j.split(",eval")[0] for j in jobs] == [
        "0_editor.lam=0.5,editor.mu=0.5", "1_editor.lam=0.5,editor.mu=2",
        "2_editor.lam=2,editor.mu=0.5", "3_editor.lam=2,editor.mu=2"]
    assert main(["report", str(sweep), "--metric", "efficacy"]) == 0
    table = capsys.readouterr().out
    assert table.count("| rlsedit |") == 4 and "lam=2, mu=0.5" in table
    assert (sweep / "report" / "heatmap_efficacy.png").stat().st_size > 0


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    """Also: job folders stay single, bounded names when an override holds a long path."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    deep = tmp_path / ("a_long_folder_name_" * 6) / "bundle"
    deep.parent.mkdir()
    deep.symlink_to(TINY_BUNDLE)
    proc = rlsedit("run", "-m", "hydra/launcher=local", "editor.lam=0.5,2", *SMALL,
                   f"dataset.path={deep}", "editor.target.early_stop_loss=0.05",
                   f"paths.output_dir={tmp_path}", f"paths.cache={tmp_path}/cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = list(tmp_path.glob("multirun/**/summary.json"))
    assert len(summaries) == 2
    sweep = next(tmp_path.glob("multirun/rlsedit/gpt2_tiny/*/*"))
    assert sorted(s.parent.parent for s in summaries) == [sweep, sweep]
    names = sorted(s.parent.name for s in summaries)
    assert all(len(n.encode()) <= 128 for n in names)  # a long path: shortened, hashed
    assert names[0] != names[1]


def test_folder_names_are_safe_and_distinct():
    from rlsedit_cli.config import folder_name

    assert folder_name("editor.lam=0,editor.mu=0.5") == "editor.lam=0,editor.mu=0.5"
    assert folder_name("dataset.path=/data/cf.json") == "dataset.path=_data_cf.json"
    a, b = folder_name("x=" + "y" * 300 + "1"), folder_name("x=" + "y" * 300 + "2")
    assert a != b and len(a.encode()) == len(b.encode()) <= 120 and "/" not in a


def test_objective_is_the_harmonic_mean():
    from rlsedit_cli.runner.run import objective

    assert objective({"efficacy": 90, "generalization": 60, "specificity": 90},
                     "hmean") == pytest.approx(3 / (1 / 90 + 1 / 60 + 1 / 90), abs=1e-4)
    assert objective({"efficacy": 90, "generalization": 0, "specificity": 90}, "hmean") == 0.0
    assert objective({"fluency": 600.0}, "fluency") == 600.0


# the large models' setups (SmolLM2's paper-length stream: tests/test_terms.py)
PAPER = sorted(p.stem for p in (conf_dir() / "experiment").glob("paper_*.yaml")
               if not p.stem.endswith("smollm2"))


@pytest.mark.parametrize("editor", ["rlsedit", "alphaedit", "memit", "rome", "ft", "ft_m",
                                    "ultraedit"])
@pytest.mark.parametrize("experiment", PAPER)
def test_every_paper_setup_resolves(experiment, editor):
    cfg = compose_cfg([f"+experiment={experiment}", f"editor={editor}"])
    assert cfg.stream.num_edits == 10000 and cfg.stream.batch_size == 100
    assert cfg.dataset.name == "counterfact" and cfg.eval.name == "paper"
    assert cfg.model.name == experiment.removeprefix("paper_")
    assert cfg.editor.name == editor
    # FT and UltraEdit optimise no target values
    assert ("target" in cfg.editor) == (editor not in ("ft", "ft_m", "ultraedit"))
    if editor == "rlsedit" and cfg.model.name == "llama3_8b":
        assert cfg.editor.lam == 0 and cfg.editor.mu == 1  # the paper's appendix B
    # as the references: multi_counterfact.json in file order; 100,000 Wikipedia articles drawn
    # at random and truncated at the model's context (AlphaEdit: 8192 Llama-3, 4096 Qwen)
    assert cfg.stream.shuffle is False
    assert cfg.stats.sample == "random" and cfg.stats.num_samples == 100000
    assert cfg.stats.max_length == {"gpt2_xl": 1024, "gptj_6b": 2048, "llama3_8b": 8192,
                                    "qwen2_5_7b": 4096}[cfg.model.name]
    if editor in ("memit", "alphaedit", "rlsedit"):  # "{}" + five 10-token samples, one group
        assert cfg.editor.target.context_templates == [[10, 5]]
    if editor == "rlsedit" and cfg.editor.lam == 0:  # P = (mu n C)^-1 needs float64
        assert cfg.editor.precision == "float64"
    if editor == "rome" and cfg.model.name in ("llama3_8b", "qwen2_5_7b"):
        assert cfg.editor.mom2_adjustment is False and cfg.editor.target.weight_decay == 1e-3


def test_paper_setups_on_the_cli():
    assert len(PAPER) == 4
    proc = rlsedit("run", "+experiment=paper_qwen2_5_7b", "--cfg", "job")
    assert proc.returncode == 0
    assert "qwen2_5_7b" in proc.stdout and "num_edits: 10000" in proc.stdout


def test_wheel_install_runs_from_another_directory(tmp_path):
    dist, site, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(dist.glob("rlsedit-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import rlsedit_cli; print(rlsedit_cli.__file__)"],
        capture_output=True, text=True, cwd=elsewhere, env=env).stdout
    assert where.startswith(str(site))
    proc = rlsedit("run", "--cfg", "job", "--resolve", "editor=memit", cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"name_or_path: {site}/rlsedit_cli/assets/gpt2_tiny" in proc.stdout
    assert (site / "rlsedit_cli" / "conf" / "config.yaml").is_file()
    assert (site / "rlsedit_cli" / "assets" / "gpt2_tiny" / "model.safetensors").is_file()


def test_ft_l_uses_the_published_layer_and_constraint_per_model():
    """AlphaEdit's hparams/FT: GPT-2 XL and GPT-J constrained at layer 0, Llama-3-8B
    unconstrained at layer 21."""
    got = {m: compose_cfg(["editor=ft", f"model={m}"]).editor
           for m in ("gpt2_xl", "gptj_6b", "llama3_8b")}
    assert (got["gpt2_xl"].layer, got["gpt2_xl"].norm_constraint) == (0, 5e-4)
    assert (got["gptj_6b"].layer, got["gptj_6b"].lr, got["gptj_6b"].norm_constraint) == (0, 5e-4,
                                                                                         5e-5)
    assert (got["llama3_8b"].layer, got["llama3_8b"].norm_constraint) == (21, None)
    assert all(e.batch_size == 64 and e.steps == 25 for e in got.values())
    assert compose_cfg(["editor=ft_m"]).editor._target_.endswith("ft_m.FTM")


def test_one_bad_point_does_not_stop_the_sweep(tmp_path):
    """editor.lam=-1 fails; the other job runs to the end and the sweep says which failed."""
    proc = rlsedit("run", "-m", "editor.lam=-1,0.5", *SMALL, f"paths.output_dir={tmp_path}",
                   f"paths.cache={tmp_path}/cache")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out
    (line,) = [x for x in out.splitlines() if "job(s) of the sweep failed" in x]
    assert "error: 1 job(s)" in line and "editor.lam=-1.0 must not be negative" in line
    assert len(list(tmp_path.glob("multirun/**/summary.json"))) == 1
    (error,) = tmp_path.glob("multirun/**/error.txt")
    assert error.parent.name.startswith("0_editor.lam=-1")


@pytest.mark.slow  # two multiruns of two jobs: about 35 s alone on cpu-2 (the fast test below
# runs the same mechanism in-process)
def test_a_sweep_run_again_with_resume_jobs_keeps_finished_jobs_and_continues_the_rest(
        tmp_path):
    """An interrupted lam sweep (its second job killed after its last checkpoint), run again
    with the same hydra.sweep.dir and resume_jobs=true: the finished job is kept to the byte,
    the other goes on from its checkpoint; every batch is recorded once."""
    sweep = tmp_path / "sweep"
    args = ["run", "-m", "editor.lam=0.5,2", *SMALL, "checkpoint.every=1",
            f"hydra.sweep.dir={sweep}", f"paths.cache={tmp_path}/cache"]
    assert rlsedit(*args).returncode == 0
    first, second = sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file())
    (second / "summary.json").unlink()  # killed after its last checkpoint
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.rglob("*") if p.is_file()}
    again = rlsedit(*args, "resume_jobs=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.rglob("*")
            if p.is_file()} == kept
    assert "kept as it is" in again.stderr and "continues from there" in again.stderr
    lines = (second / "metrics.jsonl").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ['{"batch": 0', '{"batch": 1']
    assert (second / "summary.json").is_file()


def test_resume_jobs_keeps_a_finished_run_and_continues_an_unfinished_one(make_cfg, tmp_path):
    from rlsedit_cli.errors import ConfigError
    from rlsedit_cli.runner.run import run

    first = run(make_cfg(*SMALL, "checkpoint.every=1"))
    folder = tmp_path / "run"
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}
    cfg = make_cfg(*SMALL, "checkpoint.every=1", "resume_jobs=true")
    assert run(cfg) == first  # kept: its summary, not one file touched
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()} == files
    (folder / "summary.json").unlink()
    assert run(make_cfg(*SMALL, "checkpoint.every=1", "resume_jobs=true"))["efficacy"] == first[
        "efficacy"]  # continued from its checkpoint
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2
    other = make_cfg(*SMALL, "checkpoint.every=1", "resume_jobs=true", "editor.lam=7")
    with pytest.raises(ConfigError, match="made with another config"):
        run(other)  # another job's settings: never mixed
