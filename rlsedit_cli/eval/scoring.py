"""Batched teacher-forced scoring of a target after a prompt: its mean token NLL, or the share
of its tokens that are the model's top-1 prediction (zsRE's token accuracy)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlsedit_cli.models.tokens import encode_prompt, encode_target, pad
from rlsedit_cli.progress import progress


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
        batch_size: sequences per forward pass (pairs are sorted by length to pad little).

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

    The LM head runs only at the positions read (the prompt's last token and the target's tokens
    but its last), not at every position of every row: the same logits, about a fifth of a
    small model's scoring work saved (SmolLM2's head is 49,152 words wide).
    """
    device = model.get_input_embeddings().weight.device
    body, head = model.base_model, model.get_output_embeddings()
    encoded = [(encode_prompt(tok, p), encode_target(tok, t)) for p, t in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, encoded[i])))
    out = torch.empty(len(pairs))
    starts = range(0, len(order), batch_size)
    for start in progress(starts, desc="scoring prompts", unit="batch", leave=False,
                          disable=len(starts) < 4):
        idx = order[start : start + batch_size]
        seqs = [encoded[i][0] + encoded[i][1] for i in idx]
        ids, mask = pad(seqs, tok.pad_token_id, device=device)
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d_model)
        rows, cols = [], []
        for row, i in enumerate(idx):
            p_len, n_tok = len(encoded[i][0]), len(encoded[i][1])
            rows += [row] * n_tok
            cols += range(p_len - 1, p_len - 1 + n_tok)
        read = hidden[torch.tensor(rows, device=hidden.device),
                      torch.tensor(cols, device=hidden.device)]  # (sum of target lengths, d)
        logits = head(read.to(head.weight.device)).float()
        at = 0
        for i in idx:
            t_ids = encoded[i][1]
            out[i] = score(logits[at : at + len(t_ids)],
                           torch.tensor(t_ids, device=logits.device)).cpu()
            at += len(t_ids)
    return out
