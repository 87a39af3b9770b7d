"""The language model lm-eval scores: its HFLM on the in-memory (edited) model, with two settings.

- ``eval.logits=continuation`` (the default): a loglikelihood request, or a window of a rolling
  one, runs the model's blocks over its tokens as lm-eval does (right-padded batches, longest
  first, truncated from the left to the context), but computes the LM head and the log-softmax
  only at the positions whose next token lm-eval reads (the continuation's), not at every
  position. The figures are lm-eval's own within float rounding (tests/test_eval_lm.py); the
  head over a 49,152-word vocabulary at every position is most of a short model's cost.
  ``eval.logits=all`` is lm-eval's own path.
- ``eval.compute_dtype=bfloat16``: every pass (scoring and generation) with bfloat16 matrix
  products (lm-eval's ``mixed_precision_dtype``), the weights cast once per point
  (models/precision.py's LoweredLinears) and attention in float32. It changes figures by
  bfloat16 rounding: a named setting, measured against float32 in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.models.precision import Float32Attention, LoweredLinears

LOGITS = ("continuation", "all")


class EditedLM(HFLM):
    """lm-eval's HFLM over ``handle``'s model as it is now (a point of the stream)."""

    def __init__(self, handle: ModelHandle, batch_size: int, logits: str = "continuation",
                 compute_dtype: str = "float32") -> None:
        low = compute_dtype == "bfloat16"
        super().__init__(pretrained=handle.model, tokenizer=handle.tok, batch_size=batch_size,
                         device=str(handle.device),
                         mixed_precision_dtype=torch.bfloat16 if low else None)
        self.handle, self.only_continuation = handle, logits == "continuation"
        self.lowered = LoweredLinears([handle.model], compute_dtype) if low else None

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        """bfloat16 copies of the weights in place, attention in float32 (nothing in float32)."""
        if self.lowered is None:
            yield
            return
        with self.lowered.swapped(), Float32Attention():
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
        rows: dict[tuple[int, ...], list[int]] = {}  # input tokens -> requests that share them
        for i, (_, ctx, cont) in enumerate(requests):  # (one-token choices of one context)
            rows.setdefault(tuple((ctx + cont)[-(self.max_length + 1):][:-1]), []).append(i)
        unique = sorted(rows, key=len, reverse=True)  # longest first, as lm-eval batches
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(unique), size):
            chunk = unique[start:start + size]
            conts = [[requests[i][2] for i in rows[row]] for row in chunk]
            for row, scored in zip(chunk, self._score(chunk, conts)):
                for i, answer in zip(rows[row], scored):
                    answers[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return answers

    def _score(self, rows: list[tuple[int, ...]],
               conts: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
        """Per input row, per continuation read from it: (sum of the continuation's
        log-probabilities, whether each of its tokens is the greedy one)."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows],
                           device=self.device)  # (B, T), right-padded as lm-eval pads
        b_idx, t_idx, targets, lengths = [], [], [], []
        for b, (row, row_conts) in enumerate(zip(rows, conts)):
            for cont in row_conts:
                n = len(cont)
                b_idx += [b] * n
                t_idx += range(len(row) - n, len(row))  # the positions that predict cont
                targets += cont
                lengths.append(n)
        with torch.no_grad(), self._precision(), torch.autocast(
                self.device.type, dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None):
            hidden = self.handle.model.base_model(ids).last_hidden_state  # (B, T, d), ln_f in
            picked = hidden[torch.tensor(b_idx), torch.tensor(t_idx)]  # (N, d)
            logits = self.handle.module(self.handle.spec.lm_head)(picked)  # (N, V)
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
        target = torch.tensor(targets, device=logprobs.device)
        token_lp = logprobs.gather(1, target[:, None])[:, 0]  # (N,)
        greedy = logprobs.argmax(-1) == target  # (N,)
        flat, at = [], 0
        for n in lengths:
            flat.append((float(token_lp[at:at + n].sum()), bool(greedy[at:at + n].all())))
            at += n
        out, at = [], 0
        for row_conts in conts:
            out.append(flat[at:at + len(row_conts)])
            at += len(row_conts)
        return out
