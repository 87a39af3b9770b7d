"""Config composition: groups, typed schemas, run folder layout, the CLI's run/ls verbs."""

from __future__ import annotations

import re
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
    """A user's own model file with a typo, in a copy of the configs (conf/ is not touched)."""
    import shutil

    from hydra import compose, initialize_config_dir

    conf = shutil.copytree(config.conf_dir(), tmp_path / "conf")
    (conf / "model" / "typo.yaml").write_text(
        "defaults:\n  - model_schema\n  - _self_\nnum_layerz: 3\n")
    with (pytest.raises((ConfigCompositionException, ConfigKeyError)) as err,
          initialize_config_dir(config_dir=str(conf), version_base="1.3")):
        compose("config", overrides=["model=typo"])
    assert "num_layerz" in one_line(err.value)


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


def test_cli_cfg_job_of_a_sweep_is_one_line():
    proc = rlsedit("run", "-m", "editor=rlsedit,memit", "--cfg", "job")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert len(err) == 1 and "drop -m" in err[0]


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
    assert "rlsedit run" in out and "Config groups:" in out and "_schema" not in out


def test_a_misspelt_objective_fails_before_any_edit(make_cfg):
    from rlsedit_cli.errors import ConfigError
    from rlsedit_cli.runner.run import run

    cfg = make_cfg("objective=efficasy", "stream.num_edits=2", "stream.batch_size=2")
    with pytest.raises(ConfigError, match="objective='efficasy' is not one of hmean, efficacy"):
        run(cfg)
    assert not (Path(cfg.paths.run_dir) / "metrics.jsonl").exists()


def test_composing_a_config_imports_no_torch_and_no_editor():
    """Schemas are registered from light modules: `rlsedit ls` and `--cfg job` stay fast and a
    broken editor module cannot break another editor's config."""
    code = ("import sys; from rlsedit_cli.cli import main; main(['run', '--cfg', 'job', "
            "'editor=memit']); heavy = [m for m in ('torch', 'transformers', "
            "'rlsedit_cli.editors.memit', 'rlsedit_cli.editors.rlsedit') if m in sys.modules]; "
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "HEAVY []" in out and "name: memit" in out


def test_models_share_their_target_settings_across_editors():
    """conf/target/MODEL.yaml is the one place of a model's target optimisation for MEMIT,
    AlphaEdit and RLSEdit; an editor_model file or the command line still overrides one key."""
    targets = {e: compose_cfg([f"editor={e}", "model=llama3_8b"]).editor.target
               for e in ("memit", "alphaedit", "rlsedit")}
    assert targets["memit"] == targets["alphaedit"] == targets["rlsedit"]
    assert targets["memit"].lr == 0.1 and targets["memit"].steps == 25
    assert compose_cfg(["editor=memit", "model=smollm2_135m"]).editor.target.lr == 0.5
    one = compose_cfg(["editor=memit", "model=llama3_8b", "editor.target.lr=0.3"]).editor.target
    assert one.lr == 0.3 and one.steps == 25 and one.clamp_norm_factor == 0.75


def test_a_model_without_settings_is_named(tmp_path, caplog):
    """A model with no conf/target or conf/editor_model file: the run says so, in one line."""
    import logging
    import shutil

    from hydra import compose, initialize_config_dir

    from rlsedit_cli.errors import ConfigError
    from rlsedit_cli.validate import check as check_config

    conf = shutil.copytree(config.conf_dir(), tmp_path / "conf")
    (conf / "target" / "gpt2_tiny.yaml").unlink()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["editor=memit", "model=gpt2_tiny"])
    with pytest.raises(ConfigError, match="editor.target is not set for model gpt2_tiny: add "
                                          "conf/target/gpt2_tiny.yaml"):
        check_config(cfg)
    with caplog.at_level(logging.INFO):
        config.log_composition({"model": "mine", "editor": "memit", "dataset": "toy"},
                               cfg.editor)
    assert "composed from conf/: editor/memit.yaml, dataset/toy.yaml" in caplog.text
    assert "no conf/editor_model/memit_mine.yaml: memit runs on the values of" in caplog.text


