"""The language model lm-eval scores: its HFLM on the in-memory (edited) model, with two settings.

- ``eval.logits=continuation`` (the default): the requests that share a context (the choices of
  a multiple-choice question) run it once: contexts (truncated from the left to the model's
  window, as lm-eval truncates) left-padded into a key/value cache, batched by length, then the
  continuations in passes of like length after their contexts (accel/prefix.py's
  ``read_states``); the LM head and the log-softmax run only at the positions whose next token
  lm-eval reads, not at every position, a few rows of logits at a time.
  The figures are lm-eval's own within float rounding (tests/test_eval_lm.py).
  ``eval.logits=all`` is lm-eval's own path.
- ``eval.compute_dtype=bfloat16``: every pass (scoring and generation) in bfloat16, the whole
  model's parameters cast once per point (accel/precision.py's LoweredLinears), so that the
  hidden states, norms' outputs and activations are bfloat16 too (lm-eval's ``dtype=bfloat16``
  on a model loaded in float32), under autocast (its ``mixed_precision_dtype``), attention in
  float32 on every device. It changes figures by bfloat16 rounding: a named setting, measured
  against float32 in docs/benchmarks.md.
- ``eval.attention_dtype=bfloat16`` (with it): attention on the pass's bfloat16 inputs, torch's
  bfloat16 kernel (on CPUs with AMX about 2.5x its float32 one), its probabilities rounded to
  bfloat16 before they weigh the values: a named setting too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from lm_eval.models.huggingface import HFLM

from rlsedit_cli.accel.lower import LowerStates, requests_key
from rlsedit_cli.accel.precision import Float32Attention, LoweredLinears
from rlsedit_cli.accel.prefix import read_states
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.models.tokens import little_padding

LOGITS = ("continuation", "all")
WASTE, LEAST = 0.05, 512  # padding a pass may add to its real tokens, unless the pass holds
# fewer than LEAST tokens (smaller passes run the products below the machine's rate)
HEAD_ROWS = 64  # positions whose logits are read at once (64 x vocab: 12.6 MB in float32 at 49k)


class EditedLM(HFLM):
    """lm-eval's HFLM over ``handle``'s model as it is now (a point of the stream)."""

    def __init__(self, handle: ModelHandle, batch_size: int, logits: str = "continuation",
                 compute_dtype: str = "float32", lower: LowerStates | None = None,
                 attention_dtype: str = "float32") -> None:
        """``lower``: the run's record of the blocks below its edited layers (checked here:
        one EditedLM is one point)."""
        low = compute_dtype == "bfloat16"
        if attention_dtype == "bfloat16" and not low:
            raise ValueError("attention_dtype=bfloat16 needs compute_dtype=bfloat16")
        super().__init__(pretrained=handle.model, tokenizer=handle.tok, batch_size=batch_size,
                         device=str(handle.device),
                         mixed_precision_dtype=torch.bfloat16 if low else None)
        self.handle, self.only_continuation = handle, logits == "continuation"
        self.lowered = (LoweredLinears(handle, [handle.model], compute_dtype, every=True)
                        if low else None)
        self.lower, self.compute_dtype = lower, compute_dtype
        self.attention_dtype = attention_dtype
        if lower is not None:
            lower.check(handle)

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        """bfloat16 copies of the parameters in place (as far as ``lowered_weights`` runs on
        this device), attention in ``attention_dtype`` on every device: a named setting, not
        the CPU's ``float32_attention`` acceleration (nothing in float32)."""
        if self.lowered is None:
            yield
            return
        attention = (Float32Attention() if self.attention_dtype == "float32"
                     else contextlib.nullcontext())
        with self.lowered.swapped(), attention:
            yield

    def _model_call(self, inps, attn_mask=None, labels=None):
        with self._precision():
            return super()._model_call(inps, attn_mask, labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with self._precision():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              override_bs: int | None = None):
        if not self.only_continuation or self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 1)
        budget = size * self.max_length  # tokens a pass may hold: lm-eval's batch of windows
        contexts: dict[tuple[int, ...], list[int]] = {}  # context -> its requests
        for i, (_, ctx, cont) in enumerate(requests):
            kept = (ctx + cont)[-(self.max_length + 1):]  # truncated from the left, as lm-eval
            contexts.setdefault(tuple(kept[:-len(cont)]), []).append(i)
        # a context runs once for its requests when it is at least as long as each of their
        # continuations (ARC's answers, HellaSwag's endings, one-token labels); else they are
        # rows of their own (PIQA's long solutions after a short goal: a padded second pass
        # would cost more than it saves; docs/benchmarks.md section 5)
        shared = sorted((c for c in contexts if len(contexts[c]) > 1
                         and len(c) >= max(len(requests[i][2]) for i in contexts[c])),
                        key=len, reverse=True)
        once = set(shared)
        alone = sorted((i for c in contexts if c not in once for i in contexts[c]),
                       key=lambda i: -len(requests[i][1] + requests[i][2]))
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        rows_of = {i: (requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1]
                   for i in alone}
        with self._replayed(requests, budget):
            for batch in _by_tokens(shared, [len(c) for c in shared], budget):
                ks = [i for c in batch for i in contexts[c]]
                rows = torch.tensor([b for b, c in enumerate(batch) for _ in contexts[c]])
                scored = self._shared([list(c) for c in batch], [requests[i][2] for i in ks],
                                      rows)
                answers = _put(answers, ks, scored)
            for batch in _by_tokens(alone, [len(rows_of[i]) for i in alone], budget):
                scored = self._whole([rows_of[i] for i in batch],
                                     [requests[i][2] for i in batch])
                answers = _put(answers, batch, scored)
        for i, (request, _, _) in enumerate(requests):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answers[i])
        return answers

    def _replayed(self, requests, budget: int) -> contextlib.AbstractContextManager:
        """The passes of ``requests``, the blocks below the edited layers replayed where an
        earlier point kept their output (accel/lower.py)."""
        if self.lower is None:
            return contextlib.nullcontext()
        key = requests_key([(ctx, cont) for _, ctx, cont in requests],
                           (budget, self.max_length, self.compute_dtype,
                            self.attention_dtype, WASTE, LEAST))
        return self.lower.passes(self.handle, key)

    def _shared(self, contexts: list[list[int]], conts: list[list[int]],
                rows: torch.Tensor) -> list[tuple[float, bool]]:
        """Continuations that share contexts: each context once into a key/value cache
        (``rows[j]``: continuation j's), then the continuations (eval/scoring.py)."""
        with self._passes():
            read = read_states(self.handle.model.base_model, self.tokenizer, contexts, conts,
                               rows, self.device, WASTE, LEAST)  # (sum of their lengths, d)
        return self._read(read, conts)

    def _whole(self, rows: list[list[int]], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """Requests with a context of their own: one right-padded pass, as lm-eval's (no mask:
        padding after a row changes none of its positions), states read where cont is predicted."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        b_idx = [b for b, c in enumerate(conts) for _ in c]
        t_idx = [t for r, c in zip(rows, conts) for t in range(len(r) - len(c), len(r))]
        with self._passes():
            hidden = self.handle.model.base_model(
                ids, use_cache=False).last_hidden_state  # (B, T, d_model)
            read = hidden[torch.tensor(b_idx), torch.tensor(t_idx)]  # (N, d_model)
        return self._read(read, conts)

    @contextlib.contextmanager
    def _passes(self) -> Iterator[None]:
        with torch.no_grad(), self._precision(), torch.autocast(
                self.device.type, dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None):
            yield

    def _read(self, read: torch.Tensor, conts: list[list[int]]) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether each of its tokens is the
        greedy one) per continuation, from the states that predict its tokens, in order."""
        target = torch.tensor([t for c in conts for t in c], device=read.device)  # (N,)
        token_lp, greedy = torch.empty(len(target)), torch.empty(len(target), dtype=torch.bool)
        head = self.handle.model.get_output_embeddings()
        for at in range(0, len(target), HEAD_ROWS):  # rows of logits that stay in the cache
            end = min(at + HEAD_ROWS, len(target))
            with self._passes():
                logits = head(read[at:end])  # (n, vocab), bfloat16 in a bfloat16 pass
            token_lp[at:end], greedy[at:end] = _scored(logits, target[at:end])
        out, at = [], 0
        for cont in conts:
            n = len(cont)
            out.append((float(token_lp[at:at + n].sum()), bool(greedy[at:at + n].all())))
            at += n
        return out


def _scored(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's log-probability of its ``target`` token and whether the target is the row's
    argmax, as lm-eval reads them off its log-softmax (here in float32 from logits of either
    dtype): one fused log-softmax pass, its row maximum, and an argmax only on the rows whose
    target holds the maximum (argmax takes the first index of a tie). An argmax over bfloat16
    logits costs four times one over float32 on the CPU, and a subtraction of mixed dtypes
    several passes (docs/benchmarks.md section 5)."""
    lp = torch.log_softmax(logits, -1, dtype=torch.float32)  # (n, vocab)
    picked = lp.gather(1, target[:, None])[:, 0]  # (n,)
    greedy = picked == lp.amax(-1)  # (n,)
    tied = greedy.nonzero()[:, 0]
    if len(tied):
        greedy[tied] = lp[tied].argmax(-1) == target[tied]
    return picked.cpu(), greedy.cpu()


def _by_tokens(items: list, lengths: list[int], budget: int) -> list[list]:
    """``items`` (longest first) in batches whose padded size (count x first length) stays
    within ``budget`` tokens and whose padding stays small (eval/scoring.py's rule)."""
    out: list[list] = []
    for group in little_padding(list(range(len(items))), lengths, max(1, len(items)), WASTE, LEAST):
        batch: list = []
        for k in group:
            if batch and (len(batch) + 1) * lengths[group[0]] > budget:
                out.append(batch)
                batch = []
            batch.append(items[k])
        out.append(batch)
    return out


def _put(answers: list, ks: list[int], scored: list) -> list:
    for i, answer in zip(ks, scored):
        answers[i] = answer
    return answers
