"""``rlsedit export RUN --out DIR``: a run's edited model, usable outside rlsedit.

Two forms. The edited maps alone (``edited_maps.safetensors``: each edited layer's weight under
its module's own parameter name and layout, a few MB) with the base model's name and a checksum
of its parameters in the file's metadata, applied to the base model with
:func:`apply_edited_maps`; and with ``full=True`` the whole edited model as a folder that
``transformers``' ``from_pretrained`` loads. Both come from the run's last checkpoint, or from
the final maps a run without checkpoints keeps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from rlsedit_cli.errors import DataError
from rlsedit_cli.files import folder_replaced_atomically, replaced_atomically
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.models.loader import load_model
from rlsedit_cli.runner import checkpoint
from rlsedit_cli.stats.anchor import parameters_digest

log = logging.getLogger(__name__)
MAPS = "edited_maps.safetensors"
EXPORT_MARK = "rlsedit_export.json"  # in OUTDIR/model: the export's metadata and its files


def base_digest(model: torch.nn.Module) -> str:
    """The checksum an export carries of the model it was made from (every parameter)."""
    return parameters_digest(model.named_parameters())


def _param_name(handle: ModelHandle, key: int | str) -> str:
    return handle.map_name(key) + ".weight"


def load_run_model(folder: Path) -> tuple[ModelHandle, dict, list[int | str]]:
    """The run's base model, with the checksum taken, then its last checkpoint's edited maps
    written into it; also the export's metadata and the edited layers."""
    if not (folder / "config.yaml").is_file():
        raise DataError(f"{folder} is not a run folder (no config.yaml): give the folder a run "
                        "wrote")
    if (folder / checkpoint.NAME).is_file():
        state = checkpoint.load(folder)
    elif (folder / checkpoint.FINAL_MAPS).is_file():
        state = checkpoint.load_final_maps(folder)
    else:
        raise DataError(f"{folder} holds neither a checkpoint nor the final maps of a finished "
                        "run (it stopped before its first checkpoint, or was made by a version "
                        "that kept neither): run it again")
    cfg = OmegaConf.load(folder / "config.yaml")
    handle = load_model(cfg.model, torch.device("cpu"), cfg.paths.cache)
    digest = base_digest(handle.model)
    keys = list(state["weights"])  # a layer (its MLP output map) or a module name
    for key, weight in state["weights"].items():
        handle.set_weight(key, weight)
    base = cfg.model.get("name_or_path") or cfg.model.get("gguf_file") or cfg.model.name
    info = {"base_model": str(base), "model_config": str(cfg.model.name),
            "base_model_digest": digest, "editor": str(cfg.editor.name),
            "num_edits": str(state["done"]),
            "layers": ",".join(str(k) for k in keys)}  # (metadata: strings)
    return handle, info, keys


def export_run(folder: str | Path, out: str | Path, full: bool = False) -> dict:
    """Write the edited maps (and with ``full`` the whole model) of the run in ``folder``."""
    folder, out = Path(folder), Path(out)
    handle, info, layers = load_run_model(folder)
    if not (folder / "summary.json").is_file():
        log.warning("the run in %s is unfinished: the export holds its last checkpoint, after "
                    "%s edits", folder, info["num_edits"])
    check_out(out, full)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(handle.model.named_parameters())
    maps = {_param_name(handle, layer): params[_param_name(handle, layer)].detach().cpu()
            .contiguous() for layer in layers}
    with replaced_atomically(out / MAPS) as tmp:
        save_file(maps, tmp, metadata={"format": "rlsedit-edited-maps", **info})
    written = {"maps": str(out / MAPS), **info}
    if full:
        with folder_replaced_atomically(out / "model") as tmp:
            handle.model.save_pretrained(tmp)
            handle.tok.save_pretrained(tmp)
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            (tmp / EXPORT_MARK).write_text(json.dumps({**info, "files": files}, indent=2)
                                           + "\n")
        written["model"] = str(out / "model")
    log.info("exported %s edits of %s (%s) to %s", info["num_edits"], info["base_model"],
             info["editor"], out)
    return written


def check_out(out: Path, full: bool) -> None:
    """Refuse an ``--out`` whose export files exist but were not written by an export: only an
    earlier export's own files are replaced."""
    maps = out / MAPS
    if maps.exists() and _maps_format(maps) != "rlsedit-edited-maps":
        raise DataError(f"{maps} exists and is not an rlsedit export: it is left as it is; "
                        "choose another --out")
    model = out / "model"
    if full and model.exists():
        try:
            listed = set(json.loads((model / EXPORT_MARK).read_text(encoding="utf-8"))["files"])
        except (OSError, ValueError, KeyError, TypeError):
            listed = None
        present = {str(p.relative_to(model)) for p in model.rglob("*") if p.is_file()}
        if listed is None or present - listed - {EXPORT_MARK}:
            raise DataError(f"{model} holds files an rlsedit export did not write: it is left "
                            "as it is; choose another --out")


def _maps_format(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # noqa: BLE001 (any unreadable file is not an export)
        return None


def apply_edited_maps(model: torch.nn.Module, path: str | Path) -> dict:
    """Write an export's edited maps into ``model``, the base model it was made from (refused,
    naming both, when the checksum differs); returns the export's metadata."""
    with safe_open(str(path), framework="pt") as f:
        info = f.metadata() or {}
        if info.get("format") != "rlsedit-edited-maps":
            raise DataError(f"{path} is not an rlsedit export of edited maps")
        if base_digest(model) != info["base_model_digest"]:
            raise DataError(f"{path} was made from {info['base_model']} with other weights "
                            "(checksum differs): load that base model, unedited")
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
    return info
