"""Model inputs for a batch of edit requests, and forward passes that stop at a layer.

Rows are left-padded so that every row ends at the same position (targets and the KL token sit
at the end), with position ids from the attention mask so padding changes nothing. Each row
knows its request (``owner``) and the position of the subject's last token (``lookup``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlsedit_cli.models.handle import ModelHandle, StopForwardError
from rlsedit_cli.models.tokens import encode_prompt, subject_last_index


@dataclass
class Rows:
    """A padded batch of prompts. ``ids``/``mask``/``pos``: (N, T); ``lookup``/``owner``: (N,)."""

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    lookup: torch.Tensor
    owner: torch.Tensor
    lengths: torch.Tensor  # (N,) unpadded lengths


def build_rows(handle: ModelHandle, items: list[tuple[str, str, list[int], int]]) -> Rows:
    """Rows for (template with "{}", subject, ids appended after the prompt, owner) items."""
    tok = handle.tok
    seqs, lookups, owners = [], [], []
    for template, subject, extra, owner in items:
        seqs.append(encode_prompt(tok, template.format(subject)) + list(extra))
        lookups.append(subject_last_index(tok, template, subject))
        owners.append(owner)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    lengths = torch.tensor([len(s) for s in seqs])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    dev = handle.device
    return Rows(ids=ids.to(dev), mask=mask.to(dev), pos=pos.to(dev),
                lookup=(width - lengths + torch.tensor(lookups)).to(dev),
                owner=torch.tensor(owners).to(dev), lengths=lengths.to(dev))


def block_hidden(output) -> torch.Tensor:
    """The hidden states of a block's output (a tensor, or a tuple starting with one)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: torch.Tensor):
    """A block's output with its hidden states replaced."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def forward_until(handle: ModelHandle, rows: Rows, stop_layer: int,
                  hooks: list[tuple[torch.nn.Module, str, Callable]]) -> None:
    """Run the model on ``rows`` with the given hooks, stopping after block ``stop_layer``.

    Args:
        hooks: (module, "pre" | "post", fn) triples; fns follow torch's hook signatures.
    """
    handles = []
    for module, kind, fn in hooks:
        register = (module.register_forward_pre_hook if kind == "pre"
                    else module.register_forward_hook)
        handles.append(register(fn))

    def stop(module, args, output):
        raise StopForwardError

    handles.append(handle.layer_module(stop_layer).register_forward_hook(stop))
    try:
        handle.model(input_ids=rows.ids, attention_mask=rows.mask, position_ids=rows.pos,
                     use_cache=False)
    except StopForwardError:
        pass
    finally:
        for h in handles:
            h.remove()
