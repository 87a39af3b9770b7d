"""The target loss by its definition: one plain forward pass of the whole model per prompt.

This is what :class:`rlsedit_cli.editing.targets.TargetLoss` computes fast (cached prefixes,
replayed blocks, MLPs cut to the positions that count); tests hold the two equal on every
architecture. It is slow and meant to be read: the delta of request i is added to the residual
stream after block ``z_layer`` at the subject's last token of each of its prompts, and the
model's own logits give the target tokens' NLL and the next-token distribution at the subject's
last token of the KL prompt "{subject} is a" (MEMIT's compute_z.py, ROME's compute_v.py).
"""

from __future__ import annotations

import torch

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.models.handle import ModelHandle, block_hidden, with_hidden
from rlsedit_cli.models.tokens import encode_prompt, encode_target, subject_last_index

KL_PROMPT = "{} is a"


def _log_probs(handle: ModelHandle, template: str, subject: str, extra: list[int],
               z_layer: int, delta: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (T, vocab) of one prompt (plus ``extra`` tokens), with
    ``delta`` (d_model) added after block ``z_layer`` at the subject's last token, and that
    token's index."""
    ids = encode_prompt(handle.tok, template.format(subject)) + list(extra)
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
            logp, _ = _log_probs(handle, context.format(request.prompt), request.subject,
                              target[:-1], z_layer, d)
            first = logp.shape[0] - len(target)  # the prompt's last token predicts target[0]
            picked = logp[first + torch.arange(len(target)), torch.tensor(target)]
            per_template.append(-picked.mean())
        nll.append(torch.stack(per_template).mean())
        logp, at = _log_probs(handle, KL_PROMPT, request.subject, [], z_layer, d)
        kl_logp.append(logp[at])
    return torch.stack(nll), torch.stack(kl_logp)
