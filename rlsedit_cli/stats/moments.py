"""Streamed second moments E[k k^T] of edited maps' inputs over a corpus.

One pass serves every edited layer: texts are read a few batches at a time and sorted by length
(so that batches hold little padding), forward pre-hooks on the edited maps collect their inputs
at the non-padding tokens, ``X^T X`` of each batch is added to a float64 sum, and the forward stops
after the highest edited map (the layers above it cannot change its inputs). Memory holds one
batch of activations and one d_in x d_in sum per layer, never the keys of the whole corpus.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch

from rlsedit_cli.accel.attention import grouped_kv_attention
from rlsedit_cli.models.handle import ModelHandle, StopForwardError
from rlsedit_cli.models.tokens import pad

# batches of texts read at once and sorted by length before batching: on SmolLM2's anchor
# paragraphs, 4 left 32% of the positions padding, 32 leaves 7% (docs/benchmarks.md section 6); a
# killed computation resumes from the last whole window
SORT_WINDOW = 32


@dataclass
class MomentState:
    """Running sums (possibly partial, for resuming): sum of k k^T per layer and token counts."""

    sums: dict[int | str, torch.Tensor] = field(default_factory=dict)  # map -> (d_in, d_in) f64
    tokens: int = 0
    samples: int = 0

    def moment(self, layer: int | str) -> torch.Tensor:
        """E[k k^T] = sum / tokens. (d_in, d_in) float64."""
        return self.sums[layer] / max(self.tokens, 1)


def sorted_batches(tok, window: list[str], max_length: int, batch_size: int,
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) batches (b, longest) of one window of texts, sorted by length (little
    padding), each text truncated at ``max_length`` tokens."""
    ids = tok(window, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        yield pad([ids[i] for i in order[start : start + batch_size]], tok.pad_token_id)


@torch.no_grad()
def accumulate(handle: ModelHandle, layers: list[int | str], texts: Iterator[str], num_samples: int,
               max_length: int, batch_size: int, state: MomentState | None = None,
               on_batch: Callable[[MomentState], None] | None = None) -> MomentState:
    """Add the keys of ``num_samples`` texts (after ``state.samples`` already done) to the sums.

    Args:
        texts: the corpus in a fixed order; the first ``state.samples`` texts are skipped.
        on_batch: called after every window of ``SORT_WINDOW`` batches, with every text read so
            far counted (e.g. to save a resumable partial state).
    """
    state = state or MomentState()
    tok, model = handle.tok, handle.model
    acc: dict[int | str, torch.Tensor] = {}
    mask_ref: dict[str, torch.Tensor] = {}

    def hook(layer: int | str):
        def fn(module, args):
            x = args[0]  # (batch, seq, d_in)
            keys = x[mask_ref["mask"].to(x.device)].float()  # (n_tok, d_in)
            gram = (keys.mT @ keys).double()  # (d_in, d_in)
            if layer in acc:
                acc[layer] += gram
            else:
                acc[layer] = gram
            if len(acc) == len(layers):  # every edited map read: the layers above change none
                raise StopForwardError

        return fn

    remaining = num_samples - state.samples
    stream = islice(texts, state.samples, num_samples)
    handles = [handle.edited_module(layer).register_forward_pre_hook(hook(layer))
               for layer in layers]
    try:
        while remaining > 0:
            window = list(islice(stream, min(batch_size * SORT_WINDOW, remaining)))
            if not window:
                break
            for input_ids, mask in sorted_batches(tok, window, max_length, batch_size):
                mask = mask.bool()
                mask_ref["mask"] = mask
                acc.clear()
                with (contextlib.suppress(StopForwardError),
                      grouped_kv_attention(handle)):
                    model(input_ids=input_ids.to(handle.device),
                          attention_mask=mask.long().to(handle.device))
                for layer, gram in acc.items():
                    if layer in state.sums:
                        state.sums[layer] += gram.to(state.sums[layer].device)
                    else:
                        state.sums[layer] = gram
                state.tokens += int(mask_ref["mask"].sum())
            state.samples += len(window)
            remaining -= len(window)
            if on_batch is not None:
                on_batch(state)
    finally:
        for h in handles:
            h.remove()
    return state
