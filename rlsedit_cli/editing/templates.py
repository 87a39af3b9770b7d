"""Context templates: short prefixes sampled from the model itself (MEMIT's recipe)."""

from __future__ import annotations

import logging

import torch

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
def context_templates(handle: ModelHandle, spec: list[list[int]], seed: int) -> list[str]:
    """``["{}"]`` plus, for each (length, count) in ``spec``, ``count`` sampled prefixes.

    Each prefix is a top-5 sample of ``length`` tokens in all from one of five starter words
    (count // 5 per starter), braces removed, followed by ". {}". Deterministic given ``seed``.
    """
    tok, model = handle.tok, handle.model
    generator_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    out = ["{}"]
    hush = _NoMaskWarning()
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hf_logger.addFilter(hush)
    try:
        for length, count in spec:
            per = max(1, int(count) // len(STARTERS))
            for starter in STARTERS:
                ids = torch.tensor([encode_prompt(tok, starter)] * per, device=handle.device)
                new = max(1, int(length) - ids.shape[1])
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     do_sample=True, top_k=5, max_new_tokens=new,
                                     min_new_tokens=new, pad_token_id=tok.pad_token_id)
                for row in gen:
                    text = tok.decode(row, skip_special_tokens=True)
                    out.append(text.replace("{", "").replace("}", "").strip() + ". {}")
    finally:
        hf_logger.removeFilter(hush)
        torch.random.set_rng_state(generator_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
    return out


class ContextTemplates:
    """The context templates of one editor: sampled once, from the unedited model, on first use
    (so a resumed run reuses the ones it saved rather than sampling from the edited model)."""

    def __init__(self, handle: ModelHandle, spec: list[list[int]], seed: int) -> None:
        self.handle, self.spec, self.seed = handle, spec, seed
        self.texts: list[str] | None = None

    def get(self) -> list[str]:
        if self.texts is None:
            self.texts = context_templates(self.handle, self.spec, self.seed)
            log.info("%d context templates, e.g. %r", len(self.texts), self.texts[-1])
        return self.texts
