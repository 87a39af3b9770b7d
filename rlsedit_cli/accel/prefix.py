"""Prefix caches and replayed blocks: work an edit cannot change, done once.

An edit at the subject's last token changes nothing before it (causal attention), so
:class:`SplitRows` cut each row there: the prefix runs once into a key/value cache
(:func:`prefix_cache`) and the target step re-runs only the suffix. Rows of one group (the same
context template) share the tokens their prefixes start with: those run once per group
(:class:`SharedPrefix`). Blocks whose inputs did not change since a recorded pass return its
output (:func:`replay_blocks`); an MLP whose output is read at a few positions computes only
there (:func:`mlp_only_at`). Measuring, pairs that share a prompt run it once
(:func:`read_states`). Which of these run: ``speed.accelerations`` (accel/__init__.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from rlsedit_cli.editing.inputs import Item, encode_items, forward_until
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.models.tokens import little_padding, pad, positions


@dataclass
class SharedPrefix:
    """The first ``cols`` prefix columns hold tokens that every row of a group starts with.

    ``rep`` (N,): the row whose keys and values there stand for its group's (-1: a row that
    shares nothing, all padding there). The keys and values of those columns are computed for
    the representatives only, then copied to their groups (:func:`prefix_cache`).
    """

    cols: int
    rep: torch.Tensor


@dataclass
class SplitRows:
    """Rows cut at the subject's last token.

    The prefix (tokens before it) takes P columns: the tokens its group shares, left-padded to
    ``shared.cols`` columns, then the rest, left-padded (without sharing: all of it, left-padded);
    position ids count the real tokens only, so the padding between them changes nothing. The
    suffix (from the subject's last token on) is right-padded to S columns, so that token sits in
    suffix column 0 of every row. ``prefix_*``: (N, P); ``suffix_*``: (N, S); ``mask``:
    (N, P + S); ``suffix_len``, ``owner``: (N,)
    """

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    prefix_pos: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_pos: torch.Tensor
    mask: torch.Tensor
    suffix_len: torch.Tensor
    owner: torch.Tensor
    shared: SharedPrefix | None = None

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
                  for f in self.__dataclass_fields__ if f != "shared"}  # (the cache's business)
        picked["owner"] = torch.searchsorted(requests.to(self.owner.device), picked["owner"])
        return SplitRows(**picked)

    def suffix_inputs(self, cache: DynamicCache | None) -> dict:
        """Inputs of the suffix after a prefix whose keys and values are in ``cache``."""
        return {"input_ids": self.suffix_ids, "attention_mask": self.mask,
                "position_ids": self.suffix_pos, "past_key_values": cache,
                "use_cache": cache is not None}


def _common_length(seqs: list[list[int]]) -> int:
    """How many tokens every one of ``seqs`` starts with."""
    n = min(len(s) for s in seqs)
    for j in range(n):
        if any(s[j] != seqs[0][j] for s in seqs):
            return j
    return n


def _shared_lengths(prefixes: list[list[int]], groups: list[int] | None, least: int
                    ) -> tuple[list[int], list[int]]:
    """Per row: how many prefix tokens it shares with its group, and the group's first row
    (-1 where it shares fewer than ``least``: not worth a pass)."""
    shared, rep = [0] * len(prefixes), [-1] * len(prefixes)
    members: dict[int, list[int]] = {}
    for row, g in enumerate(groups or []):
        members.setdefault(g, []).append(row)
    for rows in members.values():
        c = _common_length([prefixes[r] for r in rows]) if len(rows) > 1 else 0
        if c >= least:
            for r in rows:
                shared[r], rep[r] = c, rows[0]
    return shared, rep


def build_split_rows(handle: ModelHandle, items: list[Item], groups: list[int] | None = None,
                     least_shared: int = 2) -> SplitRows:
    """:class:`SplitRows` for ``items``; ``groups`` (one id per item): rows whose prefixes share
    their first tokens (at least ``least_shared``) get them once (:class:`SharedPrefix`)."""
    seqs, lookups = encode_items(handle, items)
    pad_id = handle.tok.pad_token_id
    prefixes = [s[:k] for s, k in zip(seqs, lookups)]
    shared, rep = _shared_lengths(prefixes, groups, least_shared)
    head_ids, head_mask = pad([p[:c] for p, c in zip(prefixes, shared)], pad_id, left=True)
    rest_ids, rest_mask = pad([p[c:] for p, c in zip(prefixes, shared)], pad_id, left=True)
    prefix_ids = torch.cat([head_ids, rest_ids], 1)
    prefix_mask = torch.cat([head_mask, rest_mask], 1)
    suffix_ids, suffix_mask = pad([s[k:] for s, k in zip(seqs, lookups)], pad_id)
    lookup = torch.tensor(lookups)
    suffix_pos = lookup[:, None] + torch.arange(suffix_ids.shape[1])[None, :]
    dev = handle.device
    sharing = (SharedPrefix(cols=head_ids.shape[1], rep=torch.tensor(rep, device=dev))
               if head_ids.shape[1] else None)
    return SplitRows(prefix_ids=prefix_ids.to(dev), prefix_mask=prefix_mask.to(dev),
                     prefix_pos=positions(prefix_mask).to(dev),
                     suffix_ids=suffix_ids.to(dev), suffix_pos=suffix_pos.to(dev),
                     mask=torch.cat([prefix_mask, suffix_mask], 1).to(dev),
                     suffix_len=suffix_mask.sum(1).to(dev),
                     owner=torch.tensor([it[3] for it in items]).to(dev), shared=sharing)


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
    """The prefixes' keys and values in blocks 0..``stop_layer`` (empty without prefixes).

    With :class:`SharedPrefix`, the shared columns run for one row per group, their keys and
    values are copied to the group's rows, and the rest of each prefix runs after them.
    """
    config = handle.model.config
    if rows.prefix_ids.shape[1] == 0:
        return PrefixCache(None, config)
    inputs, start = rows.prefix_inputs, None
    if rows.shared is not None:
        cols, rep = rows.shared.cols, rows.shared.rep
        reps = torch.unique(rep[rep >= 0])  # (G,)
        head = DynamicCache(config=config)
        forward_until(handle, {**{k: v[reps, :cols] for k, v in inputs.items()},
                               "past_key_values": head, "use_cache": True}, stop_layer, [])
        slot = torch.searchsorted(reps, rep.clamp(min=0))  # (N,) each row's group's slot
        own = (rep >= 0)[:, None, None, None]  # rows that share nothing: zeros, masked

        def spread(x: torch.Tensor) -> torch.Tensor:  # (G, heads, cols, d) -> (N, ...)
            return torch.where(own.to(x.device), x[slot.to(x.device)], 0.0)

        start = DynamicCache([(spread(layer.keys), spread(layer.values))
                              if i <= stop_layer else (None, None)
                              for i, layer in enumerate(head.layers)], config=config)
        inputs = {"input_ids": inputs["input_ids"][:, cols:],
                  "attention_mask": inputs["attention_mask"],
                  "position_ids": inputs["position_ids"][:, cols:]}
    cache = start if start is not None else DynamicCache(config=config)
    if inputs["input_ids"].shape[1]:  # (every prefix may be all shared)
        forward_until(handle, {**inputs, "past_key_values": cache, "use_cache": True},
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


@torch.no_grad()
def read_states(body, tok, prompts: list[list[int]], targets: list[list[int]],
                 rows: torch.Tensor, device, waste: float | None = None, least: int = 0
                 ) -> torch.Tensor:
    """The hidden states that predict each target's tokens after its prompt (``rows[j]``: the
    prompt of target j), target after target: (sum of target lengths, d_model).

    The targets run after their prompts' cached keys and values in one right-padded pass, or,
    with ``waste`` (and ``least``), in passes of targets of like length
    (:func:`little_padding`), each over its rows of the cache: answers of 2 to 40 tokens in one
    pass are mostly padding."""
    ids, mask = pad(prompts, tok.pad_token_id, left=True, device=device)  # (B, P)
    pos = positions(mask)  # (B, P): padding changes nothing
    cache = DynamicCache(config=body.config)
    hidden = body(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                  use_cache=True).last_hidden_state  # (B, P, d_model)
    last = hidden[rows.to(device), -1]  # (n, d_model): predicts each target's first token
    longer = sorted((j for j, t in enumerate(targets) if len(t) > 1),
                    key=lambda j: -len(targets[j]))
    if not longer:
        return last
    groups = ([longer] if waste is None else
              little_padding(longer, [len(targets[j]) - 1 for j in longer], len(longer), waste,
                             least))
    prompts_kv = PrefixCache([(layer.keys, layer.values) for layer in cache.layers],
                             body.config) if len(groups) > 1 else None
    after: dict[int, torch.Tensor] = {}  # target j -> (len - 1, d_model)
    for group in groups:
        pick = rows[group].to(device)  # (m,)
        if prompts_kv is None:  # one pass: the cache itself, cut to its rows
            cache.batch_select_indices(pick)
            rest = cache
        else:  # a pass per group, each over a fresh cache of its rows
            rest = prompts_kv.select(pick).fresh()
        s_ids, s_mask = pad([targets[j][:-1] for j in group], tok.pad_token_id, device=device)
        s_pos = (pos[pick, -1:] + 1 + torch.arange(s_ids.shape[1], device=device)) * s_mask
        # (padding at position 0: a long prompt's padded slots stay inside the position table)
        states = body(input_ids=s_ids, attention_mask=torch.cat([mask[pick], s_mask], 1),
                      position_ids=s_pos, past_key_values=rest,
                      use_cache=True).last_hidden_state  # (m, S, d_model)
        after |= {j: states[i, : len(targets[j]) - 1] for i, j in enumerate(group)}
    return torch.cat([last[j : j + 1] if j not in after else torch.cat([last[j : j + 1], after[j]])
                      for j in range(len(targets))])
