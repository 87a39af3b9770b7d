"""docs/configuration.md, written from the typed schemas and the YAML defaults, so that it cannot
drift from them: ``python -m rlsedit_cli.configref > docs/configuration.md`` (``make docs``;
tests/test_config.py fails when the page and the schemas part).

Each section's table: the key, its type (from the schema dataclass), its default (the value the
default run composes, or the group file's own value, interpolations shown as written) and the
schema's comment on the field.
"""

from __future__ import annotations

import inspect
import io
import re
import tokenize
from dataclasses import fields

from omegaconf import OmegaConf

from rlsedit_cli import settings
from rlsedit_cli.config import composed, conf_dir
from rlsedit_cli.datasets.schema import SCHEMAS as DATASETS
from rlsedit_cli.editors.schema import SCHEMAS as EDITORS
from rlsedit_cli.validate import rule_text

FIELD = re.compile(r"^\s+(\w+)\s*:")


def field_notes(cls) -> dict[str, str]:
    """Field -> the comment the schema writes beside it (or on the lines just above it), its
    base classes' fields included."""
    notes: dict[str, str] = {}
    for base in reversed(cls.__mro__[:-1]):  # object has no source
        notes |= {k: v for k, v in _own_notes(base).items() if v or k not in notes}
    return notes


def _own_notes(cls) -> dict[str, str]:
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = re.sub(r"^#\s*type: ignore\[[^\]]*\]\s*", "", tok.string)
            comments[tok.start[0]] = text.lstrip("#").strip()
    notes, above = {}, []
    for number, line in enumerate(source.splitlines(), start=1):
        match = FIELD.match(line)
        if line.strip().startswith("#"):
            above.append(comments.get(number, ""))
            continue
        if match:
            parts = above + ([comments[number]] if number in comments else [])
            notes[match.group(1)] = " ".join(p for p in parts if p)
        above = []
    return notes


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(cls, values: dict | None, skip: tuple[str, ...] = ()) -> list[str]:
    """The markdown table of one schema, with ``values`` as the defaults column."""
    notes = field_notes(cls)
    rows = ["| key | type | default | what it sets |", "|---|---|---|---|"]
    for f in fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        value = (values or {}).get(f.name, "")
        shown = f"`{value}`" if value not in ("", None, "???") else ""
        if f.type == "TargetConfig":  # its own table
            shown = "see `editor.target`"
        note = notes.get(f.name, "")
        if f.metadata:  # the check validate.py applies
            note = f"{note} (checked: {rule_text(f.metadata)})".strip()
        rows.append(f"| `{f.name}` | {_cell(f.type)} | {_cell(shown)} | {_cell(note)} |")
    return rows


def _raw(group: str, name: str) -> dict:
    """A group file's own values, interpolations as written."""
    node = OmegaConf.load(conf_dir() / group / f"{name}.yaml")
    return OmegaConf.to_container(node, resolve=False)


def _choices(group: str) -> str:
    return ", ".join(f"`{p.stem}`" for p in sorted((conf_dir() / group).glob("*.yaml")))


def page() -> str:
    """The whole page."""
    cfg = OmegaConf.to_container(composed([]), resolve=False)
    out = ["# Configuration reference", "",
           "Written by `python -m rlsedit_cli.configref` from the typed schemas "
           "(`rlsedit_cli/settings.py`, `editors/schema.py`, `datasets/schema.py`) and the "
           "defaults in `conf/`; do not edit by hand (`make docs` writes it again). Any key is "
           "set on the command line (`rlsedit run stream.num_edits=500`); a misspelt key stops "
           "the run at start with its name. `rlsedit run --cfg job ...` prints what would run.",
           "", "## Top-level keys", ""]
    nested = ("model", "editor", "dataset", "eval", "logger", "stream", "measure", "stats",
              "paths", "checkpoint", "speed")
    out += table(settings.RootConfig, cfg, skip=nested)
    for section, cls in (("stream", settings.StreamConfig), ("measure", settings.MeasureConfig),
                         ("stats", settings.StatsConfig), ("paths", settings.PathsConfig),
                         ("checkpoint", settings.CheckpointConfig),
                         ("speed", settings.SpeedConfig)):
        out += ["", f"## `{section}`", ""]
        out += table(cls, cfg.get(section))
    out += ["", "## `model` (a group)", "", f"Choices: {_choices('model')}. The default: "
            "`gpt2_tiny`.", ""]
    out += table(settings.ModelConfig, _raw("model", "gpt2_tiny"))
    out += ["", "## `editor` (a group)", "", f"Choices: {_choices('editor')}. Defaults from "
            "`conf/editor/NAME.yaml`; `conf/editor_model/NAME_MODEL.yaml` sets them per model.",
            ""]
    for name, cls in EDITORS.items():
        if not fields(cls):
            continue
        out += ["", f"### `editor={name}`", ""]
        out += table(cls, _raw("editor", name))
    out += ["", "### `editor.target` (MEMIT, AlphaEdit, RLSEdit, ROME)", "",
            "Values in `conf/target/MODEL.yaml`; the speed presets set some of them.", ""]
    out += table(settings.TargetConfig, _raw("target", "gpt2_tiny"))
    out += ["", "## `dataset` (a group)", "", f"Choices: {_choices('dataset')}.", ""]
    for name, cls in DATASETS.items():
        out += ["", f"### `dataset={name}`", ""]
        out += table(cls, _raw("dataset", name))
    out += ["", "## `eval` (a group)", "", f"Choices: {_choices('eval')}. The default: "
            "`smoke`.", ""]
    out += table(settings.EvalConfig, _raw("eval", "smoke"))
    out += ["", "## `logger` (a group)", "", f"Choices: {_choices('logger')}.", ""]
    out += table(settings.WandbConfig, _raw("logger", "wandb"))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(page(), end="")
