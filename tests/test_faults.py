"""Faults a new user met: each fed as the real input, each answered at its mechanism."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlsedit_cli.datasets.records import fill
from rlsedit_cli.runner.run import run

from .conftest import compose_cfg
from .test_resume import cli, wait_for_lines

TINY = ["editor=rlsedit", "eval=none", "stream.num_edits=2", "stream.batch_size=2",
        "stream.shuffle=false", "measure.fluency=false", "measure.pre_edit=false",
        "measure.retention_edits=0"]

BRACED = ["{} is {located} in", "The {{ club of {} is", "} {} {0} {", "{}'s {!r} home is"]


def test_fill_reads_braces_as_text():
    assert fill("{} of {x} and {0}", "Paris") == "Paris of {x} and {0}"
    assert fill("a {{ {} }}", "b") == "a {{ b }}"
    with pytest.raises(ValueError, match="no '{}' placeholder"):
        fill("no placeholder", "x")


def _rome(i: int, prompt: str) -> dict:
    return {"case_id": i, "requested_rewrite": {
        "prompt": prompt, "subject": "Paris", "relation_id": "P17",
        "target_new": {"str": "Italy", "id": "Q38"},
        "target_true": {"str": "France", "id": "Q142"}},
        "paraphrase_prompts": [f"{{weird}} text. {prompt.replace('{}', 'Paris')}"],
        "neighborhood_prompts": ["Lyon {is} in"], "attribute_prompts": ["Rome } is in"],
        "generation_prompts": ["Paris {0} is"]}


def _easyedit(i: int, prompt: str) -> dict:
    return {"case_id": i, "prompt": prompt.replace("{}", "Paris"), "subject": "Paris",
            "target_new": "Italy", "ground_truth": "France",
            "rephrase_prompt": "{weird} Paris is in", "locality_prompt": "Lyon {is} in",
            "locality_ground_truth": "France"}


@pytest.mark.parametrize("layout", ["counterfact", "counterfact_easyedit"])
def test_braces_in_prompts_are_text(layout, tmp_path, make_cfg):
    """Literal braces anywhere in a record's prompts reached str.format (KeyError, IndexError,
    ValueError tracebacks); now every prompt is filled as data and the run ends normally."""
    make = _rome if layout == "counterfact" else _easyedit
    path = tmp_path / "braced.json"
    path.write_text(json.dumps([make(i, p) for i, p in enumerate(BRACED)]))
    cfg = make_cfg(*TINY, f"dataset={layout}", f"dataset.path={path}", "stream.num_edits=4")
    summary = run(cfg)
    assert summary["num_edits"] == 4 and summary["efficacy"] is not None


@pytest.mark.parametrize("override", ["+foo=1", "+stream.x=1", "+editor.x=1",
                                      "++measure.batch_sise=3", "+stream.x.y=2"])
def test_a_key_added_with_plus_is_refused_like_a_misspelt_one(override):
    """Hydra adds any ``+key`` (kept silently at the root, a traceback inside an editor);
    now it is refused in one line unless the schema has the key or the section is a map."""
    from rlsedit_cli.errors import ConfigError
    from rlsedit_cli.validate import check_added_keys

    cfg = compose_cfg([override])
    with pytest.raises(ConfigError, match=r"is not a setting .*check the spelling"):
        check_added_keys(cfg, [override])


def test_plus_keeps_working_for_groups_and_open_maps():
    from rlsedit_cli.validate import check_added_keys

    overrides = ["+experiment=long_smollm2", "+eval.limits.boolq=3", "+eval.fewshot.boolq=1"]
    check_added_keys(compose_cfg(overrides), overrides)


def test_a_misspelt_key_gets_no_hint_towards_plus():
    """Hydra's own hint ("To append to your config use +stream.x=1") led to a key nothing reads."""
    from hydra.errors import ConfigCompositionException

    from rlsedit_cli.cli import one_line

    with pytest.raises(ConfigCompositionException) as caught:
        compose_cfg(["stream.batch_sise=3"])
    line = one_line(caught.value)
    assert "stream.batch_sise" in line and "+" not in line and "check the spelling" in line


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlsedit_cli", "run", *args],
                          capture_output=True, text=True, timeout=600)


