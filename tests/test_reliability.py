"""Every bad input and fault: one line naming the problem and the fix, a non-zero exit, no
half-written outputs. docs/reliability.md lists these cases with the messages observed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from rlsedit_cli.config import ASSETS_DIR
from rlsedit_cli.editors import base as editor_base
from rlsedit_cli.errors import NumericalError
from rlsedit_cli.runner.run import run

BASE = ["logger=none", "eval=none", "stream.num_edits=4", "stream.batch_size=2",
        "measure.fluency=false"]


def rlsedit_run(tmp_path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlsedit_cli", "run", *BASE, f"paths.output_dir={tmp_path}/out",
         f"paths.cache={tmp_path}/cache", *args], capture_output=True, text=True, env=env)


def one_error_line(proc, tmp_path) -> str:
    """The single error line; checks exit status, no traceback, no summary written."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert not list((tmp_path / "out").rglob("summary.json"))
    return errors[0]


@pytest.fixture
def bad_records(tmp_path):
    good = {"case_id": 7, "prompt": "Paris is the capital of", "subject": "Paris",
            "target_new": "France", "ground_truth": "France"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good]))
    return path


CASES = {
    "missing_dataset_file": (["dataset=counterfact_easyedit", "dataset.path=/no/such.json"],
                             "/no/such.json does not exist: set dataset.path"),
    "malformed_dataset_file": (["dataset=counterfact_easyedit", "dataset.path={malformed}"],
                               "is not valid JSON"),
    "bad_record": (["dataset=counterfact_easyedit", "dataset.path={bad_records}"],
                   "case_id=7: target_new equals target_true"),
    "prompt_longer_than_context": (["dataset=counterfact_easyedit", "dataset.path={long_prompt}",
                                    "stream.num_edits=1"],
                                   "record case_id=8: a prompt of"),
    "target_not_a_string": (["dataset=counterfact_easyedit", "dataset.path={number_target}"],
                            "record case_id=9: target_new is not a string (42)"),
    "dataset_path_is_a_folder": (["dataset=counterfact_easyedit", "dataset.path={folder}"],
                                 "is a folder: set it to the records file inside it"),
    "unknown_group_choice": (["model=gpt5"], "gpt5"),
    "misspelt_key": (["stream.batch_sise=3"], "stream.batch_sise"),
    "negative_lam": (["editor.lam=-1"], "editor.lam=-1.0 must not be negative"),
    "negative_mu": (["editor.mu=-0.5"], "editor.mu=-0.5 must not be negative"),
    "infinite_lam": (["editor.lam=inf"], "editor.lam=inf must be a finite number"),
    "batch_size_zero": (["stream.batch_size=0"], "stream.batch_size=0 must be at least 1"),
    "layers_out_of_range": (["model.edit_layers=[0,9]"], "has layer 9 out of range"),
    "unknown_architecture": (["model.arch=mamba"], "supported architectures: gpt2"),
    "hub_unreachable": (["model=llama3_8b"], "set model.name_or_path=DIR"),
    "corpus_unreachable": (["model.anchor_corpus=wikitext"], "cannot be read from the Hugging"),
    "failed_factorisation": (["editor.lam=0", "stats.num_samples=3"],
                             "is not positive definite (smallest eigenvalue"),
    "tokenizer_without_needed_tokens": (["model.name_or_path={no_eos_model}"],
                                        "has neither a pad nor an eos token"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, tmp_path, bad_records):
    args, expected = CASES[case]
    malformed = tmp_path / "malformed.json"
    malformed.write_text("[{not json")
    no_eos = tmp_path / "no_eos_model"
    if case == "tokenizer_without_needed_tokens":
        shutil.copytree(ASSETS_DIR / "gpt2_tiny", no_eos)
        cfg = json.loads((no_eos / "tokenizer_config.json").read_text())
        for key in ("eos_token", "pad_token", "bos_token", "unk_token"):
            cfg[key] = None
        (no_eos / "tokenizer_config.json").write_text(json.dumps(cfg))
    long_prompt = tmp_path / "long.json"
    long_prompt.write_text(json.dumps([{
        "case_id": 8, "prompt": "In the long story told " * 40 + "Paris is the capital of",
        "subject": "Paris", "target_new": "Italy", "ground_truth": "France"}]))
    number_target = tmp_path / "number.json"
    number_target.write_text(json.dumps([{"case_id": 9, "prompt": "Paris is the capital of",
                                          "subject": "Paris", "target_new": 42,
                                          "ground_truth": "France"}]))
    args = [a.format(malformed=malformed, bad_records=bad_records, no_eos_model=no_eos,
                     long_prompt=long_prompt, number_target=number_target, folder=tmp_path)
            for a in args]
    line = one_error_line(rlsedit_run(tmp_path, *args), tmp_path)
    assert expected in line


def test_nan_keys_stop_the_run_with_a_clear_error(make_cfg, monkeypatch):
    real = editor_base.LayerKeys.read

    def nan_keys(*args, **kwargs):
        K, h = real(*args, **kwargs)
        return K * float("nan"), h

    monkeypatch.setattr(editor_base.LayerKeys, "read", nan_keys)
    with pytest.raises(NumericalError, match="edit keys K holds NaN or inf.*model.dtype=float32"):
        run(make_cfg("editor=rlsedit", *BASE))


def test_wandb_without_key_or_network_falls_back_offline(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc: no credentials
    proc = rlsedit_run(tmp_path, "logger=wandb", "logger.mode=online", "logger.init_timeout=20",
                       env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "W&B online could not start" in proc.stderr and "offline instead" in proc.stderr
    assert list((tmp_path / "out").rglob("summary.json"))


def test_first_line_of_an_error():
    from rlsedit_cli.errors import first_line

    assert first_line(ValueError("  bad value\nsecond line")) == "bad value"
    assert first_line(KeyError()) == "KeyError"  # an empty message gives the type's name
