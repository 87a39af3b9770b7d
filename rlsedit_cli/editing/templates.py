"""Context templates: short prefixes sampled from the model itself (MEMIT's recipe)."""

from __future__ import annotations

import logging

import torch

from rlsedit_cli.models.generation import fixed_length, seeded
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.models.tokens import encode_prompt

log = logging.getLogger(__name__)
STARTERS = ("The", "Therefore", "Because", "I", "You")


class _NoMaskWarning(logging.Filter):
    """Drops transformers' "pass an attention_mask" warning: generation passes the (all-ones)
    mask, but a model whose BOS is also its pad token sees a "padded" input and warns anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "attention_mask" not in record.getMessage()


@torch.no_grad()
def context_templates(handle: ModelHandle, spec: list[list[int]], seed: int,
                      style: str = "memit") -> list[str]:
    """``["{}"]`` plus, for each (length, count) in ``spec``, ``count`` sampled prefixes + ". {}".

    Each prefix is a top-5 sample of ``length`` tokens in all (prompt included), with braces
    turned into spaces. ``style="memit"`` (memit_main.py): ``count // 5`` samples from each of
    five starter words; ``style="rome"`` (rome_main.py): ``count`` samples from the beginning of
    a text (the tokenizer's BOS, or EOS where there is none). Deterministic given ``seed``.
    """
    tok, model = handle.tok, handle.model
    if style == "memit":
        starts = [(encode_prompt(tok, starter), 1 / len(STARTERS)) for starter in STARTERS]
    elif style == "rome":
        begin = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        starts = [([begin], 1.0)]
    else:
        raise ValueError(f"context template style {style!r} is not memit or rome")
    out = ["{}"]
    hush = _NoMaskWarning()
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hf_logger.addFilter(hush)
    try:
        with seeded(seed):
            for length, count in spec:
                for start, share in starts:
                    per = max(1, int(int(count) * share))
                    ids = torch.tensor([start] * per, device=handle.device)
                    new = max(1, int(length) - ids.shape[1])
                    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         generation_config=fixed_length(tok, new))
                    for row in gen:
                        text = tok.decode(row, skip_special_tokens=True)
                        out.append(text.lstrip().replace("{", " ").replace("}", " ") + ". {}")
    finally:
        hf_logger.removeFilter(hush)
    return out


def template_weights(spec: list[list[int]], style: str = "memit") -> list[float]:
    """How much each template's key counts in a request's key (they sum to 1).

    MEMIT (compute_ks.py) averages within each group ("{}" alone, then each (length, count)
    group), then across the groups: with ``[[10, 5]]`` the plain prompt weighs 1/2. ROME
    (compute_u.py) averages all templates alike.
    """
    sizes = [1] + [max(1, int(count) // len(STARTERS)) * len(STARTERS) if style == "memit"
                   else max(1, int(count)) for _, count in spec]
    if style == "rome":
        return [1 / sum(sizes)] * sum(sizes)
    return [1 / (len(sizes) * size) for size in sizes for _ in range(size)]


class ContextTemplates:
    """The context templates of one editor: sampled once, from the unedited model, on first use
    (so a resumed run reuses the ones it saved rather than sampling from the edited model)."""

    def __init__(self, handle: ModelHandle, spec: list[list[int]], seed: int,
                 style: str = "memit") -> None:
        self.handle, self.spec, self.seed, self.style = handle, spec, seed, style
        self.texts: list[str] | None = None
        self.weights = template_weights(spec, style)  # of each template's key

    def get(self) -> list[str]:
        if self.texts is None:
            self.texts = context_templates(self.handle, self.spec, self.seed, self.style)
            log.info("%d context templates, e.g. %r", len(self.texts), self.texts[-1])
        return self.texts
