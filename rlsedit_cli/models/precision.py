"""Lower-precision arithmetic for passes whose result is read in float32 (the target step's
frozen blocks): matrix products in bfloat16 through torch's autocast, attention kept in float32.

On the CPU torch's bfloat16 attention backward is several times slower than its float32 one
(a SmolLM2 target step: 29 ms against 4.7 ms per block, docs/benchmarks.md), while bfloat16
products run at about 2.7x the float32 rate on CPUs with AVX512_BF16; so the attention's inputs
go back to float32. Scoped to a ``with`` block: nothing outside it changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


class Float32Attention(TorchFunctionMode):
    """Inside autocast, ``scaled_dot_product_attention`` runs on float32 inputs without it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v, *rest = args
        mask = kwargs.get("attn_mask", rest[0] if rest else None)
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
            if rest:
                rest[0] = mask
            else:
                kwargs["attn_mask"] = mask
        with torch.autocast(q.device.type, enabled=False):
            return func(q.float(), k.float(), v.float(), *rest, **kwargs)


def lowered_weights(modules: list[torch.nn.Module], name: str,
                    ) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Copies in ``name``'s dtype of the float32 linear weights under ``modules``, made once so
    that autocast does not cast them again at every pass (empty for "float32")."""
    dtype = DTYPES[name]
    if dtype is None:
        return []
    return [(m.weight, m.weight.detach().to(dtype)) for module in modules
            for m in module.modules()
            if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32]


@contextmanager
def weights_swapped(copies: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> Iterator[None]:
    """The parameters hold their lowered copies (:func:`lowered_weights`) inside the block: for
    passes that only read the weights (no gradient reaches them)."""
    saved = [p.data for p, _ in copies]
    try:
        for p, low in copies:
            p.data = low
        yield
    finally:
        for (p, _), data in zip(copies, saved):
            p.data = data


def _linear_maps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose float32 ``weight`` enters a matrix product (Linear, GPT-2's Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    return [m for m in model.modules() if isinstance(m, torch.nn.Linear | Conv1D)
            and m.weight.dtype == torch.float32]


@contextmanager
def lowered_linears(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Inside the block every float32 linear map of ``model`` holds its weight in ``name``'s
    dtype, cast once, for passes that only read the weights: under autocast the same products,
    which autocast would otherwise cast again at every pass (it caches only the casts of weights
    that require a gradient; a generated text recast the model's weights at every token). A
    weight shared with another module (an LM head tied to the embedding) is replaced in the
    linear map only. Nothing changes for "float32"."""
    dtype = DTYPES[name]
    maps = _linear_maps(model) if dtype is not None else []
    saved = [m.weight for m in maps]
    low: dict[int, torch.nn.Parameter] = {}  # one copy per shared weight
    try:
        for m, weight in zip(maps, saved):
            if id(weight) not in low:
                low[id(weight)] = torch.nn.Parameter(weight.detach().to(dtype),
                                                     requires_grad=False)
            m.weight = low[id(weight)]
        yield
    finally:
        for m, weight in zip(maps, saved):
            m.weight = weight


@contextmanager
def compute_dtype(device: torch.device | str, name: str) -> Iterator[None]:
    """Matrix products in ``name`` ("float32": unchanged; "bfloat16": autocast, attention in
    float32) inside the block."""
    if name not in DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}: use one of {', '.join(DTYPES)}")
    if DTYPES[name] is None:
        yield
        return
    kind = torch.device(device).type
    with torch.autocast(kind, dtype=DTYPES[name]), Float32Attention():
        yield
