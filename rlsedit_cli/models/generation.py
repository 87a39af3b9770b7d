"""Text generation settings shared by the context templates and the fluency texts: ROME's and
MEMIT's top-5 sampling at temperature 1 (or greedy), seeded without touching the caller's
random state; :class:`TopKDraw`, the draw exactly as ROME's generate_fast makes it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import GenerationConfig, LogitsProcessor, PreTrainedTokenizerBase


def fixed_length(tok: PreTrainedTokenizerBase, new_tokens: int,
                 sample: bool = True) -> GenerationConfig:
    """Exactly ``new_tokens`` new tokens, top-5 sampled at temperature 1 (or greedy), whatever
    the checkpoint's generation_config says (an instruct model's temperature or top_p must not
    leak in)."""
    return GenerationConfig(do_sample=sample, top_k=5 if sample else None, top_p=1.0,
                            temperature=1.0, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's generators seeded with ``seed`` inside the block, restored after it."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class TopKDraw(LogitsProcessor):
    """ROME's generate_fast draw (util/generate.py): softmax over the vocabulary, its ``k``
    most likely tokens, one ``torch.multinomial`` draw among their renormalised probabilities.
    Every other token gets -inf, so that greedy decoding emits the draw. The same distribution
    as transformers' top-k sampling, at a fraction of its cost: that one draws over the whole
    vocabulary (an exponential variate per token: 0.1 s per step for 100 texts of SmolLM2).
    """

    def __init__(self, k: int = 5) -> None:
        self.k = k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.float().softmax(-1)  # (B, vocab)
        top = probs.topk(self.k, dim=-1)  # (B, k)
        pick = torch.multinomial(top.values / top.values.sum(-1, keepdim=True), 1)  # (B, 1)
        chosen = top.indices.gather(1, pick)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)
