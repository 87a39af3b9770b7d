"""FT-L: constrained fine-tuning of one layer's MLP output map on the target tokens.

Per batch: ``steps`` Adam steps on the mean target-token NLL of the rewrite prompts (teacher
forced), after each step the weight change since the batch began is clamped to
[-norm_constraint, norm_constraint] element-wise (infinity norm); ``norm_constraint: null``
fine-tunes without the constraint.
"""

from __future__ import annotations

import torch

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editors.base import Editor
from rlsedit_cli.errors import ConfigError
from rlsedit_cli.models.tokens import encode_prompt, encode_target, pad


class FT(Editor):
    def __init__(self, handle, anchor=None, *, name: str = "ft", layer: int, steps: int, lr: float,
                 norm_constraint: float | None) -> None:
        handle.check_layers([layer], "editor.layer")
        if steps < 1 or not lr > 0:
            raise ConfigError(f"editor.steps={steps} must be >= 1 and editor.lr={lr} > 0")
        if norm_constraint is not None and not norm_constraint > 0:
            raise ConfigError(f"editor.norm_constraint={norm_constraint} must be > 0 or null")
        self.handle, self.name, self.layer = handle, name, int(layer)
        self.steps, self.lr, self.eps = int(steps), float(lr), norm_constraint

    @property
    def edited_layers(self) -> list[int]:
        return [self.layer]

    def _batch(self, batch: list[Record]):
        tok = self.handle.tok
        seqs, spans = [], []
        for r in batch:
            p, t = encode_prompt(tok, r.rewrite_prompt), encode_target(tok, r.target_new)
            seqs.append(p + t)
            spans.append((len(p), len(t)))
        ids, mask = pad(seqs, tok.pad_token_id, device=self.handle.device)
        labels = torch.full_like(ids, -100)
        for i, (p_len, t_len) in enumerate(spans):
            labels[i, p_len : p_len + t_len] = ids[i, p_len : p_len + t_len]
        return ids, mask, labels

    def edit(self, batch: list[Record]) -> dict[str, float]:
        weight = self.handle.edited_module(self.layer).weight
        start = weight.detach().clone()
        ids, mask, labels = self._batch(batch)
        weight.requires_grad_(True)
        opt = torch.optim.Adam([weight], lr=self.lr)
        losses = []
        try:
            with torch.enable_grad():
                for _ in range(self.steps):
                    logits = self.handle.model(input_ids=ids, attention_mask=mask).logits
                    logp = logits[:, :-1].float().log_softmax(-1)
                    tgt = labels[:, 1:]
                    nll = -logp.gather(2, tgt.clamp(min=0)[..., None])[..., 0] * (tgt >= 0)
                    loss = (nll.sum(1) / (tgt >= 0).sum(1)).mean()
                    losses.append(float(loss.detach()))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if self.eps is not None:
                        with torch.no_grad():
                            weight.copy_(start + (weight - start).clamp(-self.eps, self.eps))
        finally:
            weight.requires_grad_(False)
            weight.grad = None
        return {"ft_loss_before": losses[0], "ft_loss_after": losses[-1],
                f"layer{self.layer}/update_norm": float((weight.detach() - start).norm())}
