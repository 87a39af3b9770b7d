"""One place that validates a composed config, each fault one line that names the key and the
fix (a :class:`ConfigError`):

1. keys written with ``+`` that no schema has (:func:`check_added_keys`);
2. each value against the check declared beside its field in the schemas (settings.py's
   :func:`checked`: a lower bound, a strict one, or a set of choices; numbers finite), in every
   section, the chosen editor's and dataset's included (:func:`check_fields`);
3. what no single field can say: a missing target section, a folder that must exist, the names
   of a list (:func:`check_across`).

Composition itself (Hydra, the typed schemas) has already refused misspelt keys and values of
the wrong type; an editor checks what needs the model (its layers in range) when it is built.
"""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlsedit_cli.accel import Accelerations
from rlsedit_cli.config import conf_dir
from rlsedit_cli.errors import ConfigError
from rlsedit_cli.settings import OBJECTIVES


def check(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """Every check below, in order; ``overrides``: the command line's, when there is one."""
    if overrides:
        check_added_keys(cfg, overrides)
    check_fields(cfg)
    check_across(cfg)


def rule_text(rules: dict) -> str:
    """What a field's rules ask, as the error says it ("at least 1", "float32 or bfloat16")."""
    if "choices" in rules:
        return " or ".join(rules["choices"])
    if "above" in rules:
        return f"above {rules['above']:g}"
    return "not negative" if rules["low"] == 0 else f"at least {rules['low']:g}"


def _fault(value, rules: dict) -> str | None:
    """Why ``value`` breaks ``rules`` (None: it does not)."""
    if value is None:
        return None
    if "choices" in rules:
        return None if value in rules["choices"] else f"must be {rule_text(rules)}"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if ("low" in rules and value < rules["low"]) or ("above" in rules
                                                     and not value > rules["above"]):
        return f"must {'not be negative' if rules.get('low') == 0 else 'be ' + rule_text(rules)}"
    return None


def check_fields(node: DictConfig, path: str = "") -> None:
    """Each field of ``node`` (and of every section under it) against its declared check."""
    schema = OmegaConf.get_type(node)
    if is_dataclass(schema):
        for f in fields(schema):
            if f.metadata and f.name in node and not OmegaConf.is_missing(node, f.name):
                value = node[f.name]
                if (why := _fault(value, f.metadata)) is not None:
                    shown = repr(value) if isinstance(value, str) else value
                    raise ConfigError(f"{path}{f.name}={shown} {why}")
    for key in node.keys():  # noqa: SIM118 (a DictConfig)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_fields(child, f"{path}{key}.")


def check_across(cfg: DictConfig) -> None:
    """The checks no single field's rule can state."""
    # `in` on a DictConfig is False for a missing value: look at its keys
    if "target" in cfg.editor.keys() and OmegaConf.is_missing(cfg.editor, "target"):  # noqa: SIM118
        raise ConfigError(f"editor.target is not set for model {cfg.model.name}: add "
                          f"conf/target/{cfg.model.name}.yaml (as conf/target/llama3_8b.yaml) or "
                          "set editor.target.lr=... and the rest on the command line")
    if cfg.eval.data_dir and not Path(cfg.eval.data_dir).expanduser().is_dir():
        raise ConfigError(f"eval.data_dir={cfg.eval.data_dir} is not a folder: give a datasets "
                          "cache folder (HF_DATASETS_CACHE of a machine that loaded the tasks)")
    for task, n in cfg.eval.limits.items():
        if n is not None and n < 1:
            raise ConfigError(f"eval.limits.{task}={n} must be at least 1 (leave it out for "
                              "every document)")
    if cfg.eval.attention_dtype == "bfloat16" and cfg.eval.compute_dtype != "bfloat16":
        raise ConfigError("eval.attention_dtype=bfloat16 needs eval.compute_dtype=bfloat16 "
                          "(float32 passes keep attention in float32): set both or neither")
    Accelerations.parse(cfg.speed.accelerations)  # refuses an unknown name
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"objective={cfg.objective!r} is not one of {', '.join(OBJECTIVES)}")


def check_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse a key written with ``+``/``++`` that its section's schema does not have.

    Hydra adds such a key to any section (a misspelt ``+stream.batch_sise=3`` was silently
    kept); only a config group (``+experiment=...``) or a key of an open map (``eval.limits``)
    may be added.
    """
    for override in overrides:
        if not override.startswith("+") or "=" not in override:
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if key.startswith("hydra") or "@" in key or (conf_dir() / key).is_dir():
            continue
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            schema = node._metadata.object_type if isinstance(node, DictConfig) else None
            if not is_dataclass(schema):
                break  # an open map (or a plain value): any key may be added
            if part not in {f.name for f in fields(schema)}:
                section = ".".join(parts[:i]) or "the root config"
                raise ConfigError(f"{key} is not a setting ({section} has no key {part!r}; "
                                  "'+' does not make one): check the spelling, `rlsedit run "
                                  "--cfg job` prints every key")
            node = node.get(part)
