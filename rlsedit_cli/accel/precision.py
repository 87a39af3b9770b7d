"""Lower-precision passes done cheaper: ``lowered_weights`` (frozen weights cast once for many
passes, :class:`LoweredLinears`) and ``float32_attention`` (attention on float32 inputs inside
bfloat16 autocast, :class:`Float32Attention`, with ``grouped_attention`` for short queries).

On the CPU torch's bfloat16 attention backward is several times slower than its float32 one
(a SmolLM2 target step: 29 ms against 4.7 ms per block, docs/benchmarks.md), while bfloat16
products run at about 2.7x the float32 rate on CPUs with AVX512_BF16. The plain path of a
bfloat16 pass is torch's autocast alone (:func:`compute_dtype` with the accelerations off).
Scoped to a ``with`` block: nothing outside it changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

from rlsedit_cli.accel.attention import grouped_attention

DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


SHORT_QUERY = 16  # at most this many query tokens: :func:`grouped_attention` on the CPU


class Float32Attention(TorchFunctionMode):
    """Inside autocast, ``scaled_dot_product_attention`` runs on float32 inputs without it.

    With ``short_queries``, attention with at most :data:`SHORT_QUERY` query tokens on the CPU
    (the target step's suffixes) is :func:`rlsedit_cli.accel.attention.grouped_attention`, two
    batched products per key/value head group, instead of torch's kernel: the same numbers
    within float32 rounding (tests), a cheaper backward (docs/benchmarks.md section 2).
    """

    def __init__(self, short_queries: bool = False) -> None:
        super().__init__()
        self.short_queries = short_queries

    def _grouped(self, q, k, mask, rest, kwargs) -> bool:
        """Whether this call is one :func:`grouped_attention` computes as torch would."""
        return (self.short_queries and q.device.type == "cpu" and not rest
                and q.shape[2] <= SHORT_QUERY and not kwargs.get("is_causal")
                and not kwargs.get("dropout_p")
                and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1))
                and (q.shape[1] == k.shape[1] or kwargs.get("enable_gqa", False)))

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
            if self._grouped(q, k, mask, rest, kwargs):
                return grouped_attention(q.float(), k.float(), v.float(), mask,
                                         kwargs.get("scale"))
            return func(q.float(), k.float(), v.float(), *rest, **kwargs)


def _lowered_slots(modules: list[torch.nn.Module],
                   every: bool) -> list[tuple[torch.nn.Module, str]]:
    """(module, parameter name) of the float32 ``weight`` of each linear map under ``modules``
    (Linear, GPT-2's Conv1D: what enters a matrix product), each once; with ``every``, of every
    float32 parameter under them (norms, embeddings, biases too)."""
    from transformers.pytorch_utils import Conv1D

    found: dict[tuple[int, str], tuple[torch.nn.Module, str]] = {}
    for module in modules:
        for m in module.modules():
            names = (list(m._parameters) if every
                     else ["weight"] if isinstance(m, torch.nn.Linear | Conv1D) else [])
            for name in names:
                p = m._parameters.get(name)
                if p is not None and p.dtype == torch.float32:
                    found[(id(m), name)] = (m, name)
    return list(found.values())


class LoweredLinears:
    """Copies in ``name``'s dtype of the float32 weights of the linear maps under ``modules``
    (with ``every``: of all their float32 parameters, so that the whole pass runs in ``name``),
    cast once, for passes that only read the weights (no gradient reaches them).

    Under autocast the products are the same, but autocast caches only the casts of weights that
    require a gradient, which a loaded model's do not: every pass (a target step, a generated
    token) would cast all the weights again. Inside :meth:`swapped` each module holds its copy
    in place of its parameter; a parameter shared by several modules (an LM head tied to the
    embedding) gets one copy, held by each of the modules swapped. Nothing for "float32", nor
    where ``lowered_weights`` does not run on ``handle``'s device (autocast casts every pass).
    """

    def __init__(self, handle, modules: list[torch.nn.Module], name: str,
                 every: bool = False) -> None:
        dtype = DTYPES[name]
        on = handle.accel.on("lowered_weights", handle.device)
        self.slots = _lowered_slots(modules, every) if dtype is not None and on else []
        low: dict[int, torch.nn.Parameter] = {}
        for m, pname in self.slots:
            weight = m._parameters[pname]
            if id(weight) not in low:
                low[id(weight)] = torch.nn.Parameter(weight.detach().to(dtype),
                                                     requires_grad=False)
        self.low = [low[id(m._parameters[pname])] for m, pname in self.slots]

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Every module holds its copies inside the block, its own parameters afterwards."""
        # straight into the parameter dicts: Module.__setattr__'s checks cost about 10 us a
        # map, 8 ms per target step on SmolLM2's 211 maps (docs/benchmarks.md section 2)
        saved = [m._parameters[pname] for m, pname in self.slots]
        try:
            for (m, pname), weight in zip(self.slots, self.low):
                m._parameters[pname] = weight
            yield
        finally:
            for (m, pname), weight in zip(self.slots, saved):
                m._parameters[pname] = weight


def attention_mode(handle, short_queries: bool = False, device: torch.device | None = None):
    """:class:`Float32Attention` where ``float32_attention`` runs on ``device`` (default:
    ``handle``'s), with ``short_queries`` where ``grouped_attention`` runs too; else nothing."""
    device = handle.device if device is None else device
    accel = handle.accel
    if not accel.on("float32_attention", device):
        return contextlib.nullcontext()
    return Float32Attention(short_queries and accel.on("grouped_attention", device))


@contextmanager
def compute_dtype(handle, name: str, short_queries: bool = False,
                  device: torch.device | None = None) -> Iterator[None]:
    """Matrix products in ``name`` ("float32": unchanged; "bfloat16": autocast) inside the
    block, on ``device`` (default: ``handle``'s); where ``float32_attention`` runs, attention in
    float32, and with ``short_queries`` where ``grouped_attention`` runs too, as
    :class:`Float32Attention` says."""
    if name not in DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}: use one of {', '.join(DTYPES)}")
    if DTYPES[name] is None:
        yield
        return
    device = handle.device if device is None else torch.device(device)
    with torch.autocast(device.type, dtype=DTYPES[name]), attention_mode(handle, short_queries,
                                                                         device):
        yield
