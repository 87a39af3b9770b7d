"""Checkpoints of a run, written atomically into its folder, and the rules for resuming one.

A checkpoint holds what the stream needs to go on as if it had never stopped: the editor's
state, the edited layers' weights, the stream position, the figures so far, the line counts of
the run's line files (lines written after the checkpoint are dropped on resume, so no batch is
recorded twice) and the random generators' states.
"""

from __future__ import annotations

import logging
import pickle
import random
from dataclasses import is_dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from rlsedit_cli.errors import ConfigError, DataError, RlseditError, first_line
from rlsedit_cli.files import flatten, parse_override, replaced_atomically
from rlsedit_cli.runner.folder import disk_errors, write_atomic

log = logging.getLogger(__name__)
NAME = "checkpoint.pt"
FINAL_MAPS = "final_maps.safetensors"  # a finished run's edited layers when it kept no checkpoint
FREE_KEYS = ("paths", "logger", "device", "resume", "resume_jobs", "overwrite")  # may differ
# when a run is resumed


# Settings added after runs were checkpointed: a resumed run whose checkpoint lacks one goes on
# with the value that keeps it measured as it began (its line files keep their columns).
LATER_KEYS = {("measure", "generated_accuracy"): False, ("measure", "generated_at"): "every",
              ("eval", "logits"): "all", ("eval", "compute_dtype"): "float32",
              ("eval", "attention_dtype"): "float32"}


def restore_config(cfg: DictConfig, saved: dict, overrides: list[str] | None,
                   folder: Path) -> None:
    """A resumed run goes on with its own settings (``saved``, the checkpoint's) and its own
    tracker (the folder's config.yaml) unless the command names a logger. A section whose type
    is one schema (model, stream, measure, ...) is merged into; an editor's or a dataset's
    (their schema depends on the choice) is replaced."""
    from typing import get_type_hints

    from rlsedit_cli.settings import RootConfig

    typed = {key for key, hint in get_type_hints(RootConfig).items() if is_dataclass(hint)}
    given = {parse_override(o)[0].split(".")[0] for o in overrides or []}
    with open_dict(cfg):
        saved_file = folder / "config.yaml"
        if "logger" not in given and saved_file.is_file():
            cfg.logger = OmegaConf.load(saved_file).get("logger", cfg.logger)
        for key, value in saved.items():
            cfg[key] = OmegaConf.merge(cfg[key], value) if key in typed else value


def fill_later_keys(saved: dict) -> dict:
    """The saved config with every LATER_KEYS setting it lacks, at its continuing value."""
    for (section, key), value in LATER_KEYS.items():
        if isinstance(saved.get(section), dict) and key not in saved[section]:
            log.info("the checkpoint predates %s.%s: the run goes on with %s", section, key, value)
            saved[section][key] = value
    return saved


def edit_config(cfg: DictConfig) -> dict:
    """The run's settings a resumed run must keep: everything but paths, tracker and device."""
    data = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in data.items() if k not in FREE_KEYS}


def saved_edit_config(folder: Path) -> dict:
    """The settings a finished run in ``folder`` was made with (its config.yaml, less the keys
    that may differ): :func:`edit_config`'s counterpart on disk."""
    saved = OmegaConf.to_container(OmegaConf.load(Path(folder) / "config.yaml"))
    return {k: v for k, v in saved.items() if k not in FREE_KEYS}


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: Path, state: dict) -> None:
    """Write the checkpoint through a temporary file; the previous one stays until the rename."""
    previous = (folder / NAME).is_file()
    try:
        with disk_errors(folder, "the checkpoint"), replaced_atomically(folder / NAME) as tmp:
            torch.save(state, tmp)
    except RlseditError as e:
        kept = "the previous checkpoint is intact" if previous else "no checkpoint yet"
        raise RlseditError(f"{e} ({kept}; checkpoint.every=0 saves none)") from e.__cause__


def save_final_maps(folder: Path, weights: dict[int | str, torch.Tensor], done: int) -> None:
    """The edited maps' final weights (as the handle keeps them), for ``rlsedit export``."""
    from safetensors.torch import save_file

    with disk_errors(folder, FINAL_MAPS), replaced_atomically(folder / FINAL_MAPS) as tmp:
        save_file({str(k): v.contiguous() for k, v in weights.items()}, tmp,
                  metadata={"format": "rlsedit-final-maps", "done": str(done)})


