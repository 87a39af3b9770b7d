"""Causal tracing as ROME defines it (kmeng01/rome, experiments/causal_trace.py): where in the
network a model's answer to a fact prompt is carried.

One trace runs ``samples + 1`` copies of a prompt in one batch: row 0 clean, rows 1.. with
Gaussian noise added to the subject tokens' input embeddings (``noise`` times numpy's
``RandomState(1)`` normals, as the reference draws them). The score is the answer token's
probability after the prompt, averaged over the corrupted rows; a restoration copies row 0's
value of chosen states (a block's output or its MLP's, at chosen tokens) into
the corrupted rows as the pass goes. The answer is the clean model's own top prediction; a
prompt whose prediction is not the expected answer is marked, and the reference leaves such
facts out of its averages. ROME's noise rule "s3": 3 x the standard deviation of the subject
tokens' embeddings (:func:`noise_level`). ROME's MLP trace restores a window of 10 layers
centred on each layer (``window``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlsedit_cli.datasets.records import fill
from rlsedit_cli.models.handle import ModelHandle, block_hidden
from rlsedit_cli.models.tokens import encode_prompt

KINDS = ("hidden", "mlp")  # a block's output, its MLP's output


@dataclass
class Trace:
    """One prompt's trace: ``scores[t, L]`` the answer's probability with the states of layer L
    (or the window around it) restored at token t, ``tokens`` the traced tokens' indices."""

    scores: torch.Tensor  # (len(tokens), num_layers)
    tokens: list[int]
    low: float  # corrupted, nothing restored
    high: float  # clean
    answer: int  # token id
    correct: bool  # the clean prediction is the expected answer (or none was expected)
    subject: tuple[int, int]  # the subject's token range [start, end)


def subject_range(tok, template: str, subject: str) -> tuple[int, int]:
    """[start, end) of the subject's tokens in ``encode_prompt(fill(template, subject))``."""
    cut = template.index("{}")
    start = len(encode_prompt(tok, template[:cut])) if cut else len(encode_prompt(tok, ""))
    end = len(encode_prompt(tok, template[:cut] + subject))
    return start, end


@torch.no_grad()
def noise_level(handle: ModelHandle, subjects: list[str], factor: float = 3.0) -> float:
    """ROME's "s{factor}" rule: factor x the std of every subject token's input embedding
    (collect_embedding_std: each subject encoded alone, special prefix included)."""
    embed = handle.model.get_input_embeddings()
    rows = [embed(torch.tensor(encode_prompt(handle.tok, s), device=handle.device))
            for s in subjects]
    return factor * float(torch.cat(rows).float().std())


def _module(handle: ModelHandle, kind: str, layer: int) -> torch.nn.Module:
    return handle.layer_module(layer) if kind == "hidden" else handle.mlp_module(layer)


@torch.no_grad()
def restored_scores(handle: ModelHandle, ids: list[int], answer: int, span: tuple[int, int],
                    noise: float, samples: int,
                    restorations: list[list[tuple[int, str, int]]]) -> torch.Tensor:
    """The answer's mean probability over the corrupted rows, once per restoration (a list of
    (token, kind, layer) states restored together; [] restores nothing). (len(restorations),)"""
    b, e = span
    rs = np.random.RandomState(1)  # the reference's draw, the same for every restoration
    draw = torch.from_numpy(rs.randn(samples, e - b, handle.model.config.hidden_size))
    inputs = torch.tensor([ids] * (samples + 1), device=handle.device)
    embed = handle.model.get_input_embeddings()
    out = []
    for states in restorations:
        def corrupt(module, args, output):
            output[1:, b:e] += (noise * draw).to(output)
            return output

        def restore(tokens):
            def hook(module, args, output):
                h = block_hidden(output)
                for t in tokens:
                    h[1:, t] = h[0, t]
                return output
            return hook

        by_module: dict[torch.nn.Module, list[int]] = {}
        for token, kind, layer in states:
            by_module.setdefault(_module(handle, kind, layer), []).append(token)
        hooks = [embed.register_forward_hook(corrupt)]
        hooks += [m.register_forward_hook(restore(ts)) for m, ts in by_module.items()]
        try:
            logits = handle.model(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                  use_cache=False).logits  # (S+1, T, vocab)
        finally:
            for h in hooks:
                h.remove()
        out.append(torch.softmax(logits[1:, -1].float(), -1).mean(0)[answer])
    return torch.stack(out).cpu()


def window_layers(layer: int, num_layers: int, window: int) -> list[int]:
    """The layers ROME restores around ``layer``: [layer - window // 2, layer + ceil(window/2))
    within the model (window 1: the layer alone)."""
    return list(range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2))))


@torch.no_grad()
def trace(handle: ModelHandle, template: str, subject: str, noise: float, kind: str = "mlp",
          window: int = 10, samples: int = 10, tokens: str = "subject_last",
          expect: int | None = None) -> Trace:
    """Trace one prompt (ROME's calculate_hidden_flow). ``tokens``: "subject_last" (the
    subject's last token only) or "all"; ``kind``: which states a restoration copies (window 1
    for "hidden", as the reference); ``expect``: the token id the clean answer should be."""
    if kind not in KINDS:
        raise ValueError(f"unknown trace kind {kind!r}: use one of {', '.join(KINDS)}")
    ids = encode_prompt(handle.tok, fill(template, subject))
    span = subject_range(handle.tok, template, subject)
    one = torch.tensor([ids], device=handle.device)
    logits = handle.model(input_ids=one, attention_mask=torch.ones_like(one)).logits
    probs = torch.softmax(logits[0, -1].float(), -1)
    answer = int(probs.argmax())
    traced = [span[1] - 1] if tokens == "subject_last" else list(range(len(ids)))
    n = handle.num_layers
    if expect is not None and answer != expect:  # not a known fact: the reference skips it
        return Trace(scores=torch.empty(0, n), tokens=traced, low=float("nan"),
                     high=float(probs[answer]), answer=answer, correct=False, subject=span)
    width = 1 if kind == "hidden" else window
    plans = [[]] + [[(t, kind, x) for x in window_layers(layer, n, width)]
                    for t in traced for layer in range(n)]
    scores = restored_scores(handle, ids, answer, span, noise, samples, plans)
    return Trace(scores=scores[1:].view(len(traced), n), tokens=traced, low=float(scores[0]),
                 high=float(probs[answer]), answer=answer,
                 correct=expect is None or answer == expect, subject=span)