def _snapshot(folder: Path) -> dict:
    """Every file's bytes and modification time (a rewrite with equal bytes shows too)."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


QUICK = ["editor=rlsedit", "logger=none", "eval=none", "stream.num_edits=4",
         "stream.batch_size=2", "measure.fluency=false", "measure.retention_every=0",
         "checkpoint.every=1"]


def test_a_refused_resume_touches_nothing_and_a_resume_keeps_the_first_command(tmp_path):
    """A refused ``resume=RUN editor=OTHER`` replaced RUN's .hydra/ files; a resume replaced
    .hydra/overrides.yaml; resuming a finished run redid its final measurements. Now a refused
    command changes no byte, a resume appends its command to .hydra/resumes.yaml, and a
    finished run is said to be finished."""
    run_dir, cache = tmp_path / "run", f"paths.cache={tmp_path / 'cache'}"
    first_run = _cli(*QUICK, cache, f"hydra.run.dir={run_dir}")
    assert first_run.returncode == 0, first_run.stderr[-2000:]
    # off a terminal: a few plain lines, no carriage-return fragments of progress bars
    out = first_run.stderr
    assert "\r" not in out and len(out.splitlines()) < 40, out
    assert "run (rlsedit): final measurements: " in out
    (run_dir / "summary.json").unlink()  # as if killed after the last checkpoint
    first = (run_dir / ".hydra" / "overrides.yaml").read_bytes()
    before = _snapshot(run_dir)
    refused = _cli(f"resume={run_dir}", "editor=memit", cache)
    assert refused.returncode == 2 and "a resumed run keeps its settings" in refused.stderr
    assert _snapshot(run_dir) == before
    resumed = _cli(f"resume={run_dir}", cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # one numbering: batches count from 0 in the log as in metrics.jsonl (it said "batch 2")
    assert "resumed after batch 1 (4 edits made" in resumed.stderr
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == first
    entries = yaml.safe_load((run_dir / ".hydra" / "resumes.yaml").read_text())
    assert [e["overrides"] for e in entries] == [[f"resume={run_dir}", cache]]
    finished = _snapshot(run_dir)
    again = _cli(f"resume={run_dir}", cache)
    assert again.returncode == 2 and "that run finished" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert _snapshot(run_dir) == finished


def test_resuming_a_folder_that_is_no_run_says_so(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8")
    proc = _cli(f"resume={folder}")
    assert proc.returncode == 2 and "is not a run folder" in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]


@pytest.mark.slow  # two local submitit attempts: about 40 s alone on cpu-2
def test_a_preempted_submitit_job_requeues_and_resumes_by_itself(tmp_path):
    """Submitit's preemption signal (USR2, which Slurm sends before it stops a job; here to a
    local submitit job) requeues the job; the new attempt finds its own checkpoint and goes on:
    every batch once, and the summary covers every edit."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import psutil

    proc = cli("-m", "hydra/launcher=local", *QUICK, "stream.num_edits=100",
               f"paths.output_dir={tmp_path}", f"paths.cache={tmp_path}/cache")
    deadline = time.time() + 300
    metrics = []
    while not metrics and time.time() < deadline and proc.poll() is None:
        metrics = list(tmp_path.glob("multirun/**/metrics.jsonl"))
        time.sleep(0.1)
    assert metrics, Path(proc.log_path).read_text()[-2000:]
    wait_for_lines(proc, metrics[0], 2)
    tasks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "submitit.core._submit" in " ".join(p.cmdline())]
    assert len(tasks) == 1 and proc.poll() is None
    tasks[0].send_signal(signal.SIGUSR2)
    proc.wait(timeout=600)
    job = metrics[0].parent
    assert proc.returncode == 0, Path(proc.log_path).read_text()[-3000:]
    assert "left a checkpoint: it continues from there" in (job / "run.log").read_text()
    batches = [json.loads(line)["batch"] for line in metrics[0].open()]
    assert batches == list(range(50))
    assert json.loads((job / "summary.json").read_text())["num_edits"] == 100


