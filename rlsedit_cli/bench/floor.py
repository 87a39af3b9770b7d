"""What a general-ability point cannot go below on this machine: the products its passes compute
(the blocks' linear maps per token, attention per query-key pair, the LM head per position it
reads) over the machine's measured GEMM rate, counted from the passes as they ran."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D


@dataclass
class PassCounts:
    """Tokens the body ran (padding included), the real ones among them where a mask says so,
    the causal query-key pairs its attention covered, the positions the LM head read; and the
    share of the first three that the blocks computed (``block_*``: a pass whose lower blocks
    were replayed, accel/lower.py, counts with the share of the blocks that ran)."""

    tokens: int = 0
    real: int = 0
    pairs: int = 0
    head_rows: int = 0
    block_tokens: float = 0.0
    block_real: float = 0.0
    block_pairs: float = 0.0

    def since(self, before: PassCounts) -> PassCounts:
        """What was counted after ``before`` (a copy taken earlier)."""
        return PassCounts(*(getattr(self, f) - getattr(before, f)
                            for f in self.__dataclass_fields__))


class PassCounter:
    """Counts :class:`PassCounts` of ``model``'s passes inside ``with PassCounter(m) as c``;
    ``lower``: the record whose replayed passes run only the blocks above it."""

    def __init__(self, model: torch.nn.Module, lower=None) -> None:
        self.model, self.counts, self._hooks, self.lower = model, PassCounts(), [], lower

    def __enter__(self) -> PassCounts:
        body, head = self.model.base_model, self.model.get_output_embeddings()
        self._hooks = [body.register_forward_pre_hook(self._body, with_kwargs=True),
                       head.register_forward_pre_hook(self._head)]
        return self.counts

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()

    def _body(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        rows, width = ids.shape
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        real = (int(mask[:, -width:].sum()) if mask is not None and mask.dim() == 2
                else rows * width)
        pairs = rows * (width * past + width * (width + 1) // 2)  # causal
        self.counts.tokens += rows * width
        self.counts.real += real
        self.counts.pairs += pairs
        share = (1 - self.lower.below / _layers(module.config)
                 if self.lower is not None and self.lower.active else 1.0)
        self.counts.block_tokens += share * rows * width
        self.counts.block_real += share * real
        self.counts.block_pairs += share * pairs

    def _head(self, module, args) -> None:
        self.counts.head_rows += args[0].numel() // args[0].shape[-1]


def point_flops(model: torch.nn.Module, counts: PassCounts) -> dict[str, float]:
    """FLOPs of the counted passes: the blocks' maps (2 per weight per real token; ``padding``:
    per padded slot), attention (QK^T and PV: 4 per pair per query dimension per layer), the LM
    head (2 per weight per read row)."""
    cfg = model.config
    maps = sum(m.weight.numel() for m in model.base_model.modules()
               if isinstance(m, torch.nn.Linear | Conv1D))
    heads = getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 0))
    hidden = getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0))
    width = getattr(cfg, "head_dim", None) or hidden // max(1, heads)
    head = model.get_output_embeddings().weight.numel()
    return {"blocks": 2.0 * maps * counts.block_real,
            "padding": 2.0 * maps * (counts.block_tokens - counts.block_real),
            "attention": 4.0 * heads * width * _layers(cfg) * counts.block_pairs,
            "head": 2.0 * head * counts.head_rows}


def _layers(cfg) -> int:
    return getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0))


def floor_seconds(flops: dict[str, float], rate: float) -> float:
    """Seconds the counted FLOPs (:func:`point_flops`) take at ``rate`` GFLOP/s, padding left
    out (not the floor's)."""
    return round((sum(flops.values()) - flops["padding"]) / rate / 1e9, 3)
