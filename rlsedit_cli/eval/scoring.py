"""Batched teacher-forced scoring of a target after a prompt: its mean token NLL, or the share
of its tokens that are the model's top-1 prediction (zsRE's token accuracy)."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from rlsedit_cli.models.tokens import encode_prompt, encode_target, pad, positions
from rlsedit_cli.progress import progress

PADDING_WASTE = 0.25  # padding a scoring batch may add to its real tokens


@torch.no_grad()
def completion_nll(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    batch_size: int = 64,
) -> torch.Tensor:
    """Mean negative log-likelihood per token of ``" " + target`` after ``prompt``.

    Args:
        pairs: (prompt, target) pairs.
        batch_size: distinct prompts per forward pass (sorted by length, batches cut where
            padding would grow: :func:`little_padding`).

    Returns:
        (n,) float32 tensor on the CPU, in the order of ``pairs``.
    """
    return _score(model, tok, pairs, batch_size,
                  lambda logits, target: -logits.log_softmax(-1)[
                      torch.arange(len(target), device=target.device), target].mean())


@torch.no_grad()
def completion_top1(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                    pairs: list[tuple[str, str]], batch_size: int = 64) -> torch.Tensor:
    """Share of the tokens of ``" " + target`` that are the model's top-1 prediction after
    ``prompt`` and the target's earlier tokens (memit/eval_utils_zsre.py). (n,) float32."""
    return _score(model, tok, pairs, batch_size,
                  lambda logits, target: (logits.argmax(-1) == target).float().mean())


def _score(model, tok, pairs: list[tuple[str, str]], batch_size: int, score) -> torch.Tensor:
    """``score(logits (T, vocab), target ids (T,))`` of each pair's target positions.

    Pairs that share a prompt (a record's target_new and target_true) run it once: the prompts
    of a batch, left-padded (position ids from the mask), into a key/value cache; then every
    pair's target tokens but its last after its prompt, right-padded (none at all when every
    target is one token: the prompt's last position predicts it). The LM head runs only at the
    positions read. The same logits as each pair run whole (ROME's test_batch_prediction) within
    float rounding (tests/test_measurement.py), at less than half the tokens on CounterFact.
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
        read = read_states(body, tok, [prompt_ids[u] for u in batch],
                            [target_ids[k] for k in ks], rows, device)
        logits = head(read.to(head.weight.device)).float()  # (sum of target lengths, vocab)
        at = 0
        for k in ks:
            t_ids = target_ids[k]
            out[k] = score(logits[at : at + len(t_ids)],
                           torch.tensor(t_ids, device=logits.device)).cpu()
            at += len(t_ids)
    return out


def little_padding(items: list[int], lengths: list[int], most: int,
                   waste: float = PADDING_WASTE) -> list[list[int]]:
    """``items`` (sorted by ``lengths``, longest first) in batches of at most ``most``, each
    closed before its padding would pass ``waste`` times its real tokens (128 CounterFact
    prompts from 30 tokens down to 8 are about half padding)."""
    batches: list[list[int]] = []
    width = real = 0  # the open batch's padded width (its first item's length), real tokens
    for item, length in zip(items, lengths):
        n = len(batches[-1]) if batches else most
        if n < most and (n + 1) * width <= (1 + waste) * (real + length):
            batches[-1].append(item)
            real += length
        else:
            batches.append([item])
            width = real = length
    return batches


def read_states(body, tok, prompts: list[list[int]], targets: list[list[int]],
                 rows: torch.Tensor, device) -> torch.Tensor:
    """The hidden states that predict each target's tokens after its prompt (``rows[j]``: the
    prompt of target j), target after target: (sum of target lengths, d_model)."""
    ids, mask = pad(prompts, tok.pad_token_id, left=True, device=device)  # (B, P)
    pos = positions(mask)  # (B, P): padding changes nothing
    cache = DynamicCache(config=body.config)
    hidden = body(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                  use_cache=True).last_hidden_state  # (B, P, d_model)
    last = hidden[rows.to(device), -1]  # (n, d_model): predicts each target's first token
    longer = [j for j, t in enumerate(targets) if len(t) > 1]
    if not longer:
        return last
    pick = rows[longer].to(device)  # (m,)
    cache.batch_select_indices(pick)
    s_ids, s_mask = pad([targets[j][:-1] for j in longer], tok.pad_token_id, device=device)
    s_pos = (pos[pick, -1:] + 1 + torch.arange(s_ids.shape[1], device=device)) * s_mask  # (m, S)
    # (padding at position 0: a long prompt's padded slots stay inside the position table)
    after = body(input_ids=s_ids, attention_mask=torch.cat([mask[pick], s_mask], 1),
                 position_ids=s_pos, past_key_values=cache,
                 use_cache=True).last_hidden_state  # (m, S, d_model)
    slot = {j: i for i, j in enumerate(longer)}
    parts = [last[j : j + 1] if j not in slot else
             torch.cat([last[j : j + 1], after[slot[j], : len(t) - 1]]) for j, t in
             enumerate(targets)]
    return torch.cat(parts)