def test_a_report_over_models_and_datasets_names_them_in_columns(tmp_path):
    """Runs of two models and two datasets: the setting column held every model.* and dataset.*
    key (about 600 characters) and there was no dataset column."""
    from rlsedit_cli.report.runs import Run, mark_settings
    from rlsedit_cli.report.table import markdown_table

    def one(model, dataset, layers, path):
        config = {"editor": {"name": "rlsedit", "lam": 1.0},
                  "model": {"name": model, "edit_layers": layers, "dtype": "float32",
                            "name_or_path": f"/models/{model}", "anchor_corpus": model},
                  "dataset": {"name": dataset, "path": path}, "stream": {"num_edits": 10}}
        summary = {"editor": "rlsedit", "model": model, "dataset": dataset, "efficacy": 90.0}
        return Run(path=tmp_path, summary=summary, config=config)

    runs = [one("gpt2_tiny", "toy", [0, 1], None), one("smollm2_135m", "counterfact", [4, 8],
                                                      "/data/cf.json")]
    mark_settings(runs)
    assert [r.setting for r in runs] == ["", ""]
    lines = markdown_table(runs).splitlines()
    assert lines[0].startswith("| Method | Model | Dataset | Setting |")
    assert lines[2].startswith("| rlsedit | gpt2_tiny | toy | - |")
    assert lines[3].startswith("| rlsedit | smollm2_135m | counterfact | - |")


def test_a_report_names_the_unfinished_runs_it_leaves_out(tmp_path, caplog):
    """A killed (resumable) run was skipped without a word."""
    from rlsedit_cli.report.runs import find_runs

    done, killed = tmp_path / "done", tmp_path / "killed"
    for folder in (done, killed):
        folder.mkdir()
        (folder / "metrics.jsonl").write_text('{"batch": 0, "edits": 10}\n'
                                              '{"batch": 1, "edits": 20}\n')
    (done / "summary.json").write_text(json.dumps({"editor": "rlsedit", "model": "m"}))
    (killed / "checkpoint.pt").write_bytes(b"")
    with caplog.at_level("WARNING"):
        runs = find_runs([tmp_path])
    assert [r.path for r in runs] == [done]
    warned = [r.getMessage() for r in caplog.records if str(killed) in r.getMessage()]
    assert len(warned) == 1 and "unfinished" in warned[0] and "20 edits" in warned[0]
    assert f"rlsedit run resume={killed}" in warned[0]


def test_off_a_terminal_progress_is_plain_lines_with_rate_and_time_left(caplog):
    """Off a terminal (CI, Slurm, nohup, a pipe) tqdm wrote carriage-return fragments into
    the log; a PlainLines bar logs a line per phase and per interval, with the time left."""
    from rlsedit_cli.progress import PlainLines

    with caplog.at_level("INFO", logger="rlsedit_cli.progress"):
        bar = PlainLines(total=4, desc="run (x): editing", unit="step", mininterval=0)
        for _ in range(3):
            bar.update(1)
        bar.set_description("run (x): final measurements")
        bar.update(1)
        bar.close()
        for _ in PlainLines(range(5), desc="inner", leave=False):  # quick: no line
            pass
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("run (x): editing: 1/4 step, 00:00 elapsed")
    assert "left" in lines[0] and "\r" not in "".join(lines)
    assert lines[-1].startswith("run (x): final measurements: 4/4 step")
    assert not any(line.startswith("inner") for line in lines)


