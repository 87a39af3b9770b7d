"""Config composition: groups, typed schemas, run folder layout, the CLI's run/ls verbs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from rlsedit_cli import config
from rlsedit_cli.cli import main, one_line

from .conftest import compose_cfg


def test_default_config_composes_with_every_section():
    cfg = compose_cfg([])
    assert cfg.model.name == "gpt2_tiny" and cfg.dataset.name == "toy"
    assert cfg.stream.num_edits > 0 and cfg.stream.batch_size > 0 and cfg.device == "auto"
    assert cfg.model.name_or_path == str(config.ASSETS_DIR / "gpt2_tiny")
    for key in ("output_dir", "cache"):
        assert key in cfg.paths


@pytest.mark.parametrize("model", ["gpt2_tiny", "gpt2_xl", "gptj_6b", "llama3_8b", "qwen2_5_7b"])
def test_every_model_config_resolves(model):
    cfg = compose_cfg([f"model={model}"])
    assert cfg.model.name == model and cfg.model.edit_layers
    assert max(cfg.model.edit_layers) < cfg.model.num_layers
    assert "{}" in cfg.model.mlp_out_template


def test_misspelt_key_fails_with_its_name():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["stream.batch_sise=3"])
    assert "stream.batch_sise" in one_line(err.value)


def test_wrong_type_fails_with_key_name():
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_cfg(["stream.batch_size=many"])
    assert "batch_size" in one_line(err.value)


def test_misspelt_key_in_a_yaml_file_fails(tmp_path):
    bad = config.conf_dir() / "model" / "_typo_test.yaml"
    bad.write_text("defaults:\n  - model_schema\n  - _self_\nnum_layerz: 3\n")
    try:
        with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
            compose_cfg(["model=_typo_test"])
        assert "num_layerz" in one_line(err.value)
    finally:
        bad.unlink()


def test_cli_run_cfg_job_prints_config(capsys):
    assert main(["run", "--cfg", "job", "stream.num_edits=7"]) == 0
    out = capsys.readouterr().out
    assert "num_edits: 7" in out and "mlp_out_template" in out


def rlsedit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlsedit_cli", *args], capture_output=True,
                          text=True)


def test_cli_run_error_is_one_line():
    proc = rlsedit("run", "--cfg", "job", "editor.not_a_key=1")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert len(err) == 1 and err[0].startswith("[rlsedit][ERROR] error:") and "not_a_key" in err[0]


def test_cli_unknown_group_choice_is_one_line():
    proc = rlsedit("run", "--cfg", "job", "model=gpt5")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert len(err) == 1 and "gpt5" in err[0] and "rlsedit ls" in err[0]


def test_cli_ls_lists_groups(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for item in ("model:", "gpt2_tiny", "llama3_8b", "editor:", "dataset:", "logger:", "wandb"):
        assert item in out
    assert "_schema" not in out


def test_console_script_help():
    exe = str(Path(sys.executable).with_name("rlsedit"))
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "run" in out and "toy" in out and "ls" in out
    out = subprocess.run([exe, "run", "--help"], capture_output=True, text=True, check=True).stdout
    assert "rlsedit run" in out and "== Config groups ==" in out
