"""The target loss by its definition: one plain forward pass of the whole model per prompt.

This is what :class:`rlsedit_cli.accel.target_loss.TargetLoss` computes fast (cached prefixes,
replayed blocks, MLPs cut to the positions that count); tests hold the two equal on every
architecture. It is slow and meant to be read: the delta of request i is added to the residual
stream after block ``z_layer`` at the subject's last token of each of its prompts, and the
model's own logits give the target tokens' NLL and the next-token distribution at the subject's
last token of the KL prompt "{subject} is a" (MEMIT's compute_z.py, ROME's compute_v.py).
"""

from __future__ import annotations

import torch

from rlsedit_cli.accel.precision import compute_dtype
from rlsedit_cli.datasets.records import Record, fill
from rlsedit_cli.editing.inputs import build_rows
from rlsedit_cli.models.handle import ModelHandle, block_hidden, with_hidden
from rlsedit_cli.models.tokens import encode_prompt, encode_target, subject_last_index

KL_PROMPT = "{} is a"


def _log_probs(handle: ModelHandle, template: str, subject: str, extra: list[int],
               z_layer: int, delta: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (T, vocab) of one prompt (plus ``extra`` tokens), with
    ``delta`` (d_model) added after block ``z_layer`` at the subject's last token, and that
    token's index."""
    ids = encode_prompt(handle.tok, fill(template, subject)) + list(extra)
    at = subject_last_index(handle.tok, template, subject)

    def add(module, args, output):
        hidden = block_hidden(output).clone()  # (1, T, d_model)
        hidden[0, at] += delta.to(hidden)
        return with_hidden(output, hidden)

    hook = handle.layer_module(z_layer).register_forward_hook(add)
    try:
        logits = handle.model(input_ids=torch.tensor([ids], device=handle.device)).logits
    finally:
        hook.remove()
    return logits[0].float().log_softmax(-1), at


def plain_target_loss(handle: ModelHandle, requests: list[Record], templates: list[str],
                      z_layer: int, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request: the mean over ``templates`` of the mean NLL of its target tokens (n,), and
    the next-token log-probabilities at the subject's last token of its KL prompt (n, vocab);
    ``delta`` is (n, d_model)."""
    nll, kl_logp = [], []
    for request, d in zip(requests, delta):
        target = encode_target(handle.tok, request.target_new)
        per_template = []
        for context in templates:
            logp, _ = _log_probs(handle, fill(context, request.prompt), request.subject,
                              target[:-1], z_layer, d)
            first = logp.shape[0] - len(target)  # the prompt's last token predicts target[0]
            picked = logp[first + torch.arange(len(target)), torch.tensor(target)]
            per_template.append(-picked.mean())
        nll.append(torch.stack(per_template).mean())
        logp, at = _log_probs(handle, KL_PROMPT, request.subject, [], z_layer, d)
        kl_logp.append(logp[at])
    return torch.stack(nll), torch.stack(kl_logp)


class FullForwardLoss:
    """The target loss as the references compute it at every step (MEMIT's compute_z.py): ONE
    left-padded forward pass of every prompt of the chunk (its rewrite prompts and KL prompts)
    through the whole model, log-softmax over the logits at every position, nothing cached.

    The same interface and values as :class:`rlsedit_cli.accel.target_loss.TargetLoss`; given one
    request at a time it is the references' one-request path, which ``rlsedit bench targets``
    times against the batched fast one.
    """

    def __init__(self, handle: ModelHandle, requests: list[Record], templates: list[str],
                 z_layer: int, loss_layer: int, dtype: str = "float32") -> None:
        del loss_layer  # the references read the model's own logits (its last layer)
        self.handle, self.z_layer, self.dtype = handle, z_layer, dtype  # dtype: of the products
        self.n, self.n_ctx = len(requests), len(templates)
        items, self.targets = [], []
        for i, r in enumerate(requests):
            t_ids = encode_target(handle.tok, r.target_new)
            for ctx in templates:
                items.append((fill(ctx, r.prompt), r.subject, t_ids[:-1], i))
                self.targets.append(t_ids)
        items += [(KL_PROMPT, r.subject, [], i) for i, r in enumerate(requests)]
        self.rows = build_rows(handle, items)
        self.first_rows = torch.arange(0, self.n * self.n_ctx, self.n_ctx)
        self.h_init = self.map_init = self.top1 = None

    def __call__(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, handle = self.rows, self.handle
        at = (torch.arange(len(rows.lookup), device=rows.lookup.device), rows.lookup)

        def add(module, args, output):
            hidden = block_hidden(output)  # (N, T, d_model)
            if self.h_init is None:
                self.h_init = hidden[at][self.first_rows].detach().float()
            # an embedding lookup: its backward sums in a fixed order (accel/target_loss.py)
            gathered = torch.nn.functional.embedding(rows.owner.to(delta.device), delta)
            moved = hidden.index_put(at, hidden[at] + gathered.to(hidden))
            return with_hidden(output, moved)

        def map_output(module, args, output):
            self.map_init = output[at][self.first_rows].detach().float()

        hooks = [handle.layer_module(self.z_layer).register_forward_hook(add)]
        if self.map_init is None:
            hooks.append(handle.edited_module(self.z_layer).register_forward_hook(map_output))
        try:
            with compute_dtype(handle, self.dtype):
                logits = handle.model(**rows.inputs, use_cache=False).logits  # (N, T, vocab)
        finally:
            for hook in hooks:
                hook.remove()
        logp = logits.float().log_softmax(-1)
        width = logp.shape[1]
        nll, hits = [], []
        for row, target in enumerate(self.targets):
            cols = width - len(target) + torch.arange(len(target))  # rows end at column T-1
            row_logp = logp[row, cols.to(logp.device)]  # (len(target), vocab)
            target_t = torch.tensor(target, device=logp.device)
            nll.append(-row_logp.gather(1, target_t[:, None]).mean())
            hits.append(bool((row_logp.argmax(-1) == target_t).all()))
        nll = torch.stack(nll).view(self.n, self.n_ctx).mean(1)
        self.top1 = torch.tensor(hits).view(self.n, self.n_ctx).all(1)
        kl_rows = torch.arange(self.n * self.n_ctx, len(rows.lookup), device=logp.device)
        return nll, logp[kl_rows, rows.lookup[kl_rows]]
