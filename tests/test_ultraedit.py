"""UltraEdit: equal to a plain transcription of its reference code, resumable, on the toy."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers.pytorch_utils import Conv1D

from rlsedit_cli.datasets.toy import load as load_toy
from rlsedit_cli.editors.ultraedit import UltraEdit
from rlsedit_cli.errors import ConfigError
from rlsedit_cli.models.loader import load_model
from rlsedit_cli.ops.ultraedit import Normaliser, normaliser_update
from rlsedit_cli.runner import checkpoint
from rlsedit_cli.runner.run import run
from rlsedit_cli.validate import check

from .conftest import TINY_BUNDLE, compose_cfg, tiny_overrides
from .test_resume import cli, finish, wait_for_lines

MAPS = {"gpt2": {"up": [0], "down": [1]},  # Conv1D maps of two shapes
        "llama": {"gate": [0, 1], "up": [1], "down": [0]}}  # gate and up share a shape
LR, PASS = 1e-2, 3


@pytest.fixture(scope="module")
def toy_records():
    return load_toy(str(TINY_BUNDLE)).records


class RunningStats(nn.Module):
    """The reference's normaliser, written as its nets.py computes (buffers updated in place)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        for name in ("n", "mean", "var", "std"):
            self.register_buffer(name, torch.zeros(1 if name == "n" else size))

    def update(self, x):
        n = self.n + x.shape[0]
        delta = x.mean(0) - self.mean
        self.mean += x.shape[0] * delta / n
        self.var += x.shape[0] * x.var(0) + self.n * x.shape[0] * delta.pow(2) / n
        self.std = (self.var / (n - 1 + torch.finfo(x.dtype).eps)).sqrt()
        self.n = n

    def forward(self, x):
        return (x - self.mean) / (self.std + torch.finfo(x.dtype).eps)


