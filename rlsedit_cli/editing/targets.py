"""Batched target-value optimisation (docs/design.md section 4.2), shared by the key-value
editors.

For each request i an additive delta_i (d_model) is added to the residual stream after block
``z_layer`` at the subject's last token, in every context-prefixed rewrite prompt and in the KL
prompt "{subject} is a" (whose next-token distribution is read at that same token, as MEMIT's
compute_z.py and ROME's compute_v.py read it). All requests of a chunk go through ONE
forward/backward per step: each delta_i only reaches its own rows, so the summed loss gives
every request exactly the gradient it would get alone, and Adam (element-wise) follows the same
trajectory as one-at-a-time runs.

Work that the deltas cannot change is done once, not at every step: the tokens before the
subject's last token (their keys and values are cached, :func:`prefix_cache`; the tokens a
context template puts before every request's prompt run once per chunk) and blocks
0..``z_layer`` on the remaining tokens (replayed, :func:`replay_blocks`). Work the loss cannot
see is not done: the MLPs of the re-run blocks skip the suffix's padding and the KL prompts'
tokens after the subject, and block
``loss_layer``'s runs only at the positions the loss reads (:func:`mlp_only_at`).

Per request, as in MEMIT: loss_i = mean over its prompts of the mean target-token NLL
+ kl_factor * KL(p_now || p_init) on the KL prompt + weight_decay * ||delta_i|| / ||h_i||^2,
with h_i the unedited hidden state (or the edited map's output there, for ROME); a request
stops once its loss is below ``early_stop_loss`` (or, with ``stop_when_top1``, as ENCORE does,
once each target token is the most likely one after every prompt; with ``stop_below_nll``, once
its mean target NLL alone is below that); after each step
||delta_i|| is clamped to ``clamp_norm_factor * ||h_i||``.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch

from rlsedit_cli.datasets.records import Record, fill
from rlsedit_cli.editing.inputs import (
    SplitRows,
    build_split_rows,
    forward_until,
    mlp_only_at,
    prefix_cache,
    replay_blocks,
)
from rlsedit_cli.editing.reference import KL_PROMPT
from rlsedit_cli.models.handle import ModelHandle, block_hidden, with_hidden
from rlsedit_cli.models.precision import LoweredLinears, compute_dtype
from rlsedit_cli.models.tokens import encode_target


@dataclass
class TargetResult:
    """z = h + delta per request, (n, d_model) float32, and optimisation diagnostics."""

    z: torch.Tensor
    init_loss: torch.Tensor  # (n,) NLL before optimisation
    final_loss: torch.Tensor  # (n,) NLL at the last step
    final_kl: torch.Tensor  # (n,) KL(p_now || p_init) after the KL prompt's subject, last step
    steps: torch.Tensor  # (n,) optimiser steps taken


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


def kl_divergence(logp: torch.Tensor, logp_init: torch.Tensor) -> torch.Tensor:
    """KL(p || p_init) per row of log-probabilities (n, vocab) -> (n,)."""
    return (logp.exp() * (logp - logp_init)).sum(-1)


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

    share_prefixes = True

    def __init__(self, handle: ModelHandle, requests: list[Record], templates: list[str],
                 z_layer: int, loss_layer: int, dtype: str = "float32") -> None:
        self.handle, self.z_layer, self.dtype = handle, z_layer, dtype
        self.loss_layer = max(loss_layer, z_layer)
        self.n, self.n_ctx = len(requests), len(templates)
        self.rows, self.targets = _rows(handle, requests, templates, self.share_prefixes)
        # the frozen blocks' and the LM head's weights in ``dtype``, cast once (bfloat16)
        self.low = LoweredLinears([*(handle.layer_module(i) for i in range(self.loss_layer + 1)),
                                   handle.module(handle.spec.lm_head)], dtype)
        with compute_dtype(handle.device, dtype), self.low.swapped():
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
            moved = hidden[:, :1] + delta[owner].to(hidden)[:, None]  # column 0: subject's last
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
            patches.enter_context(compute_dtype(delta.device, self.dtype, short_queries=True))
            forward_until(handle, self.rows.suffix_inputs(self.new_cache()), self.loss_layer,
                          hooks)
        return found["out"]

    def __call__(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.low.swapped():  # the blocks' and the head's lowered weights, once per pass
            out = self._hidden(delta)
            dev = out.device
            # one pass of the LM head over every position the loss reads: the target tokens'
            # rows, then the KL prompts' subject tokens (one product over the vocabulary)
            with compute_dtype(dev, self.dtype):  # the loss below in float32
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


def optimise_targets(handle: ModelHandle, requests: list[Record], templates: list[str],
                     z_layer: int, cfg, scale_by: str = "residual",
                     loss: type = TargetLoss) -> TargetResult:
    """Target hidden states z for ``requests`` (in chunks of ``cfg.chunk_size``).

    ``scale_by``: the norm that scales the weight decay and the clamp: of the residual stream
    after ``z_layer`` (MEMIT's compute_z.py) or of the edited map's output there ("map": ROME's
    compute_v.py, whose target is the MLP's output). ``loss``: how the loss is computed (the
    fast :class:`TargetLoss`, or the references' full forward pass,
    :class:`rlsedit_cli.editing.reference.FullForwardLoss`, for benchmarks and tests).
    """
    parts = [_optimise_chunk(handle, requests[s : s + cfg.chunk_size], templates, z_layer, cfg,
                             scale_by, loss)
             for s in range(0, len(requests), max(1, cfg.chunk_size))]
    return TargetResult(*(torch.cat([getattr(p, f) for p in parts])
                          for f in ("z", "init_loss", "final_loss", "final_kl", "steps")))


def _optimise_chunk(handle: ModelHandle, requests: list[Record], templates: list[str],
                    z_layer: int, cfg, scale_by: str, loss: type) -> TargetResult:
    """Adam on the deltas of one chunk; each request stops on its own (see module doc).

    A request that stopped keeps its delta; from the next step on, a loss that can
    (:meth:`TargetLoss.keep`) computes only the requests still running: each request's loss and
    gradient depend on its own rows only, so this changes no figure, only the time.
    """
    target_loss = loss(handle, requests, templates, z_layer, int(cfg.loss_layer),
                       **({"dtype": cfg.compute_dtype} if issubclass(loss, TargetLoss) else {}))
    compacts = hasattr(target_loss, "keep")
    n = len(requests)
    z_device = handle.weight(z_layer).device  # layers may sit on several GPUs (device_map)
    d_model = handle.weight_shape(z_layer)[0]
    delta = torch.zeros(n, d_model, device=z_device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    active = torch.ones(n, dtype=torch.bool, device=z_device)
    idx = torch.arange(n, device=z_device)  # the requests the loss computes, (m,)
    steps = torch.zeros(n, dtype=torch.long, device=z_device)
    final_loss = torch.zeros(n, device=z_device)
    final_kl = torch.zeros(n, device=z_device)
    init_loss = kl_init = h_norm = None
    with torch.enable_grad():
        for it in range(int(cfg.steps)):
            nll, kl_logp = target_loss(delta[idx] if compacts else delta)  # (m,), (m, vocab)
            top1 = target_loss.top1
            if not compacts:
                nll, kl_logp, top1 = nll[idx], kl_logp[idx], top1.to(z_device)[idx]
            if kl_init is None:
                kl_init, init_loss = kl_logp.detach(), nll.detach()
                scale = target_loss.h_init if scale_by == "residual" else target_loss.map_init
                h_norm = scale.to(z_device).norm(dim=-1)  # (n,)
            kl = kl_divergence(kl_logp, kl_init[idx])
            loss = (nll + cfg.kl_factor * kl
                    + cfg.weight_decay * delta[idx].norm(dim=-1) / h_norm[idx] ** 2)
            final_loss[idx], final_kl[idx] = nll.detach(), kl.detach()
            stop = loss.detach() < cfg.early_stop_loss  # (m,)
            if cfg.stop_when_top1:  # ENCORE's early stop: the target already wins everywhere
                stop |= top1.to(stop.device)
            if cfg.stop_below_nll is not None:  # the target NLL alone, without the KL and decay
                stop |= nll.detach().to(stop.device) < cfg.stop_below_nll
            active[idx[stop]] = False
            if not bool(active.any()) or it == int(cfg.steps) - 1:
                break
            frozen = delta.detach()[~active].clone()
            opt.zero_grad(set_to_none=True)
            loss[~stop].sum().backward()
            opt.step()
            with torch.no_grad():
                delta[~active] = frozen
                steps += active.long()
                max_norm = cfg.clamp_norm_factor * h_norm
                delta.mul_((max_norm / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)[:, None])
            if bool(stop.any()):
                if compacts:
                    target_loss.keep(~stop)
                idx = idx[~stop]
    z = target_loss.h_init.to(z_device) + delta.detach()
    return TargetResult(z=z, init_loss=init_loss, final_loss=final_loss, final_kl=final_kl,
                        steps=steps)
