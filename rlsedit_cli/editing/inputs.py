"""Model inputs for a batch of edit requests, and forward passes that stop at a layer.

:class:`Rows` are left-padded so that every row ends at the same position, with position ids
from the attention mask so padding changes nothing. Each row knows its request (``owner``) and
the position of the subject's last token (``lookup``). The rows cut at that token for the
target step's prefix caches are accel/prefix.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlsedit_cli.accel.attention import grouped_kv_attention
from rlsedit_cli.datasets.records import fill
from rlsedit_cli.models.handle import ModelHandle, StopForwardError
from rlsedit_cli.models.tokens import encode_prompt, pad, positions, subject_last_index

Item = tuple[str, str, list[int], int]  # (template with "{}", subject, ids after the prompt, owner)


@dataclass
class Rows:
    """A padded batch of prompts. ``ids``/``mask``/``pos``: (N, T); ``lookup``/``owner``: (N,)."""

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    lookup: torch.Tensor
    owner: torch.Tensor

    @property
    def inputs(self) -> dict:
        return {"input_ids": self.ids, "attention_mask": self.mask, "position_ids": self.pos}


def encode_items(handle: ModelHandle, items: list[Item]) -> tuple[list[list[int]], list[int]]:
    """Token ids of every item and the index of its subject's last token."""
    tok = handle.tok
    seqs = [encode_prompt(tok, fill(t, s)) + list(extra) for t, s, extra, _ in items]
    lookups = [subject_last_index(tok, t, s) for t, s, _, _ in items]
    return seqs, lookups


def build_rows(handle: ModelHandle, items: list[Item]) -> Rows:
    """Left-padded rows for ``items``."""
    seqs, lookups = encode_items(handle, items)
    ids, mask = pad(seqs, handle.tok.pad_token_id, left=True)
    width = ids.shape[1]
    lengths = torch.tensor([len(s) for s in seqs])
    dev = handle.device
    return Rows(ids=ids.to(dev), mask=mask.to(dev), pos=positions(mask).to(dev),
                lookup=(width - lengths + torch.tensor(lookups)).to(dev),
                owner=torch.tensor([it[3] for it in items]).to(dev))


def forward_until(handle: ModelHandle, inputs: dict, stop_layer: int,
                  hooks: list[tuple[torch.nn.Module, str, Callable]]) -> None:
    """Run the model on ``inputs`` with the given hooks, stopping after block ``stop_layer``
    (grouped key/value heads as they are where ``gqa_passthrough`` runs).

    Args:
        inputs: keyword arguments of the model's forward (``Rows.inputs`` and the like).
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
        with grouped_kv_attention(handle):
            handle.model(**{"use_cache": False, **inputs})
    except StopForwardError:
        pass
    finally:
        for h in handles:
            h.remove()
