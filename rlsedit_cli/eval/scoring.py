"""Batched teacher-forced scoring of a target after a prompt: its mean token NLL, or the share
of its tokens that are the model's top-1 prediction (zsRE's token accuracy)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlsedit_cli.accel.prefix import read_states
from rlsedit_cli.models.tokens import (
    encode_prompt,
    encode_target,
    little_padding,
    pad,
    positions,
)
from rlsedit_cli.progress import progress


@torch.no_grad()
def completion_nll(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    batch_size: int = 64,
    shared: bool = True,
) -> torch.Tensor:
    """Mean negative log-likelihood per token of ``" " + target`` after ``prompt``.

    Args:
        pairs: (prompt, target) pairs.
        batch_size: distinct prompts per forward pass (sorted by length, batches cut where
            padding would grow: :func:`little_padding`).
        shared: whether a prompt that several pairs share runs once (``shared_prompts``).

    Returns:
        (n,) float32 tensor on the CPU, in the order of ``pairs``.
    """
    return _score(model, tok, pairs, batch_size, shared,
                  lambda logits, target: -logits.log_softmax(-1)[
                      torch.arange(len(target), device=target.device), target].mean())


@torch.no_grad()
def completion_top1(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                    pairs: list[tuple[str, str]], batch_size: int = 64,
                    shared: bool = True) -> torch.Tensor:
    """Share of the tokens of ``" " + target`` that are the model's top-1 prediction after
    ``prompt`` and the target's earlier tokens (memit/eval_utils_zsre.py). (n,) float32."""
    return _score(model, tok, pairs, batch_size, shared,
                  lambda logits, target: (logits.argmax(-1) == target).float().mean())


def _score(model, tok, pairs: list[tuple[str, str]], batch_size: int, shared: bool,
           score) -> torch.Tensor:
    """``score(logits (T, vocab), target ids (T,))`` of each pair's target positions.

    Pairs that share a prompt (a record's target_new and target_true) run it once: the prompts
    of a batch, left-padded (position ids from the mask), into a key/value cache; then every
    pair's target tokens but its last after its prompt, right-padded (none at all when every
    target is one token: the prompt's last position predicts it). The LM head runs only at the
    positions read. The same logits as each pair run whole (ROME's test_batch_prediction) within
    float rounding (tests/test_measurement.py), at less than half the tokens on CounterFact.
    Without ``shared``, each pair runs whole (:func:`whole_states`).
    """
    device = model.get_input_embeddings().weight.device
    body, head = model.base_model, model.get_output_embeddings()
    index: dict[str, int] = {}  # prompt -> its row among the distinct prompts
    for prompt, _ in pairs:
        index.setdefault(prompt, len(index))
    prompt_ids = [encode_prompt(tok, p) for p in index]
    target_ids = [encode_target(tok, t) for _, t in pairs]
    of_prompt: list[list[int]] = [[] for _ in index]  # the pairs of each distinct prompt
    for k, (prompt, _) in enumerate(pairs):
        of_prompt[index[prompt]].append(k)
    order = sorted(range(len(index)), key=lambda u: -len(prompt_ids[u]))
    out = torch.empty(len(pairs))
    groups = little_padding(order, [len(prompt_ids[u]) for u in order], batch_size)
    for batch in progress(groups, desc="scoring prompts", unit="batch", leave=False,
                          disable=len(groups) < 4):
        ks = [k for u in batch for k in of_prompt[u]]  # this batch's pairs
        rows = torch.tensor([b for b, u in enumerate(batch) for _ in of_prompt[u]])  # (n,)
        states = read_states if shared else whole_states
        read = states(body, tok, [prompt_ids[u] for u in batch], [target_ids[k] for k in ks],
                      rows, device)
        logits = head(read.to(head.weight.device)).float()  # (sum of target lengths, vocab)
        at = 0
        for k in ks:
            t_ids = target_ids[k]
            out[k] = score(logits[at : at + len(t_ids)],
                           torch.tensor(t_ids, device=logits.device)).cpu()
            at += len(t_ids)
    return out


def whole_states(body, tok, prompts: list[list[int]], targets: list[list[int]],
                 rows: torch.Tensor, device) -> torch.Tensor:
    """What :func:`rlsedit_cli.accel.prefix.read_states` returns, each pair run whole: prompt and
    target but its last token, left-padded, one pass (the plain path of ``shared_prompts``)."""
    seqs = [prompts[int(r)] + t[:-1] for r, t in zip(rows, targets)]
    ids, mask = pad(seqs, tok.pad_token_id, left=True, device=device)  # (n, T)
    hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                  use_cache=False).last_hidden_state  # (n, T, d_model)
    width = ids.shape[1]  # every row ends at column T - 1, predicting its target's last token
    return torch.cat([hidden[j, width - len(t):] for j, t in enumerate(targets)])
