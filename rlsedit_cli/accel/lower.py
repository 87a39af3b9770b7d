"""General-ability points replay the blocks below the edited layers (``unedited_blocks``).

Every point of a run scores the same requests in the same passes (eval/lm.py's scoring passes
are a function of a task's requests and the eval settings alone), and the blocks below the
lowest edited one keep their parameters all stream long, so what the highest of them hands on
at a later point is, bit for bit, what it handed on at an earlier one. :class:`LowerStates`
keeps that output for every scoring pass of a request list (within a memory budget, whole
request lists only), and at later points those blocks return it instead of computing. Each
replayed block still adds a one-byte-wide entry to the pass's key/value cache, so that the
cache's length, which the masks of the passes after a shared context read from the first
block's entry, stays right; nothing reads those entries' values, because every pass of a kept
request list is replayed. The blocks' parameters are checked at every point (a hash of their
bytes): after any change the record starts again.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Iterator

import torch
from transformers import Cache

from rlsedit_cli.accel.prefix import patched_forward
from rlsedit_cli.models.handle import ModelHandle


def requests_key(requests: list[tuple[list[int], list[int]]], settings: tuple) -> str:
    """What decides a request list's passes: its (context, continuation) tokens and the
    settings that shape the passes (batch budget, compute dtype)."""
    digest = hashlib.sha256(repr(settings).encode())
    for ctx, cont in requests:
        digest.update(repr((ctx, cont)).encode())
    return digest.hexdigest()


class LowerStates:
    """The output of block ``below - 1`` for every scoring pass of the request lists kept.

    Args:
        below: the lowest edited block (blocks 0..below-1 are replayed).
        budget_mb: the most memory the kept states take (on the model's device).
    """

    def __init__(self, below: int, budget_mb: float) -> None:
        self.below, self.budget = below, int(budget_mb * 2**20)
        self.digest: str | None = None
        self.kept: dict[str, list[torch.Tensor]] = {}  # request list -> one output per pass
        self.size = 0  # bytes kept
        self.replayed = 0  # passes replayed since the record started
        self._at = 0  # the pass under way, counted from the request list's first
        self.active = False  # whether the passes under way are replayed

    def check(self, handle: ModelHandle) -> None:
        """At each point, before its passes: the record starts again when a parameter of the
        replayed blocks is not what it was when the record started."""
        digest = hashlib.blake2b(digest_size=16)
        for i in range(self.below):
            for name, p in handle.layer_module(i).named_parameters():
                digest.update(f"{i}.{name}:{tuple(p.shape)}:{p.dtype}".encode())
                digest.update(p.detach().reshape(-1).view(torch.uint8).cpu().numpy())
        digest = digest.hexdigest()
        if digest != self.digest:
            self.kept, self.size, self.replayed, self.digest = {}, 0, 0, digest

    @contextlib.contextmanager
    def passes(self, handle: ModelHandle, key: str) -> Iterator[None]:
        """The scoring passes of the request list ``key`` (:func:`requests_key`): replayed
        below ``below`` where the list was kept, else computed and kept when the budget
        allows."""
        kept = self.kept.get(key)
        count, new = itertools.count(), []
        body = handle.model.base_model

        def started(*_) -> None:
            self._at = next(count)

        hook = body.register_forward_pre_hook(started)

        def make(i: int):
            def wrap(forward):
                def run(*args, **kwargs):
                    if kept is None:
                        out = forward(*args, **kwargs)
                        if i == self.below - 1:
                            new.append(out if isinstance(out, torch.Tensor) else None)
                        return out
                    hidden = args[0] if args else kwargs["hidden_states"]
                    _one_byte_entry(args, kwargs, i, hidden)
                    if i < self.below - 1:
                        return hidden  # (read by the next replayed block only: unused)
                    at = self._at
                    if at >= len(kept) or kept[at].shape[:2] != hidden.shape[:2]:
                        raise RuntimeError(
                            f"unedited_blocks: pass {at} of a kept request list does not match "
                            "its record; leave unedited_blocks out of speed.accelerations")
                    self.replayed += 1
                    return kept[at]
                return run
            return wrap

        blocks = [handle.layer_module(i) for i in range(self.below)]
        self.active = kept is not None
        try:
            with _each_patched(blocks, make):
                yield
        finally:
            hook.remove()
            self.active = False
        size = sum(t.numel() * t.element_size() for t in new if t is not None)
        if kept is None and new and None not in new and self.size + size <= self.budget:
            self.kept[key] = [t.detach().clone() for t in new]
            self.size += size


@contextlib.contextmanager
def _each_patched(blocks: list[torch.nn.Module], make) -> Iterator[None]:
    """Block i's forward becomes ``make(i)(forward)``."""
    with contextlib.ExitStack() as stack:
        for i, block in enumerate(blocks):
            stack.enter_context(patched_forward([block], make(i)))
        yield


def _one_byte_entry(args: tuple, kwargs: dict, layer: int, hidden: torch.Tensor) -> None:
    """Block ``layer``'s entry in the pass's key/value cache, if it has one: one byte per
    position (its length is what later passes read)."""
    cache = kwargs.get("past_key_values")
    if cache is None:
        cache = next((a for a in args[1:] if isinstance(a, Cache)), None)
    if cache is None or kwargs.get("use_cache") is False:
        return
    marks = torch.zeros(hidden.shape[0], 1, hidden.shape[1], 1, dtype=torch.uint8,
                        device=hidden.device)  # (B, 1, T, 1)
    cache.update(marks, marks, layer)


def lower_states(handle: ModelHandle, edited: list[int | str], budget_mb: float,
                 ) -> LowerStates | None:
    """The record for a run whose editor writes the ``edited`` maps: None where no block lies
    below them or ``unedited_blocks`` does not serve the model's device."""
    below = min((handle.map_layer(key) for key in edited), default=0)
    if below == 0 or not handle.accel.on("unedited_blocks", handle.device):
        return None
    return LowerStates(below, budget_mb)
