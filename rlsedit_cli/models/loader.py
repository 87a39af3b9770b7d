"""Load a model and tokenizer from a local folder or the Hugging Face hub, with clear errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlsedit_cli.accel import Accelerations
from rlsedit_cli.config import conf_dir
from rlsedit_cli.errors import ConfigError, ModelLoadError, first_line
from rlsedit_cli.models.facts import check_facts
from rlsedit_cli.models.gguf import dequantised_folder, locate
from rlsedit_cli.models.handle import ModelHandle

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is not a device: use auto, cpu, cuda or cuda:N",
                          ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available: use device=cpu or auto")
    return dev


def known_archs() -> dict[str, str]:
    """arch -> model config file, over every conf/model/*.yaml."""
    out: dict[str, str] = {}
    for path in sorted((conf_dir() / "model").glob("*.yaml")):
        arch = OmegaConf.load(path).get("arch")
        if arch:
            out.setdefault(str(arch), path.stem)
    return out


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    reason = first_line(err)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    where = "offline mode (HF_HUB_OFFLINE=1)" if offline else "the hub is unreachable"
    return ModelLoadError(
        f"cannot load model '{name}': not a local folder and {where} ({reason[:160]}); "
        f"download it where there is a network (`hf download {name} --local-dir DIR`) "
        "and set model.name_or_path=DIR"
    )


def _check_arch(model: torch.nn.Module, spec) -> None:
    model_type = getattr(model.config, "model_type", "?")
    archs = known_archs()
    if model_type != spec.arch:
        supported = ", ".join(f"{a} (model={f})" for a, f in archs.items())
        raise ModelLoadError(
            f"model '{spec.name_or_path}' is a '{model_type}' model but model={spec.name} "
            f"describes '{spec.arch}'; supported architectures: {supported}; for another one, "
            "add a conf/model file with its module templates"
        )
    for template in (spec.layer_template, spec.mlp_out_template):
        try:
            model.get_submodule(template.format(0))
        except AttributeError as e:
            raise ModelLoadError(
                f"module template '{template}' of model={spec.name} does not match the loaded "
                f"'{model_type}' model: fix the template in conf/model/{spec.name}.yaml"
            ) from e


def _attention_error(spec, err: Exception) -> ConfigError | None:
    """A one-line error when ``err`` is the model refusing ``spec.attn_implementation``."""
    name = getattr(spec, "attn_implementation", None)
    reason = first_line(err).split(". ")[0]
    if name is None or not any(word in reason.lower() for word in ("attention", "attn")):
        return None
    return ConfigError(f"model.attn_implementation={name!r} cannot be used ({reason}): "
                       "use eager, sdpa, or null for the default")


def _source(spec, cache: str | Path | None) -> str:
    """What from_pretrained reads: ``name_or_path``, or the cached float32 copy of a GGUF file."""
    name = str(spec.name_or_path)
    gguf_file = getattr(spec, "gguf_file", None)
    if not gguf_file:
        return name
    if cache is None:
        raise ConfigError("a GGUF model needs a cache folder for its de-quantised copy: set "
                          "paths.cache")
    return str(dequantised_folder(locate(name, str(gguf_file), spec.revision), cache))


def load_configured(cfg, device: torch.device) -> ModelHandle:
    """The model of a composed config (``cfg.model``) with its ``speed.accelerations``."""
    return load_model(cfg.model, device, cfg.paths.cache,
                      Accelerations.parse(cfg.speed.accelerations))


def load_model(spec, device: torch.device, cache: str | Path | None = None,
               accel: Accelerations | None = None) -> ModelHandle:
    """Load a conf/model node's model onto ``device`` and check its templates.

    Args:
        cache: folder for derived files (``paths.cache``); GGUF models keep their de-quantised
            float32 copy there.
        accel: the accelerations its passes may take (``speed.accelerations``; None: all).
    """
    if spec.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={spec.dtype!r} is not one of {sorted(DTYPES)}")
    if spec.dtype == "float16" and device.type == "cpu":
        log.warning("model.dtype=float16 on the CPU: torch has few float16 CPU kernels, and the "
                    "anchor statistics alone ran about 60x slower than in float32; use "
                    "model.dtype=float32 (or bfloat16 where the CPU has AVX512_BF16)")
    name = _source(spec, cache)
    is_local = Path(name).expanduser().exists()
    if name.startswith(("/", "./", "~")) and not is_local:
        raise ModelLoadError(f"model.name_or_path={name} does not exist: point it at a model "
                             "folder")
    revision = None if getattr(spec, "gguf_file", None) else spec.revision
    kwargs = {"revision": revision, "trust_remote_code": spec.trust_remote_code}
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
        attention = getattr(spec, "attn_implementation", None)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=DTYPES[spec.dtype], device_map=spec.device_map,
            **({"attn_implementation": str(attention)} if attention is not None else {}), **kwargs
        )
    except SafetensorError as e:  # a truncated or damaged weights file
        raise ModelLoadError(f"cannot load model from {name}: its weights file is damaged or "
                             f"incomplete ({first_line(e)[:100]}): copy or download it "
                             "again") from e
    except (OSError, ValueError) as e:
        if (refused := _attention_error(spec, e)) is not None:
            raise refused from e
        if is_local:
            raise ModelLoadError(f"cannot load model from {name}: {first_line(e)}") from e
        raise _hub_error(name, e) from e
    _check_arch(model, spec)
    if spec.device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(
                f"the tokenizer of {name} has neither a pad nor an eos token, which batching "
                "needs: add one to its tokenizer_config.json (e.g. \"eos_token\")")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    handle = ModelHandle(model=model, tok=tok, spec=spec, accel=accel or Accelerations())
    handle.check_layers(list(spec.edit_layers), "model.edit_layers")
    handle.check_layers([spec.single_layer], "model.single_layer")
    handle.check_layers([spec.loss_layer], "model.loss_layer")
    check_facts(handle)
    log.info("loaded %s (%s, %s) on %s", name, spec.arch, spec.dtype, handle.device)
    return handle