def test_a_resumed_runs_bar_leaves_the_steps_done_before_out_of_its_rate(caplog):
    """A run resumed after 19 of 101 steps: its bar starts at 19, and its rate and time left
    come from the steps this sitting makes (not 19 steps in no time: "about 00:00 left")."""
    import time

    from rlsedit_cli.progress import PlainLines, resumed

    with caplog.at_level("INFO", logger="rlsedit_cli.progress"):
        bar = PlainLines(total=101, desc="run (x): editing", unit="step", mininterval=0)
        resumed(bar, 19)
        time.sleep(0.2)
        bar.update(1)
        bar.close()
    line = caplog.records[0].getMessage()
    assert line.startswith("run (x): editing: 20/101 step")
    rate = float(line.split(", ")[2].split(" ")[0])  # s/step or step/s
    assert ("s/step" in line and rate >= 0.1) or ("step/s" in line and rate <= 10)


@pytest.fixture
def read_only_disk(tmp_path):
    from .test_resume import _tmpfs

    yield from _tmpfs(tmp_path / "ro", "size=1m,ro")


def test_a_read_only_cache_names_paths_cache(read_only_disk, tmp_path):
    """The message named hydra.run.dir/paths.output_dir, which were writable."""
    proc = _cli(*QUICK, f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache={read_only_disk}/c")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: cannot write the cache" in lines[-1] and "paths.cache=" in lines[-1]
    assert "hydra.run.dir" not in lines[-1] and "Read-only file system" in lines[-1]


def test_a_records_file_with_a_byte_order_mark_is_read(tmp_path, make_cfg):
    """Editors on Windows save UTF-8 with a BOM; it was refused as invalid JSON."""
    path = tmp_path / "bom.json"
    path.write_bytes("\ufeff".encode() + json.dumps([_easyedit(1, "{} is in")]).encode())
    cfg = make_cfg(*TINY, "dataset=counterfact_easyedit", f"dataset.path={path}",
                   "stream.num_edits=1", "stream.batch_size=1")
    assert run(cfg)["num_edits"] == 1


def test_float16_on_a_cpu_is_warned_of(caplog):
    """float16 on the CPU computed the anchor statistics about 60x slower, without a word."""
    import torch

    from rlsedit_cli.models.loader import load_model

    cfg = compose_cfg(["model.dtype=float16"])
    with caplog.at_level("WARNING"):
        load_model(cfg.model, torch.device("cpu"))
    assert any("model.dtype=float16 on the CPU" in r.getMessage()
               and "model.dtype=float32" in r.getMessage() for r in caplog.records)


def test_the_toy_default_measures_fewer_texts_and_says_so(make_cfg):
    """The default run (toy) draws fluency texts from 2 of each record's 10 generation
    prompts, so it takes under a minute; summary.json states it. Other datasets keep all."""
    assert compose_cfg([]).measure.generation_prompts == 2
    assert compose_cfg(["dataset=counterfact_easyedit"]).measure.generation_prompts is None
    assert compose_cfg(["measure.generation_prompts=null"]).measure.generation_prompts is None
    summary = run(make_cfg(*TINY, "measure.fluency=true"))
    assert summary["measurement"]["generation_prompts"] == 2 and summary["fluency"] > 0


@pytest.mark.parametrize(("override", "message"), [
    ("editor.target.steps=0", "editor.target.steps=0 must be at least 1"),
    ("editor.target.lr=-1", "editor.target.lr=-1.0 must be above 0"),
    ("stats.num_samples=0", "stats.num_samples=0 must be at least 1"),
])
def test_values_that_gave_tracebacks_are_one_line(override, message, make_cfg):
    from rlsedit_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        run(make_cfg(*TINY, override))


def test_a_truncated_weights_file_is_one_line(tmp_path, make_cfg):
    import shutil

    from rlsedit_cli.config import ASSETS_DIR
    from rlsedit_cli.errors import ModelLoadError

    bundle = tmp_path / "bundle"
    shutil.copytree(ASSETS_DIR / "gpt2_tiny", bundle)
    weights = bundle / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="weights file is damaged or incomplete"):
        run(make_cfg(*TINY, f"model.name_or_path={bundle}"))


