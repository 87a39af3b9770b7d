"""Shared fixtures: composed configs, the shipped tiny model, tiny random models per arch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# make test runs two processes on the two cores: one thread each (and in the CLI subprocesses the
# tests start), or they oversubscribe
IN_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if IN_WORKER:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from rlsedit_cli import config  # noqa: E402

config.register()
if IN_WORKER:
    torch.set_num_threads(1)  # in case torch was imported before this file
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_BUNDLE = config.ASSETS_DIR / "gpt2_tiny"

# (HF config class name, kwargs) of the tiny random models: 3 layers, 64 wide (two edited
# layers and one above them). initializer_range 0.1 (not 0.02) so that a random network's
# outputs can be moved at all.
ARCHS = {
    "gpt2": ("GPT2Config", dict(n_layer=3, n_embd=64, n_head=4, n_positions=128)),
    "gptj": ("GPTJConfig", dict(n_layer=3, n_embd=64, n_head=4, n_positions=128, rotary_dim=8)),
    "llama": ("LlamaConfig", dict(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128)),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128)),
}
MODEL_CONFIG = {"gpt2": "gpt2_xl", "gptj": "gptj_6b", "llama": "llama3_8b", "qwen2": "qwen2_5_7b"}


def compose_cfg(overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    """The config ``rlsedit run OVERRIDES`` would run, with paths under ``run_dir``."""
    with initialize_config_dir(config_dir=str(config.conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", *overrides])
    if run_dir is not None:
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
            cfg.paths.cache = str(run_dir / "cache")
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    """Compose a config whose run folder and cache live in the test's tmp folder."""

    def make(*overrides: str) -> DictConfig:
        return compose_cfg(list(overrides), tmp_path / "run")

    return make


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """arch -> folder of a tiny random model (2 layers, 64 wide) with the toy tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_BUNDLE)
    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for arch, (cls_name, kwargs) in ARCHS.items():
        torch.manual_seed(0)
        cfg = getattr(transformers, cls_name)(vocab_size=len(tok), bos_token_id=tok.eos_token_id,
                                               eos_token_id=tok.eos_token_id,
                                               initializer_range=0.1, **kwargs)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def tiny_overrides(arch: str, path: Path) -> list[str]:
    """Overrides that point an architecture's model config at a tiny random model."""
    return [f"model={MODEL_CONFIG[arch]}", f"model.name_or_path={path}", "model.dtype=float32",
            "model.num_layers=3", "model.edit_layers=[0,1]", "model.single_layer=1",
            "model.loss_layer=2", f"model.anchor_corpus={TINY_BUNDLE}/corpus.txt.gz"]


@pytest.fixture(scope="session")
def shipped_handle():
    """The shipped tiny GPT-2, loaded once (tests that edit it must restore it or copy it)."""
    from rlsedit_cli.models.loader import load_model

    cfg = compose_cfg([])
    return load_model(cfg.model, torch.device("cpu"))


def shared(name: str) -> Path:
    """A file of ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def rls_closed_form(W0, anchor_moment, lam, mu, n_anchor, Ks, Vs) -> torch.Tensor:
    """The minimiser of RLSEdit's objective over all batches at once, by a route that shares
    nothing with ops/rls.py: ONE least-squares problem min_W ||W X - Y||_F^2 whose columns are
    sqrt(lam) I (the pull to W0), sqrt(mu n_anchor) C^{1/2} (the anchor keys) and every batch's
    keys, solved by torch.linalg.lstsq. (d_out, d_in) float64."""
    W0, C = W0.double(), anchor_moment.double()
    evals, evecs = torch.linalg.eigh(0.5 * (C + C.mT))
    root = evecs * evals.clamp_min(0).sqrt()  # C = root root^T
    X = torch.cat([lam ** 0.5 * torch.eye(W0.shape[1], dtype=torch.float64),
                   (mu * n_anchor) ** 0.5 * root, *(K.double() for K in Ks)], 1)
    Y = torch.cat([lam ** 0.5 * W0, (mu * n_anchor) ** 0.5 * W0 @ root,
                   *(V.double() for V in Vs)], 1)
    return torch.linalg.lstsq(X.mT, Y.mT).solution.mT


def target_cfg(**values):
    """A TargetConfig with the tiny models' values (conf/target/gpt2_tiny.yaml), ``values`` over."""
    from rlsedit_cli.settings import TargetConfig

    base = dict(steps=25, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp_norm_factor=4.0,
                loss_layer=2, early_stop_loss=0.05, stop_when_top1=False, stop_below_nll=None,
                context_templates=[[5, 5]], chunk_size=64, compute_dtype="float32",
                keys_dtype="float32")
    return TargetConfig(**(base | values))


LONGEST_FIRST = ("test_real_model.py",)  # about a third of the suite's work, in one file


def pytest_addoption(parser):
    parser.addoption("--accelerations", choices=("all", "none"), default="all",
                     help="none: every acceleration off in this process (the plain paths; "
                          "tests marked accelerated are skipped)")


def pytest_configure(config):
    if config.getoption("--accelerations") == "none":
        from rlsedit_cli.accel import Accelerations

        Accelerations.on = lambda self, name, device: False  # the whole session, on purpose


def without(handle, *names: str):
    """``handle`` (the same model) with the accelerations ``names`` off."""
    from dataclasses import replace

    from rlsedit_cli.accel import Accelerations

    return replace(handle, accel=Accelerations(handle.accel.names - set(names)))


def pytest_collection_modifyitems(config, items):
    """The longest file first (stable otherwise): `make test` hands whole files to two
    processes in this order, so the longest one starts at once instead of running alone at
    the end."""
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)
    if config.getoption("--accelerations") == "none":
        skip = pytest.mark.skip(reason="asserts an acceleration runs (--accelerations=none)")
        for item in items:
            if "accelerated" in item.keywords:
                item.add_marker(skip)


def interrupt_after_row(monkeypatch, batch: int) -> None:
    """Runs raise KeyboardInterrupt (a Ctrl-C) right after writing batch ``batch``'s row of
    metrics.jsonl, until ``monkeypatch.undo()``."""
    from rlsedit_cli.runner.folder import RunFolder

    real_append = RunFolder.append_jsonl

    def append_then_stop(self, name, row):
        real_append(self, name, row)
        if row.get("batch") == batch:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "append_jsonl", append_then_stop)


def keys_and_hidden(handle, requests, templates, layer, z_layer, weights=None):
    """K (d_in, n) of ``layer``'s map (the ``weights``-mean over templates) and h (n, d_model)
    after ``z_layer``, read as one key-value editor batch reads them (editing/keys.py)."""
    from rlsedit_cli.editing.keys import LayerKeys

    return LayerKeys(handle, requests, templates, z_layer).read(layer, weights)
