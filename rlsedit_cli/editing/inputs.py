"""Model inputs for a batch of edit requests, and forward passes that stop at a layer.

:class:`Rows` are left-padded so that every row ends at the same position, with position ids
from the attention mask so padding changes nothing. Each row knows its request (``owner``) and
the position of the subject's last token (``lookup``).

:class:`SplitRows` cut each row at the subject's last token: an edit at that token changes
nothing before it (causal attention), so the prefix runs once into a key/value cache and the
target optimisation re-runs only the suffix (see :func:`prefix_cache`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from rlsedit_cli.datasets.records import fill
from rlsedit_cli.models.handle import ModelHandle, StopForwardError, grouped_kv_attention
from rlsedit_cli.models.tokens import encode_prompt, pad, subject_last_index

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


def _encode(handle: ModelHandle, items: list[Item]) -> tuple[list[list[int]], list[int]]:
    """Token ids of every item and the index of its subject's last token."""
    tok = handle.tok
    seqs = [encode_prompt(tok, fill(t, s)) + list(extra) for t, s, extra, _ in items]
    lookups = [subject_last_index(tok, t, s) for t, s, _, _ in items]
    return seqs, lookups


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """(N, T) position ids of left-padded rows: 0 at each row's first token (and its padding)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def build_rows(handle: ModelHandle, items: list[Item]) -> Rows:
    """Left-padded rows for ``items``."""
    seqs, lookups = _encode(handle, items)
    ids, mask = pad(seqs, handle.tok.pad_token_id, left=True)
    width = ids.shape[1]
    lengths = torch.tensor([len(s) for s in seqs])
    dev = handle.device
    return Rows(ids=ids.to(dev), mask=mask.to(dev), pos=_positions(mask).to(dev),
                lookup=(width - lengths + torch.tensor(lookups)).to(dev),
                owner=torch.tensor([it[3] for it in items]).to(dev))


@dataclass
class SplitRows:
    """Rows cut at the subject's last token.

    The prefix (tokens before it) is left-padded to P columns; the suffix (from it on) is
    right-padded to S columns, so the subject's last token sits in suffix column 0 of every row.
    ``prefix_*``: (N, P); ``suffix_*``: (N, S); ``mask``: (N, P + S);
    ``suffix_len``, ``owner``: (N,)
    """

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    prefix_pos: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_pos: torch.Tensor
    mask: torch.Tensor
    suffix_len: torch.Tensor
    owner: torch.Tensor

    @property
    def prefix_inputs(self) -> dict:
        return {"input_ids": self.prefix_ids, "attention_mask": self.prefix_mask,
                "position_ids": self.prefix_pos}

    @property
    def suffix_mask(self) -> torch.Tensor:
        """(N, S): 1 on the suffix's tokens, 0 on its (right) padding."""
        return self.mask[:, self.prefix_ids.shape[1]:]

    def select(self, rows: torch.Tensor, requests: torch.Tensor) -> SplitRows:
        """Only ``rows`` (their requests, ``requests``, sorted, become 0..m-1)."""
        picked = {f: getattr(self, f)[rows.to(getattr(self, f).device)]
                  for f in self.__dataclass_fields__}
        picked["owner"] = torch.searchsorted(requests.to(self.owner.device), picked["owner"])
        return SplitRows(**picked)

    def suffix_inputs(self, cache: DynamicCache | None) -> dict:
        """Inputs of the suffix after a prefix whose keys and values are in ``cache``."""
        return {"input_ids": self.suffix_ids, "attention_mask": self.mask,
                "position_ids": self.suffix_pos, "past_key_values": cache,
                "use_cache": cache is not None}


def build_split_rows(handle: ModelHandle, items: list[Item]) -> SplitRows:
    """:class:`SplitRows` for ``items``."""
    seqs, lookups = _encode(handle, items)
    pad_id = handle.tok.pad_token_id
    prefix_ids, prefix_mask = pad([s[:k] for s, k in zip(seqs, lookups)], pad_id, left=True)
    suffix_ids, suffix_mask = pad([s[k:] for s, k in zip(seqs, lookups)], pad_id)
    lookup = torch.tensor(lookups)
    suffix_pos = lookup[:, None] + torch.arange(suffix_ids.shape[1])[None, :]
    dev = handle.device
    return SplitRows(prefix_ids=prefix_ids.to(dev), prefix_mask=prefix_mask.to(dev),
                     prefix_pos=_positions(prefix_mask).to(dev),
                     suffix_ids=suffix_ids.to(dev), suffix_pos=suffix_pos.to(dev),
                     mask=torch.cat([prefix_mask, suffix_mask], 1).to(dev),
                     suffix_len=suffix_mask.sum(1).to(dev),
                     owner=torch.tensor([it[3] for it in items]).to(dev))


