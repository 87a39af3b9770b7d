"""The target step's loss computed fast (the ``target_loss`` acceleration): the same values as
editing/reference.py's plain definitions, a fraction of the work.

Work that the deltas cannot change is done once, not at every step: the tokens before the
subject's last token (their keys and values are cached, :func:`prefix_cache`; the tokens a
context template puts before every request's prompt run once per chunk) and blocks
0..``z_layer`` on the remaining tokens (replayed, :func:`replay_blocks`). Work the loss cannot
see is not done: the MLPs of the re-run blocks skip the suffix's padding and the KL prompts'
tokens after the subject, and block ``loss_layer``'s runs only at the positions the loss reads
(:func:`mlp_only_at`); the LM head runs once, only at those positions.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from rlsedit_cli.accel.precision import LoweredLinears, compute_dtype
from rlsedit_cli.accel.prefix import (
    SplitRows,
    build_split_rows,
    mlp_only_at,
    prefix_cache,
    replay_blocks,
)
from rlsedit_cli.datasets.records import Record, fill
from rlsedit_cli.editing.inputs import forward_until
from rlsedit_cli.editing.reference import KL_PROMPT
from rlsedit_cli.models.handle import ModelHandle, block_hidden, with_hidden
from rlsedit_cli.models.tokens import encode_target


def _rows(handle: ModelHandle, requests: list[Record], templates: list[str], share: bool):
    """Rewrite rows (every context x request) then one KL row per request; with ``share``, the
    rows of one context template share the tokens they start with (the template's, run once)."""
    items, targets, groups = [], [], []
    for i, r in enumerate(requests):
        t_ids = encode_target(handle.tok, r.target_new)
        for j, ctx in enumerate(templates):
            items.append((fill(ctx, r.prompt), r.subject, t_ids[:-1], i))
            targets.append(t_ids)
            groups.append(j)
    for i, r in enumerate(requests):
        items.append((KL_PROMPT, r.subject, [], i))
        groups.append(len(templates))
    return build_split_rows(handle, items, groups if share else None), targets


def _target_index(rows: SplitRows, targets: list[list[int]]):
    """(row, suffix column, token) indices of every target token."""
    row_idx, col_idx, tok_idx = [], [], []
    suffix_len = rows.suffix_len.tolist()
    for row, t_ids in enumerate(targets):
        n = len(t_ids)
        for j, t in enumerate(t_ids):
            row_idx.append(row)
            col_idx.append(suffix_len[row] - n + j)  # the prompt's last token predicts token 0
            tok_idx.append(t)
    return torch.tensor(row_idx), torch.tensor(col_idx), torch.tensor(tok_idx)


def _logits(handle: ModelHandle, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on hidden states (..., d_model) -> (..., vocab), float32."""
    ln_f = handle.module(handle.spec.ln_f)
    head = handle.module(handle.spec.lm_head)
    return head(ln_f(hidden)).float()


class TargetLoss:
    """The target loss of a chunk of requests as a function of their deltas, computed fast.

    Calling it with delta (n, d_model) runs one forward pass of the rows' suffixes from block
    ``z_layer`` on and returns, per request, the mean target NLL over its prompts (n,) and the
    next-token log-probabilities at the subject's last token of the KL prompt (n, vocab). It equals
    :func:`rlsedit_cli.editing.reference.plain_target_loss` (the readable definition; tests hold
    the two equal on every architecture). ``h_init`` (n, d_model), the unedited residual stream
    after ``z_layer`` at the subject's last token of each plain prompt, is set by the first call.
    :meth:`keep` drops the rows of requests that stopped, so later steps cost only what is left.
    ``dtype``: of the frozen blocks' and the LM head's matrix products (:func:`compute_dtype`);
    the delta, Adam and the loss (log-softmax, NLL, KL) stay float32. ``share_prefixes``: the
    tokens a context template puts before every prompt of the chunk run once (the same keys and
    values, tests/test_speed.py; false: once per row, for benchmarks).
    """

    def __init__(self, handle: ModelHandle, requests: list[Record], templates: list[str],
                 z_layer: int, loss_layer: int, dtype: str = "float32",
                 share_prefixes: bool = True) -> None:
        self.handle, self.z_layer, self.dtype = handle, z_layer, dtype
        self.loss_layer = max(loss_layer, z_layer)
        self.n, self.n_ctx = len(requests), len(templates)
        self.rows, self.targets = _rows(handle, requests, templates, share_prefixes)
        # the frozen blocks' and the LM head's weights in ``dtype``, cast once (bfloat16)
        self.low = LoweredLinears(handle, [*(handle.layer_module(i)
                                             for i in range(self.loss_layer + 1)),
                                           handle.module(handle.spec.lm_head)], dtype)
        with compute_dtype(handle, dtype), self.low.swapped():
            self.kv = prefix_cache(handle, self.rows, self.loss_layer)
        self.z_out = None  # block z_layer's recorded output (blocks 0..z_layer are replayed)
        self.h_init: torch.Tensor | None = None
        self.map_init: torch.Tensor | None = None  # the edited map's output there (n, d_model)
        self.top1: torch.Tensor | None = None  # (n,) every target token top-1 after every prompt
        self._index()

    def _index(self) -> None:
        """The index tensors of the current rows (made once per set of rows)."""
        rows, n, n_ctx = self.rows, self.n, self.n_ctx
        n_rewrite = n * n_ctx
        dev = rows.mask.device  # the .to()s below only cross GPUs
        self.t_row, self.t_col, self.t_tok = (x.to(dev) for x in _target_index(rows,
                                                                                 self.targets))
        self.t_len = torch.tensor([len(t) for t in self.targets], dtype=torch.float32,
                                  device=dev)
        self.kl_rows = torch.arange(n_rewrite, n_rewrite + n, device=dev)
        self.kl_col = torch.zeros_like(self.kl_rows)  # the subject's last token (compute_z.py)
        self.needed = (torch.cat([self.t_row, self.kl_rows]),
                       torch.cat([self.t_col, self.kl_col]))  # positions the loss reads
        # tokens whose MLP output can reach what the loss reads: not the padding, and of a KL
        # row only column 0 (causal attention: the later columns feed nothing the loss reads)
        useful = rows.suffix_mask.clone()
        useful[n_rewrite:, 1:] = 0
        self.real = torch.nonzero(useful, as_tuple=True)
        self.first_rows = torch.arange(0, n_rewrite, n_ctx, device=dev)  # the "{}" contexts

    def new_cache(self):
        """A fresh key/value cache of the prefixes (a pass appends to its cache)."""
        return self.kv.fresh()

    def keep(self, which: torch.Tensor) -> None:
        """Only the requests where ``which`` (n,) bool is true are computed from now on."""
        idx = torch.nonzero(which.to(self.rows.mask.device)).flatten()  # (m,)
        rewrite = (idx[:, None] * self.n_ctx + torch.arange(self.n_ctx, device=idx.device)
                   ).flatten()
        rows = torch.cat([rewrite, self.n * self.n_ctx + idx])  # (m * (n_ctx + 1),)
        self.targets = [self.targets[i] for i in rewrite.tolist()]
        self.rows = self.rows.select(rows, idx)
        self.kv = self.kv.select(rows)
        if self.z_out is not None:
            hidden = block_hidden(self.z_out)
            self.z_out = with_hidden(self.z_out, hidden[rows.to(hidden.device)])
        self.n = len(idx)
        self._index()

    def _hidden(self, delta: torch.Tensor) -> torch.Tensor:
        """Block ``loss_layer``'s output (N, S, d_model), exact at ``self.needed`` only."""
        handle, found = self.handle, {}
        owner = self.rows.owner.to(delta.device)

        def add_delta(module, args, output):
            hidden = block_hidden(output)  # (N, S, d_model)
            if self.z_out is None:
                self.z_out = output
                self.h_init = hidden[self.first_rows.to(hidden.device), 0].detach().float()
            # an embedding lookup, not delta[owner]: its backward sums each request's rows in
            # a fixed order on the CPU and the GPU, where indexing's (index_put_ accumulating)
            # adds them with atomics on several CPU threads, and index_select's on the GPU
            # (torch.use_deterministic_algorithms lists both)
            added = torch.nn.functional.embedding(owner, delta).to(hidden)  # (N, d_model)
            moved = hidden[:, :1] + added[:, None]  # column 0: the subject's last token
            return with_hidden(output, torch.cat([moved, hidden[:, 1:]], 1))

        def keep(module, args, output):
            found["out"] = block_hidden(output)

        def map_output(module, args, output):
            self.map_init = output[self.first_rows.to(output.device), 0].detach().float()

        hooks = [(handle.layer_module(self.z_layer), "post", add_delta),
                 (handle.layer_module(self.loss_layer), "post", keep)]
        if self.z_out is None:
            hooks.append((handle.edited_module(self.z_layer), "post", map_output))
        with ExitStack() as patches:
            if self.z_out is not None:
                patches.enter_context(replay_blocks(handle, self.z_layer, self.z_out))
            for layer in range(self.z_layer + 1, self.loss_layer):  # not on the right padding
                patches.enter_context(mlp_only_at(handle, layer, *self.real))
            if self.loss_layer > self.z_layer:  # its output is read only where the loss reads
                patches.enter_context(mlp_only_at(handle, self.loss_layer, *self.needed))
            patches.enter_context(compute_dtype(self.handle, self.dtype, short_queries=True,
                                                             device=delta.device))
            forward_until(handle, self.rows.suffix_inputs(self.new_cache()), self.loss_layer,
                          hooks)
        return found["out"]

    def __call__(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.low.swapped():  # the blocks' and the head's lowered weights, once per pass
            out = self._hidden(delta)
            dev = out.device
            # one pass of the LM head over every position the loss reads: the target tokens'
            # rows, then the KL prompts' subject tokens (one product over the vocabulary)
            with compute_dtype(self.handle, self.dtype, device=dev):  # the loss: float32
                logits = _logits(self.handle,
                                 out[self.needed[0].to(dev), self.needed[1].to(dev)])
        dev = logits.device  # the LM head's device
        n_tok = self.t_tok.shape[0]
        tok_logits = logits[:n_tok]  # (n_tok, vocab)
        tok = self.t_tok.to(dev)
        tok_nll = torch.nn.functional.cross_entropy(tok_logits, tok, reduction="none")
        row_nll = torch.zeros(self.n * self.n_ctx, device=dev).index_add(
            0, self.t_row.to(dev), tok_nll)
        nll = (row_nll / self.t_len.to(dev)).view(self.n, self.n_ctx).mean(1)  # (n,)
        missed = torch.zeros(self.n * self.n_ctx, device=dev).index_add(
            0, self.t_row.to(dev), (tok_logits.argmax(-1) != tok).float())
        self.top1 = (missed.view(self.n, self.n_ctx).sum(1) == 0).to(delta.device)  # (n,)
        kl_logp = logits[n_tok:].log_softmax(-1)  # (n, vocab)
        return nll.to(delta.device), kl_logp.to(delta.device)
