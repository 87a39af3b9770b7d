"""Text generation settings shared by the context templates and the fluency texts: ROME's and
MEMIT's top-5 sampling at temperature 1 (or greedy), seeded without touching the caller's
random state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase


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