def load_final_maps(folder: Path) -> dict:
    """A finished run's final maps as a checkpoint's ``weights`` and ``done``."""
    from safetensors import SafetensorError, safe_open

    path = folder / FINAL_MAPS
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = {int(k) if k.isdigit() else k: f.get_tensor(k)  # a layer, or a name
                       for k in f.keys()}  # noqa: SIM118 (safe_open)
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read ({first_line(e)[:100]}): it is not a complete "
                        "file of the run's final maps") from e
    if meta.get("format") != "rlsedit-final-maps":
        raise DataError(f"{path} is not a file of a run's final maps")
    return {"weights": weights, "done": int(meta.get("done", 0))}


def load(folder: Path) -> dict:
    path = folder / NAME
    if not path.is_file():
        raise DataError(f"no checkpoint in {folder}: resume needs a run made with "
                        "checkpoint.every > 0")
    try:  # tensors and plain containers only: a crafted file cannot run code here
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise DataError(f"checkpoint {path} cannot be read (UnpicklingError): it is not a "
                            "complete rlsedit checkpoint; start the run again") from e
        raise DataError(f"checkpoint {path} holds Python objects other than tensors and plain "
                        "values (a file rlsedit did not write, or one of a version before "
                        "checkpoints were made safe to load); it was not loaded: start the run "
                        "again") from e
    except Exception as e:  # a truncated or foreign file
        raise DataError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is not a "
                        "complete rlsedit checkpoint; start the run again") from e


def check_matches(saved: dict, current: dict, folder: Path) -> None:
    """Refuse to resume a run whose edit-deciding config differs from the checkpoint's."""
    a, b = flatten(saved), flatten(current)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
        shown = "; ".join(f"{k}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}" for k in diff[:4])
        raise ConfigError(
            f"the checkpoint in {folder} was made with another config ({shown}"
            f"{'; ...' if len(diff) > 4 else ''}): resume with the run's own settings "
            f"(`rlsedit run resume={folder}` alone uses them)"
        )


def check_overrides(saved: dict, overrides: list[str], folder: Path) -> None:
    """Refuse command-line overrides that change an edit-deciding key of the saved run."""
    flat = flatten(saved)
    for o in overrides:
        key, value = parse_override(o)
        section = key.split(".")[0].split("/")[0]
        if section not in saved:
            continue
        parsed = yaml.safe_load(value) if value else None
        current = flat[key] if key in flat else flat.get(f"{key}.name")  # a key or a group
        if current != parsed:
            raise ConfigError(
                f"resume={folder} was made with {key}={current!r}; this run asks {o}: a "
                "resumed run keeps its settings (drop the override or start a new run)"
            )


def truncate_lines(path: Path, keep: int) -> None:
    """Keep the first ``keep`` lines of a line file (drop what came after the checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if len(lines) > keep:
        write_atomic(path, "".join(lines[:keep]))
        log.info("%s: dropped %d lines written after the checkpoint", path.name, len(lines) - keep)


def count_lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else 0


def record_prints(records) -> list[str]:
    """A short content hash of each edited record, in stream order (what a resumed run checks)."""
    import dataclasses
    import hashlib
    import json

    return [hashlib.sha256(json.dumps(dataclasses.asdict(r), sort_keys=True, default=str)
                           .encode()).hexdigest()[:16] for r in records]


def check_identity(saved: dict | None, current: dict, folder: Path) -> None:
    """Refuse to resume on other records or another base model than the run began with,
    naming the first difference (a checkpoint of a version without the identity is trusted)."""
    if not saved:
        return
    before, now = saved.get("records", []), current["records"]
    if before != now:
        i = next((i for i, (a, b) in enumerate(zip(before, now)) if a != b),
                 min(len(before), len(now)))
        where = (f"{len(before)} edited records then, {len(now)} now" if i >= min(
            len(before), len(now)) else f"the stream's record {i} differs: case_id "
            f"{saved['case_ids'][i]} then, {current['case_ids'][i]} now")
        raise ConfigError(f"resume={folder}: the records are not those the run began with "
                          f"({where}): resume with the dataset file the run started on")
    if saved.get("model") and saved["model"] != current["model"]:
        raise ConfigError(f"resume={folder}: the base model's weights differ from those the run "
                          "began with (its checksum changed): resume with the model files the "
                          "run started on")