def test_the_editing_metrics_are_not_in_the_eval_group():
    """`eval` chooses lm-eval tasks only; the editing metrics' settings are `measure.*`."""
    cfg = compose_cfg(["eval=none"])
    assert cfg.eval.tasks == [] and cfg.measure.retention_edits == 20
    assert not {"fluency", "pre_edit", "retention_every", "batch_size"} & set(cfg.eval)
    with pytest.raises(ConfigCompositionException, match="eval.fluency"):
        compose_cfg(["eval.fluency=false"])


def test_schemas_hold_types_and_the_yaml_files_the_values():
    """Every value of a run comes from conf/ (or the command line), none from Python defaults:
    the root schema alone leaves the settings missing."""
    from omegaconf import OmegaConf

    from rlsedit_cli.settings import RootConfig, TargetConfig

    root = OmegaConf.structured(RootConfig)
    for key in ("stream.num_edits", "measure.fluency", "stats.batch_size", "paths.cache",
                "checkpoint.every", "seed", "objective"):
        parent, _, leaf = key.rpartition(".")
        assert OmegaConf.is_missing(OmegaConf.select(root, parent) if parent else root, leaf)
    target = OmegaConf.structured(TargetConfig)
    assert all(OmegaConf.is_missing(target, k) for k in target)
    assert compose_cfg([]).editor.target.steps == 25  # conf/target/gpt2_tiny.yaml


@pytest.mark.parametrize(("override", "message"), [
    ("eval.source=hubb", "eval.source='hubb' must be local or hub"),
    ("eval.sample=random", "eval.sample='random' must be seeded or first"),
    ("eval.limit=0", "eval.limit=0 must be at least 1"),
    ("++eval.limits={mmlu: 0}", "eval.limits.mmlu=0 must be at least 1"),
    ("eval.attention_dtype=bfloat16",
     "eval.attention_dtype=bfloat16 needs eval.compute_dtype=bfloat16"),
])
def test_bad_general_ability_settings_stop_the_run_at_start(make_cfg, override, message):
    from rlsedit_cli.errors import ConfigError
    from rlsedit_cli.runner.run import run

    cfg = make_cfg("eval=glue", override, "stream.num_edits=2", "stream.batch_size=2")
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(cfg)
    assert not (Path(cfg.paths.run_dir) / "metrics.jsonl").exists()


def test_the_schemas_import_no_config_module_and_no_torch():
    """settings.py is a leaf; the editors' and datasets' schemas need only it (no circle with
    config.py, which imports them), and composing imports no torch."""
    import subprocess
    import sys

    code = ("import sys, rlsedit_cli.editors.schema, rlsedit_cli.datasets.schema; "
            "print(sorted(m for m in sys.modules if m.startswith('rlsedit_cli')), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == ("['rlsedit_cli', 'rlsedit_cli.datasets', 'rlsedit_cli.datasets.schema',"
                           " 'rlsedit_cli.editors', 'rlsedit_cli.editors.schema', "
                           "'rlsedit_cli.settings'] False")


def test_the_configuration_reference_is_the_schemas_own():
    """docs/configuration.md is written from the schemas and conf/ (`make docs`): a field added,
    renamed or commented without writing the page again fails here."""
    from rlsedit_cli.configref import page

    written = (config.conf_dir().parent / "docs" / "configuration.md").read_text()
    assert written == page(), "docs/configuration.md is stale: run `make docs`"
    assert "`editor=ultraedit`" in written and "`stream`" in written


def test_the_reference_names_every_acceleration():
    """speed.accelerations' description lists every name accel/__init__.py knows."""
    from rlsedit_cli.accel import ACCELERATIONS
    from rlsedit_cli.configref import page

    row = next(line for line in page().splitlines() if line.startswith("| `accelerations`"))
    assert [name for name in ACCELERATIONS if name not in row] == []
