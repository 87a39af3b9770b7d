"""Model loading: every architecture's templates, offline hub errors, unknown architectures."""

from __future__ import annotations

import pytest
import torch

from rlsedit_cli.errors import ConfigError, ModelLoadError
from rlsedit_cli.models.loader import load_model, resolve_device

from .conftest import ARCHS, compose_cfg, tiny_overrides


@pytest.mark.parametrize("arch", list(ARCHS))
def test_templates_fit_every_architecture(arch, tiny_models):
    cfg = compose_cfg(tiny_overrides(arch, tiny_models[arch]))
    handle = load_model(cfg.model, torch.device("cpu"))
    d_out, d_in = handle.weight_shape(0)
    assert d_out == 64 and d_in in (128, 256)  # (hidden, MLP inner) whatever the storage
    before = handle.weight(1).clone()
    handle.set_weight(1, before + 1.0)
    assert torch.allclose(handle.weight(1), before + 1.0)


def test_offline_hub_model_fails_with_the_fix():
    cfg = compose_cfg(["model=llama3_8b"])
    with pytest.raises(ModelLoadError) as err:
        load_model(cfg.model, torch.device("cpu"))
    msg = str(err.value)
    assert "meta-llama/Meta-Llama-3-8B-Instruct" in msg and "model.name_or_path=" in msg
    assert "\n" not in msg


def test_missing_local_folder_fails():
    cfg = compose_cfg(["model.name_or_path=/nonexistent/model"])
    with pytest.raises(ModelLoadError, match="/nonexistent/model does not exist"):
        load_model(cfg.model, torch.device("cpu"))


def test_wrong_architecture_lists_supported(tiny_models):
    cfg = compose_cfg(tiny_overrides("gpt2", tiny_models["llama"]))
    with pytest.raises(ModelLoadError) as err:
        load_model(cfg.model, torch.device("cpu"))
    msg = str(err.value)
    assert "'llama' model" in msg and "gpt2" in msg and "qwen2" in msg and "conf/model" in msg


def test_layer_out_of_range(tiny_models):
    cfg = compose_cfg([*tiny_overrides("gpt2", tiny_models["gpt2"]), "model.edit_layers=[0,5]"])
    with pytest.raises(ConfigError, match="layer 5 out of range.*0..2"):
        load_model(cfg.model, torch.device("cpu"))


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device='tpu9'"):
        resolve_device("tpu9")


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gptj"])  # GPT-J has eager only
def test_attention_kernel_is_chosen_and_changes_no_logits(arch, tiny_models):
    base = tiny_overrides(arch, tiny_models[arch])
    eager = load_model(compose_cfg([*base, "model.attn_implementation=eager"]).model,
                       torch.device("cpu"))
    sdpa = load_model(compose_cfg([*base, "model.attn_implementation=sdpa"]).model,
                      torch.device("cpu"))
    assert eager.model.config._attn_implementation == "eager"
    assert sdpa.model.config._attn_implementation == "sdpa"
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        a = eager.model(input_ids=ids, attention_mask=mask).logits
        b = sdpa.model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1, 2:], b[1, 2:], atol=1e-5)


@pytest.mark.parametrize(("arch", "kernel"), [("gpt2", "warp_drive"), ("gptj", "sdpa")])
def test_unusable_attention_kernel_is_a_config_error(arch, kernel, tiny_models):
    cfg = compose_cfg([*tiny_overrides(arch, tiny_models[arch]),
                       f"model.attn_implementation={kernel}"])
    with pytest.raises(ConfigError) as err:
        load_model(cfg.model, torch.device("cpu"))
    msg = str(err.value)
    assert f"model.attn_implementation={kernel!r}" in msg and "eager" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("feature", ["post_feedforward_norm", "logit_softcapping"])
def test_a_model_the_pipeline_cannot_edit_is_refused(feature, tmp_path):
    """Gemma-2 normalises the MLP output before the residual sum and soft-caps its logits: the
    target loss would differ from the model's own, so the loader refuses it, in one line."""
    import transformers
    from transformers import AutoTokenizer

    from .conftest import TINY_BUNDLE

    tok = AutoTokenizer.from_pretrained(TINY_BUNDLE)
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.1,
        final_logit_softcapping=1.0 if feature == "logit_softcapping" else None,
        pad_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id)
    model = transformers.Gemma2ForCausalLM(cfg)
    model.save_pretrained(tmp_path / "gemma2")
    tok.save_pretrained(tmp_path / "gemma2")
    spec = compose_cfg([*tiny_overrides("llama", tmp_path / "gemma2"), "model.arch=gemma2"]).model
    if feature == "post_feedforward_norm":
        with pytest.raises(ModelLoadError, match="does not reach the residual stream as it is"):
            load_model(spec, torch.device("cpu"))
        return
    from rlsedit_cli.models.facts import check_facts
    from rlsedit_cli.models.handle import ModelHandle

    for layer in model.model.layers:  # the MLP's norm taken out: only the capping is left
        layer.post_feedforward_layernorm = torch.nn.Identity()
    with pytest.raises(ModelLoadError, match=r"logits are not lm_head\(model.norm\(h\)\)"):
        check_facts(ModelHandle(model=model.eval(), tok=tok, spec=spec))


def test_a_model_declared_unfit_is_refused(tiny_models):
    spec = compose_cfg([*tiny_overrides("llama", tiny_models["llama"]),
                        "model.logits_are_head_of_norm=false"]).model
    with pytest.raises(ModelLoadError, match="declares logits_are_head_of_norm: false"):
        load_model(spec, torch.device("cpu"))
