"""Accuracy without teacher forcing: does the model SAY the new target?

The WILD protocol (Yang et al., 2025, "The Mirage of Model Editing"; EasyEdit's
``evaluate_utils.generate_texts`` and ``exact_match_score``): greedy decoding from the prompt
alone, the answer ending at a natural stop (a newline, the end of a sentence, the end-of-text
token), then exact match after SQuAD's normalisation (lower case, punctuation and the articles
a/an/the dropped, white space folded). CounterFact's prompts are sentence prefixes whose
continuation goes on after the object, where WILD's questions end at the answer, so a prompt
counts when its normalised answer STARTS WITH the normalised target_new at a word boundary.
Teacher-forced efficacy compares two targets' probabilities; this asks for the first words.
"""

from __future__ import annotations

import re
import string

import numpy as np
import torch
from transformers import GenerationConfig

from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.models.tokens import encode_prompt, encode_target, pad
from rlsedit_cli.progress import progress

EXTRA_TOKENS = 4  # decoded beyond the target's own length: room for another tokenisation of it
SENTENCE_END = re.compile(r"\n|\.(?=\s|$)")
PUNCTUATION = frozenset(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation, as WILD's exact match applies it."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def says(continuation: str, target: str) -> bool:
    """Whether a greedy continuation, cut at its first natural stop, starts with ``target``."""
    answer = normalize(SENTENCE_END.split(continuation, maxsplit=1)[0])
    wanted = normalize(target)
    return bool(wanted) and (answer == wanted or answer.startswith(wanted + " "))


@torch.no_grad()
def greedy_continuations(handle: ModelHandle, prompts: list[str], new_tokens: list[int],
                         batch_size: int) -> list[str]:
    """Each prompt's greedy continuation of at most ``new_tokens[i]`` tokens, decoded up to the
    end-of-text token (left padding, the KV cache, prompts of similar length together)."""
    tok, model = handle.tok, handle.model
    out_texts = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    starts = range(0, len(order), batch_size)
    for start in progress(starts, desc="greedy answers", unit="batch", leave=False,
                          disable=len(starts) < 2):
        idx = order[start : start + batch_size]
        ids, mask = pad([encode_prompt(tok, prompts[i]) for i in idx], tok.pad_token_id,
                        left=True)  # (B, T)
        config = GenerationConfig(do_sample=False, max_new_tokens=max(new_tokens[i] for i in idx),
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out = model.generate(input_ids=ids.to(handle.device), attention_mask=mask.to(
            handle.device), generation_config=config)  # (B, T + new)
        for row, i in enumerate(idx):
            new = out[row, ids.shape[1]:][: new_tokens[i]]
            out_texts[i] = tok.decode(new, skip_special_tokens=True)
    return out_texts


def said(handle: ModelHandle, pairs: list[tuple[str, str]], batch_size: int) -> np.ndarray:
    """1.0 for each (prompt, target) pair whose greedy continuation starts with the target,
    else 0.0. (n,) float64."""
    if not pairs:
        return np.zeros(0)
    lengths = [len(encode_target(handle.tok, t)) + EXTRA_TOKENS for _, t in pairs]
    continuations = greedy_continuations(handle, [p for p, _ in pairs], lengths, batch_size)
    return np.array([says(c, t) for c, (_, t) in zip(continuations, pairs)], dtype=np.float64)