def test_stats_files_that_are_missing_foreign_or_nan_are_named(tmp_path, caplog):
    import numpy as np

    from rlsedit_cli.cli import main

    folder = tmp_path / "gpt2_tiny" / "wikitext_stats"
    folder.mkdir(parents=True)
    noise = folder / "transformer.h.1.mlp.c_proj_float32_mom2_100.npz"
    noise.write_bytes(bytes(range(256)) * 8)
    nan = folder / "transformer.h.0.mlp.c_proj_float32_mom2_100.npz"
    total = np.eye(4)
    total[0, 0] = np.nan
    np.savez(nan, **{"mom2.mom2": total, "mom2.count": np.array(10)})
    cache = f"paths.cache={tmp_path / 'cache'}"
    for path, says in ((folder / "gone_float32_mom2_100.npz", "no such file"),
                       (noise, "not a NumPy .npz archive"), (nan, "holds NaN or inf")):
        caplog.clear()
        assert main(["stats", "import", str(path), cache]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and says in errors[0] and "allow_pickle" not in errors[0]
    for verb in (["rm", "--all"], ["ls"]):  # one spelling of the cache for every verb
        assert main(["stats", *verb, cache]) == 0
        assert main(["stats", *verb, "--cache", str(tmp_path / "cache")]) == 0


def test_skip_invalid_also_skips_records_longer_than_the_context(tmp_path, make_cfg):
    rows = [_easyedit(i, "{} is in") for i in range(3)]
    rows[1]["prompt"] = "Paris " + "and Paris " * 80 + "is in"
    path = tmp_path / "long.json"
    path.write_text(json.dumps(rows))
    args = (*TINY, "dataset=counterfact_easyedit", f"dataset.path={path}",
            "stream.num_edits=2")
    from rlsedit_cli.errors import DataError

    with pytest.raises(DataError, match="case_id=1: a prompt of .* dataset.skip_invalid=true"):
        run(make_cfg(*args))
    summary = run(make_cfg(*args, "dataset.skip_invalid=true", "overwrite=true"))
    assert summary["num_edits"] == 2 and summary["skipped_records"] == 1


def test_records_without_paraphrase_or_neighbourhood_are_counted(tmp_path, make_cfg, caplog):
    rows = [_easyedit(i, "{} is in") for i in range(4)]
    rows[0]["rephrase_prompt"] = None
    rows[1]["rephrase_prompt"] = ""
    rows[2]["locality_prompt"] = None
    path = tmp_path / "holes.json"
    path.write_text(json.dumps(rows))
    summary = run(make_cfg(*TINY, "dataset=counterfact_easyedit", f"dataset.path={path}",
                           "stream.num_edits=4"))
    assert summary["records_without_prompts"] == {"generalization": 2, "specificity": 1}
    assert "2 of the 4 edited records have no paraphrase_prompts" in caplog.text


def test_a_sweep_over_data_files_tells_its_jobs_apart_and_reports_failures(tmp_path):
    from rlsedit_cli.report.runs import Run, failed_jobs, mark_settings

    runs = [Run(path=tmp_path / str(i), summary={"editor": "rlsedit", "model": "m"},
                config={"dataset": {"name": "cf", "path": p}}) for i, p in enumerate("ab")]
    mark_settings(runs)
    assert runs[0].label != runs[1].label and "dataset.path=a" in runs[0].label
    job = tmp_path / "sweep" / "1_editor.lam=x"
    job.mkdir(parents=True)
    (job / "error.txt").write_text("editor.lam='x' is not a number\n")
    assert failed_jobs([tmp_path / "sweep"]) == [(job, "editor.lam='x' is not a number")]


def test_the_console_shows_a_repeated_library_warning_once():
    import logging

    from rlsedit_cli.console import ConsoleFilter

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)

    console = ConsoleFilter()
    subjects = [record("lm_eval.evaluator", f"Overwriting default num_fewshot of mmlu_{s} from "
                                            "None to 5") for s in ("anatomy", "astronomy")]
    assert [console.filter(r) for r in subjects] == [True, False]
    assert console.filter(record("lm_eval.evaluator", "Some other warning"))
    mask = record("transformers.modeling_utils", "We strongly recommend passing in an "
                                                 "`attention_mask` since your input_ids ...")
    assert not console.filter(mask)