class Tracer:
    """The reference's util.Tracer: a map's inputs and output gradients at the answer
    positions, from a forward hook and a full backward hook."""

    def __init__(self, module, where) -> None:
        def forward(mod, inputs, output):
            self.keys = inputs[0][where].detach()

        def backward(mod, grad_in, grad_out):
            self.grads = grad_out[0][where].detach()

        self.handles = [module.register_forward_hook(forward),
                        module.register_full_backward_hook(backward)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def reference_batch(model, tok, names, stats, records, lr, pass_size, chunk=128):
    """One batch as the reference edits it: tok_tuples, collate_fn's sort and split, the
    Tracer's hooks and backward, then predict_param_shifts (rows in padded chunks of 128) and
    edit_model."""
    rows = []
    for r in records:
        prompt = tok(r.rewrite_prompt, return_tensors="pt")
        answer = tok(" " + r.target_new, return_tensors="pt", add_special_tokens=False)
        rows.append({"input_ids": torch.cat((prompt["input_ids"], answer["input_ids"][:, :-1]), -1),
                     "attention_mask": torch.cat((prompt["attention_mask"],
                                                  answer["attention_mask"][:, :-1]), -1),
                     "labels": torch.cat((torch.full(prompt["input_ids"].shape, -100)[:, 1:],
                                          answer["input_ids"]), -1)})
    rows = sorted(rows, key=lambda x: x["attention_mask"].sum().item(), reverse=True)
    modules = {name: model.get_submodule(name) for name in names}
    shape = {name: tuple(m.weight.shape)[::-1] if isinstance(m, nn.Linear)
             else tuple(m.weight.shape) for name, m in modules.items()}
    for m in modules.values():
        m.weight.requires_grad_(True)
    keys = {name: [] for name in names}
    grads = {name: [] for name in names}
    for start in range(0, len(rows), pass_size):
        part = rows[start:start + pass_size]
        t = {k: pad_sequence([p[k].squeeze(0) for p in part], batch_first=True,
                             padding_value=-100 if k == "labels" else 0) for k in part[0]}
        where = torch.where(t["labels"] != -100)
        tracers = {name: Tracer(m, where) for name, m in modules.items()}
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"])["logits"]
        nn.functional.cross_entropy(logits[where], t["labels"][where]).backward()
        for name in names:
            tracers[name].remove()
            k, g = tracers[name].keys.float(), tracers[name].grads.float()
            stats[str(shape[name])].update(torch.cat((k, g), -1))
            keys[name].append(k)
            grads[name].append(g)
    for m in modules.values():
        m.weight.requires_grad_(False)
        m.weight.grad = None
    shifts = {}
    for name in names:
        d_in, d_out = shape[name]
        K, G = torch.cat(keys[name]), torch.cat(grads[name])
        values = torch.empty((0, d_out))
        for start in range(0, K.shape[0], chunk):
            k = K[start:start + chunk]
            g = G[start:start + chunk]
            z = torch.cat((torch.cat((k, torch.zeros(chunk - len(k), d_in))),
                           torch.cat((g, torch.zeros(chunk - len(g), d_out)))), -1)
            with torch.no_grad():
                k_hat, g_hat = stats[str(shape[name])](z).split([d_in, d_out], -1)
                coeffs = -lr * (k_hat * k_hat).sum(-1).unsqueeze(-1)
            values = torch.cat((values, coeffs * g_hat))
        values = values[: K.shape[0]]
        shifts[name] = torch.linalg.solve(K.T @ K + torch.eye(d_in), K.T @ values)
    with torch.no_grad():
        for name, shift in shifts.items():
            m = modules[name]
            m.weight.data += (shift.T if isinstance(m, nn.Linear) else shift)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("arch", list(MAPS))
def test_update_equals_the_reference_code_over_several_batches(arch, tiny_models, toy_records):
    cfg = compose_cfg(tiny_overrides(arch, tiny_models[arch]))
    ours, theirs = (load_model(cfg.model, torch.device("cpu")) for _ in range(2))
    editor = UltraEdit(ours, **MAPS[arch], lr=LR, pass_size=PASS)
    names = editor.edited_layers
    assert any(isinstance(theirs.model.get_submodule(n), (Conv1D, nn.Linear)) for n in names)
    stats = nn.ModuleDict()
    for name in names:
        m = theirs.model.get_submodule(name)
        shape = tuple(m.weight.shape)[::-1] if isinstance(m, nn.Linear) else tuple(m.weight.shape)
        if str(shape) not in stats:
            stats[str(shape)] = RunningStats(sum(shape))
    before = {n: ours.weight(n).clone() for n in names}
    for i in range(3):
        batch = toy_records[8 * i : 8 * i + 8]
        editor.edit(batch)
        reference_batch(theirs.model, theirs.tok, names, stats, batch, LR, PASS)
    for name in names:
        W, W_ref = ours.weight(name), theirs.weight(name)
        assert not torch.equal(W, before[name])
        assert torch.allclose(W, W_ref, rtol=1e-5, atol=1e-6), name
    assert len(editor.normalisers) == len(stats)
    for state, ref in zip(editor.normalisers.values(), stats.values()):
        assert torch.equal(state.n, ref.n)
        assert torch.allclose(state.mean, ref.mean, rtol=1e-5, atol=1e-7)
        assert torch.allclose(state.var, ref.var, rtol=1e-5)


def test_one_row_adds_count_and_mean_but_no_spread():
    """The reference's unbiased variance of a single row is NaN; it adds no spread here."""
    state = normaliser_update(Normaliser.empty(3), torch.tensor([[1.0, 2.0, 3.0],
                                                                 [3.0, 2.0, 1.0]]))
    after = normaliser_update(state, torch.tensor([[2.0, 2.0, 2.0]]))
    assert after.n.item() == 3 and torch.isfinite(after.var).all()
    assert torch.allclose(after.mean, torch.tensor([2.0, 2.0, 2.0]))
    assert torch.allclose(after.var, state.var)  # the new row sits on the mean


def test_bad_settings_are_one_line(tiny_models):
    handle = load_model(compose_cfg(tiny_overrides("gpt2", tiny_models["gpt2"])).model,
                        torch.device("cpu"))
    for kwargs, said in (({"gate": [0]}, "has no MLP map 'gate'"),
                         ({"up": [7]}, "out of range"),
                         ({"down": []}, "are all empty"),
                         ({"up": [0, 0]}, r"editor.up=\[0, 0\] names a layer twice")):
        with pytest.raises(ConfigError, match=said):
            UltraEdit(handle, **({"lr": 1e-3, "pass_size": 2} | kwargs))
    for override, said in (("editor.lr=0", "editor.lr=0.0 must be above 0"),
                           ("editor.lr=inf", "editor.lr=inf must be a finite number"),
                           ("editor.pass_size=0", "editor.pass_size=0 must be at least 1")):
        with pytest.raises(ConfigError, match=said):
            check(compose_cfg(["editor=ultraedit", override]))


TOY = ["editor=ultraedit", "logger=none", "eval=none", "measure.fluency=false",
       "stream.num_edits=60", "stream.batch_size=5", "measure.retention_edits=5",
       "checkpoint.every=1"]


def test_toy_stream_edits_and_a_killed_run_resumes_its_statistics(tmp_path):
    whole = tmp_path / "whole"
    finish(cli(*TOY, f"hydra.run.dir={whole}", f"paths.cache={tmp_path}/cache"))
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["efficacy"] > summary["pre"]["efficacy"] + 20
    folder = tmp_path / "run"
    proc = cli(*TOY, f"hydra.run.dir={folder}", f"paths.cache={tmp_path}/cache")
    wait_for_lines(proc, folder / "metrics.jsonl", 3)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finish(cli(f"resume={folder}", f"paths.cache={tmp_path}/cache", "logger=none"))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in rows] == list(range(12))
    done, ref = checkpoint.load(folder), checkpoint.load(whole)
    for shape, state in ref["editor"]["normalisers"].items():
        for key, value in state.items():
            assert torch.allclose(done["editor"]["normalisers"][shape][key], value, rtol=1e-6)
    for key, weight in ref["weights"].items():
        assert torch.allclose(done["weights"][key], weight, rtol=1e-5, atol=1e-7), key


def test_a_run_in_process_writes_its_maps_terms_and_export(make_cfg, tmp_path):
    """Up and down maps: the four Figure-2 terms of each (C of each map's own inputs), the maps
    in the checkpoint under their module names, and the export."""
    cfg = make_cfg("editor=ultraedit", "editor.up=[0]", "editor.down=[1]", "eval=none",
                   "measure.fluency=false", "stream.num_edits=20", "stream.batch_size=10",
                   "checkpoint.every=1")
    summary = run(cfg)
    folder = tmp_path / "run"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for label in ("up0", "layer1"):
        for term in ("fit", "drift", "preservation", "norm"):
            assert rows[-1][f"{label}/{term}"] >= 0, (label, term)
        assert rows[-1][f"{label}/drift"] > 0
    assert summary["num_edits"] == 20
    assert set(checkpoint.load(folder)["weights"]) == {"transformer.h.0.mlp.c_fc",
                                                       "transformer.h.1.mlp.c_proj"}
    from safetensors import safe_open

    from rlsedit_cli.runner.export import export_run

    written = export_run(folder, tmp_path / "export")
    with safe_open(written["maps"], framework="pt") as f:
        assert set(f.keys()) == {"transformer.h.0.mlp.c_fc.weight",  # noqa: SIM118
                                 "transformer.h.1.mlp.c_proj.weight"}
