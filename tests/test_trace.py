"""Causal tracing held to its definition (ROME's causal_trace.py) on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlsedit_cli.datasets.toy import load as load_toy
from rlsedit_cli.models.loader import load_model
from rlsedit_cli.models.tokens import encode_prompt
from rlsedit_cli.tune.trace import noise_level, restored_scores, subject_range, trace, window_layers

from .conftest import TINY_BUNDLE, compose_cfg, tiny_overrides


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def handle(request, tiny_models):
    cfg = compose_cfg(tiny_overrides(request.param, tiny_models[request.param]))
    return load_model(cfg.model, torch.device("cpu"))


@pytest.fixture(scope="module")
def record():
    return load_toy(str(TINY_BUNDLE)).records[0]


def test_no_restoration_is_the_corrupted_run_and_restoring_everything_the_clean_one(handle,
                                                                                     record):
    ids = encode_prompt(handle.tok, record.prompt.format(record.subject))
    span = subject_range(handle.tok, record.prompt, record.subject)
    logits = handle.model(input_ids=torch.tensor([ids])).logits[0, -1]
    answer = int(logits.argmax())
    clean = float(torch.softmax(logits, -1)[answer])
    everything = [(t, "hidden", layer) for t in range(len(ids))
                  for layer in range(handle.num_layers)]
    noise = 3.0
    nothing, restored = restored_scores(handle, ids, answer, span, noise, 4, [[], everything])
    assert restored.item() == pytest.approx(clean, rel=1e-5, abs=1e-7)
    # the corrupted run by hand: the same normals on the subject's embeddings, nothing restored
    draw = np.random.RandomState(1).randn(4, span[1] - span[0], handle.model.config.hidden_size)
    embeds = handle.model.get_input_embeddings()(torch.tensor([ids] * 4)).detach().clone()
    embeds[:, span[0]:span[1]] += noise * torch.from_numpy(draw).float()
    with torch.no_grad():
        by_hand = handle.model(inputs_embeds=embeds).logits[:, -1].softmax(-1).mean(0)[answer]
    assert nothing.item() == pytest.approx(float(by_hand), rel=1e-5, abs=1e-7)
    assert abs(nothing.item() - clean) > 1e-4  # the noise did corrupt the answer


def test_the_subject_range_and_the_window(handle, record):
    ids = encode_prompt(handle.tok, record.prompt.format(record.subject))
    start, end = subject_range(handle.tok, record.prompt, record.subject)
    assert handle.tok.decode(ids[start:end]).strip() == record.subject
    assert window_layers(5, 30, 10) == list(range(0, 10))
    assert window_layers(0, 30, 10) == list(range(0, 5))
    assert window_layers(29, 30, 10) == list(range(24, 30))
    assert window_layers(7, 30, 1) == [7]


def test_a_trace_has_a_score_per_layer_between_the_corrupted_and_the_clean_run(handle, record):
    noise = noise_level(handle, [record.subject])
    result = trace(handle, record.prompt, record.subject, noise, kind="mlp", window=2,
                   samples=3)
    assert result.scores.shape == (1, handle.num_layers)
    assert result.tokens == [result.subject[1] - 1]
    full = trace(handle, record.prompt, record.subject, noise, kind="hidden", samples=3,
                 tokens="all")
    assert full.scores.shape == (len(encode_prompt(handle.tok, record.prompt.format(
        record.subject))), handle.num_layers)
    # restoring the block output of the last layer at the last token is the clean answer
    assert float(full.scores[-1, -1]) == pytest.approx(full.high, rel=1e-5, abs=1e-7)


def test_tune_trace_on_the_toy_model_finds_its_edited_layers(tmp_path):
    """The shipped tiny GPT-2's facts sit in its first MLP: the command proposes the layers
    its config edits ([0, 1]) and writes its report; a folder with files is refused."""
    import json

    from rlsedit_cli.cli import main

    out = tmp_path / "trace"
    assert main(["tune", "trace", "--records", "12", "--offset", "0", "--samples", "3",
                 "--window", "1", "--out", str(out)]) == 0
    result = json.loads((out / "trace.json").read_text())
    assert result["traced"] + result["skipped"] == 12 and result["traced"] >= 10
    assert result["peak_layer"] == 0 and result["proposed_layers"] == [0, 1]
    assert {p.name for p in out.iterdir()} == {"trace.json", "trace.csv", "trace.png",
                                               "report.md"}
    assert main(["tune", "trace", "--records", "2", "--out", str(out)]) == 2
    assert main(["tune", "trace", "--records", "0", "--out", str(tmp_path / "b")]) == 2
