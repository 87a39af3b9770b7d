"""Context templates: short prefixes sampled from the model itself (MEMIT's recipe), or given.

``editor.target.context_templates`` is either a sampling spec, ``[[tokens, count], ...]``, or
the templates themselves in the references' nested form, ``[["{}"], ["A text. {}", ...]]`` (one
list per group; MEMIT averages a request's keys within each group, then across the groups), or
the path of a JSON file holding that form (every run writes its own to
``context_templates.json``, so another run, or another code, can take them as they were).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import ListConfig, OmegaConf

from rlsedit_cli.errors import ConfigError, DataError
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


def group_sizes(spec: list[list[int]], style: str = "memit") -> list[int]:
    """How many templates each group of a sampling spec holds ("{}" alone first)."""
    return [1] + [max(1, int(count) // len(STARTERS)) * len(STARTERS) if style == "memit"
                  else max(1, int(count)) for _, count in spec]


def template_weights(sizes: list[int], style: str = "memit") -> list[float]:
    """How much each template's key counts in a request's key (they sum to 1), given the
    groups' sizes.

    MEMIT (compute_ks.py) averages within each group ("{}" alone, then each (length, count)
    group), then across the groups: with ``[[10, 5]]`` the plain prompt weighs 1/2. ROME
    (compute_u.py) averages all templates alike.
    """
    if style == "rome":
        return [1 / sum(sizes)] * sum(sizes)
    return [1 / (len(sizes) * size) for size in sizes for _ in range(size)]


def given_templates(value) -> list[list[str]] | None:
    """The templates ``value`` gives (nested lists, or a JSON file of them), checked; None for
    a sampling spec (which is checked too)."""
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise DataError(f"editor.target.context_templates={path}: cannot read it "
                            f"({e.strerror or e}): give a JSON file of templates, e.g. a run's "
                            "context_templates.json") from e
        except ValueError as e:
            raise DataError(f"editor.target.context_templates={path} is not JSON ({e}): give a "
                            'file holding [["{}"], ["A text. {}", ...]]') from e
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value)
    nested = isinstance(value, (list, tuple)) and all(isinstance(g, (list, tuple)) for g in value)
    groups = [list(g) for g in value] if nested else None
    if groups and all(isinstance(t, str) for g in groups for t in g) and all(groups):
        for template in (t for g in groups for t in g):
            if template.count("{}") != 1 or template.replace("{}", "").count("{") + \
                    template.replace("{}", "").count("}"):
                raise ConfigError(f"context template {template!r} must hold exactly one {{}} "
                                  "(where the prompt goes) and no other brace")
        return groups
    if groups is not None and all(len(g) == 2 and all(isinstance(x, int) and x > 0 for x in g)
                                  for g in groups):
        return None  # a sampling spec ([]: the plain prompt alone)
    raise ConfigError(f"editor.target.context_templates={value!r} is neither a sampling spec "
                      '[[tokens, count], ...] nor templates [["{}"], ["A text. {}", ...]] nor '
                      "the path of a JSON file of them")


class ContextTemplates:
    """The context templates of one editor: given, or sampled once, from the unedited model, on
    first use (so a resumed run reuses the ones it saved rather than sampling from the edited
    model)."""

    def __init__(self, handle: ModelHandle, spec, seed: int, style: str = "memit") -> None:
        self.handle, self.seed, self.style = handle, seed, style
        given = given_templates(spec)
        self.spec = None if given else spec
        self.sizes = [len(g) for g in given] if given else group_sizes(spec, style)
        self.texts: list[str] | None = [t for g in given for t in g] if given else None
        self.weights = template_weights(self.sizes, style)  # of each template's key

    def get(self) -> list[str]:
        if self.texts is None:
            self.texts = context_templates(self.handle, self.spec, self.seed, self.style)
            log.info("%d context templates, e.g. %r", len(self.texts), self.texts[-1])
        return self.texts

    def groups(self) -> list[list[str]]:
        """The templates in the references' nested form, one list per group."""
        texts, out = self.get(), []
        for size in self.sizes:
            out.append(texts[sum(len(g) for g in out):][:size])
        return out