class PrefixCache:
    """Keys and values of the prefixes in blocks 0..stop_layer (None above it), per row."""

    def __init__(self, kv: list[tuple[torch.Tensor | None, torch.Tensor | None]] | None,
                 config) -> None:
        self.kv, self.config = kv, config

    def fresh(self) -> DynamicCache | None:
        """A new cache holding them (a forward pass appends to its cache, so each pass needs
        its own), or None without prefixes."""
        return None if self.kv is None else DynamicCache(self.kv, config=self.config)

    def select(self, rows: torch.Tensor) -> PrefixCache:
        """The cache of ``rows`` only."""
        if self.kv is None:
            return self
        return PrefixCache([(k if k is None else k[rows.to(k.device)],
                             v if v is None else v[rows.to(v.device)]) for k, v in self.kv],
                           self.config)


@torch.no_grad()
def prefix_cache(handle: ModelHandle, rows: SplitRows, stop_layer: int) -> PrefixCache:
    """The prefixes' keys and values in blocks 0..``stop_layer`` (empty without prefixes)."""
    config = handle.model.config
    if rows.prefix_ids.shape[1] == 0:
        return PrefixCache(None, config)
    cache = DynamicCache(config=config)
    forward_until(handle, {**rows.prefix_inputs, "past_key_values": cache, "use_cache": True},
                  stop_layer, [])
    return PrefixCache([(layer.keys, layer.values) if i <= stop_layer else (None, None)
                        for i, layer in enumerate(cache.layers)], config)


@contextmanager
def patched_forward(modules: list[torch.nn.Module], make: Callable) -> Iterator[None]:
    """Each module's forward becomes ``make(forward)`` (given its current forward).

    An existing instance-level ``forward`` (accelerate's) is restored afterwards.
    """
    saved = [m.__dict__.get("forward") for m in modules]
    for m in modules:
        m.forward = make(m.forward)
    try:
        yield
    finally:
        for m, fwd in zip(modules, saved):
            if fwd is None:
                del m.forward
            else:
                m.forward = fwd


def replay_blocks(handle: ModelHandle, upto: int, output):
    """Blocks 0..``upto`` skip their work and block ``upto`` returns the recorded ``output``.

    For passes whose inputs up to block ``upto`` are the same as in the pass that recorded it.
    Forward hooks still run.
    """
    modules = [handle.layer_module(i) for i in range(upto + 1)]
    return patched_forward(modules, lambda fwd: lambda *args, **kwargs: output)


def mlp_only_at(handle: ModelHandle, layer: int, rows: torch.Tensor, cols: torch.Tensor):
    """The MLP of ``layer`` computes only at positions (rows, cols) and gives zeros elsewhere.

    For passes that read block ``layer``'s output only there (the MLP is position-wise, so
    those positions are exact; the others become wrong).
    """

    def make(inner):
        def forward(hidden, *args, **kwargs):  # hidden (N, S, d_model)
            at = (rows.to(hidden.device), cols.to(hidden.device))
            picked = inner(hidden[at][None], *args, **kwargs)[0]  # (k, d_model)
            return picked.new_zeros(hidden.shape).index_put(at, picked)

        return forward

    return patched_forward([handle.mlp_module(layer)], make)


def forward_until(handle: ModelHandle, inputs: dict, stop_layer: int,
                  hooks: list[tuple[torch.nn.Module, str, Callable]]) -> None:
    """Run the model on ``inputs`` with the given hooks, stopping after block ``stop_layer``
    (on the CPU with :func:`grouped_kv_attention`).

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
        with grouped_kv_attention(handle.device):
            handle.model(**{"use_cache": False, **inputs})
    except StopForwardError:
        pass
    finally:
        for h in handles:
            h.remove()
