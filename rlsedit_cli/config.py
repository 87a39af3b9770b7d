"""The typed schemas (rlsedit_cli/settings.py) registered with Hydra's ConfigStore; resolvers.

Each YAML file in ``conf/<group>/`` starts with ``defaults: [<group>_schema, _self_]`` (or the
schema of its own class), so a misspelt key or a value of the wrong type fails at start-up with
the key's full name. The root schema fixes the top-level sections.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rlsedit_cli.settings import EvalConfig, ModelConfig, NoLoggerConfig, RootConfig, WandbConfig

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"


def conf_dir() -> Path:
    """Where the YAML configs are: inside the package (wheel) or beside it (source, editable)."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"rlsedit configs not found next to {PACKAGE_DIR}; reinstall rlsedit")


def asset_path(name: str) -> str:
    """OmegaConf resolver ``${rlsedit.asset:NAME}``: absolute path of a shipped asset."""
    return str(ASSETS_DIR / name)


def folder_name(text: str, limit: int = 120) -> str:
    """OmegaConf resolver ``${rlsedit.folder_name:TEXT}``: TEXT as one safe folder name.

    Path separators become "_" (a value such as dataset.path=/data/cf.json must not nest
    folders) and a name longer than ``limit`` keeps its start and gains a hash of the whole, so
    distinct sweep jobs keep distinct folders within the file system's 255-byte limit.
    """
    name = re.sub(r"[/\\\0]", "_", str(text))
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return name.encode()[: limit - 11].decode(errors="ignore") + "~" + digest


def log_composition(choices: dict[str, str], editor_cfg: DictConfig) -> None:
    """Log which files of conf/ made the run; warn when the editor has no settings for the model.

    ``choices`` is Hydra's group -> chosen option (``hydra.runtime.choices``); ``editor_cfg``
    the composed editor section (an editor with a ``target`` section reads conf/target).
    """
    conf, model, editor = conf_dir(), choices.get("model"), choices.get("editor")
    files = [f"{group}/{option}.yaml" for group, option in choices.items()
             if option and not group.startswith("hydra") and (conf / group).is_dir()
             and (conf / group / f"{option}.yaml").is_file()]
    targets = f"target/{model}.yaml"
    if "target" in editor_cfg.keys() and (conf / targets).is_file():  # noqa: SIM118
        files.append(targets)
    log.info("composed from conf/: %s", ", ".join(files))
    if editor not in (None, "none") and not (conf / "editor_model"
                                            / f"{editor}_{model}.yaml").is_file():
        log.warning("no conf/editor_model/%s_%s.yaml: %s runs on the values of "
                    "conf/editor/%s.yaml, which were not chosen for %s; write that file to set "
                    "them", editor, model, editor, editor, model)


def composed(overrides: list[str]):
    """The config ``rlsedit run OVERRIDES`` would run, composed outside a Hydra job (no run
    folder) and checked as a run checks it (validate.py: a bad value is a one-line
    ConfigError): for the commands that read a config without running it (bench, stats)."""
    from hydra import compose, initialize_config_dir

    from rlsedit_cli import validate

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    validate.check(cfg)
    return cfg


def register_editor(name: str, schema: type, **values) -> None:
    """Make ``editor=NAME`` an option without files in conf/: ``schema`` (a dataclass deriving
    from :class:`rlsedit_cli.settings.EditorConfig`) with ``values`` (its ``_target_``, the
    class that edits, among them). For an editor that lives outside the package (a plugin, a
    test's); the package's own have their YAML in conf/editor and their schema in
    editors/schema.py. Per-model values still come from conf/editor_model/NAME_MODEL.yaml when
    that file exists, and the command line overrides both."""
    node = OmegaConf.merge(OmegaConf.structured(schema), {"name": name, **values})
    ConfigStore.instance().store(group="editor", name=name, node=node)


def register() -> None:
    """Register the schemas and resolvers (idempotent)."""
    if not OmegaConf.has_resolver("rlsedit.asset"):
        OmegaConf.register_new_resolver("rlsedit.asset", asset_path)
    if not OmegaConf.has_resolver("rlsedit.folder_name"):
        OmegaConf.register_new_resolver("rlsedit.folder_name", folder_name)
    if not OmegaConf.has_resolver("rlsedit.or"):  # first argument unless it is null/empty
        OmegaConf.register_new_resolver("rlsedit.or", lambda a, b: b if a in (None, "") else a)
    if not OmegaConf.has_resolver("rlsedit.unless"):  # second argument if the first is unset
        OmegaConf.register_new_resolver("rlsedit.unless",
                                        lambda a, b: b if a in (None, "", False) else None)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RootConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="eval", name="eval_schema", node=EvalConfig)
    cs.store(group="logger", name="wandb_schema", node=WandbConfig)
    cs.store(group="logger", name="none_schema", node=NoLoggerConfig)
    from rlsedit_cli.datasets.schema import SCHEMAS as DATASETS  # light: no torch, no editor
    from rlsedit_cli.editors.schema import SCHEMAS as EDITORS

    for group, schemas in (("editor", EDITORS), ("dataset", DATASETS)):
        for name, node in schemas.items():
            cs.store(group=group, name=f"{name}_schema", node=node)
