"""Tokenisation shared by scoring and editing: a prompt, then a target continuation."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

PADDING_WASTE = 0.25  # padding a scoring batch may add to its real tokens


def encode_prompt(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt, with the model's special prefix (e.g. Llama's BOS) if it has one."""
    return tok(text, add_special_tokens=True)["input_ids"]


def encode_target(tok: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of ``" " + target`` as it continues a prompt (no special tokens)."""
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def subject_last_index(tok: PreTrainedTokenizerBase, template: str, subject: str) -> int:
    """Index of the subject's last token in ``encode_prompt(template.format(subject))``.

    The prompt is cut right after the subject and tokenised; its length minus one is the index
    (MEMIT's "subject_last" lookup).
    """
    head = template[: template.index("{}")] + subject
    return len(encode_prompt(tok, head)) - 1


def pad(seqs: list[list[int]], pad_id: int, left: bool = False, device=None,
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) input ids and attention mask of token-id lists padded on the right (or left)."""
    if not seqs:
        empty = torch.zeros((0, 0), dtype=torch.long, device=device)
        return empty, empty.clone()
    side = "left" if left else "right"
    rows = [torch.tensor(s, dtype=torch.long) for s in seqs]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side=side)
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0,
                        padding_side=side)
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """(N, T) position ids of left-padded rows: 0 at each row's first token (and its padding)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def little_padding(items: list[int], lengths: list[int], most: int,
                   waste: float = PADDING_WASTE, least: int = 0) -> list[list[int]]:
    """``items`` (sorted by ``lengths``, longest first) in batches of at most ``most``, each
    closed before its padding would pass ``waste`` times its real tokens (128 CounterFact
    prompts from 30 tokens down to 8 are about half padding), unless it holds fewer than
    ``least`` tokens yet (a pass that small costs more in overhead than its padding would)."""
    batches: list[list[int]] = []
    width = real = 0  # the open batch's padded width (its first item's length), real tokens
    for item, length in zip(items, lengths):
        n = len(batches[-1]) if batches else most
        if n < most and ((n + 1) * width <= (1 + waste) * (real + length)
                         or n * width < least):
            batches[-1].append(item)
            real += length
        else:
            batches.append([item])
            width = real = length
    return batches
