"""FT-L: fine-tuning of one layer's MLP output map (ROME's and AlphaEdit's baselines/ft).

Per batch, as baselines/ft/ft_main.py: up to ``steps`` epochs over the batch in mini-batches of
``batch_size`` requests; each mini-batch's loss is the mean, over its requests, of the mean NLL
of the target tokens all read at the prompt's last token ("prompt_last": every target token is
scored as the next token after the prompt); Adam steps only while that loss is at least 1e-2,
and the epochs stop once their mean loss is below 1e-2. After each step the change of the map
(weight, and bias where there is one) since the batch began is clamped element-wise to
[-norm_constraint, norm_constraint]; ``norm_constraint: null`` fine-tunes without it.
"""

from __future__ import annotations

import torch

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editing.keys import template_keys_and_hidden
from rlsedit_cli.editors.base import Editor
from rlsedit_cli.models.tokens import encode_prompt, encode_target, pad

STOP_LOSS = 1e-2  # ft_main.py: no step below it; the epochs end when their mean is below it


class FT(Editor):
    def __init__(self, handle, anchor=None, *, name: str = "ft", layer: int, steps: int, lr: float,
                 norm_constraint: float | None, batch_size: int = 64,
                 weight_decay: float = 0.0) -> None:
        handle.check_layers([layer], "editor.layer")
        self.handle, self.name, self.layer = handle, name, int(layer)
        self.steps, self.lr, self.eps = int(steps), float(lr), norm_constraint
        self.batch_size, self.weight_decay = int(batch_size), float(weight_decay)
        self.masters: list[torch.Tensor] = []  # float32 copies of a low-precision map
        self._written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def edited_layers(self) -> list[int]:
        return [self.layer]

    def loss(self, requests: list[Record]) -> torch.Tensor:
        """Mean over ``requests`` of the mean target-token NLL, every target token read at the
        prompt's last token."""
        tok = self.handle.tok
        prompts = [encode_prompt(tok, r.rewrite_prompt) for r in requests]
        targets = [encode_target(tok, r.target_new) for r in requests]
        ids, mask = pad(prompts, tok.pad_token_id, device=self.handle.device)
        t_ids, t_mask = pad(targets, 0, device=self.handle.device)  # (n, T)
        last = mask.sum(1) - 1  # right padding: the prompt's last token
        logits = self.handle.model(input_ids=ids, attention_mask=mask).logits
        logp = logits[torch.arange(len(requests), device=ids.device), last].float()
        picked = logp.log_softmax(-1).gather(1, t_ids) * t_mask  # (n, T)
        return (-picked.sum(1) / t_mask.sum(1)).mean()

    def _masters(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the optimiser steps: the parameters themselves in float32, else float32 master
        copies kept across batches (a bf16 model's weights then round once per step, not the
        optimiser's state; editors/base.py's MasterWeights does the same for the others)."""
        if all(p.dtype == torch.float32 for p in params):
            return params
        if len(self.masters) != len(params):
            self.masters = [p.detach().float().clone() for p in params]
        return self.masters

    def edit(self, batch: list[Record]) -> dict[str, float]:
        module = self.handle.edited_module(self.layer)
        params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
        work = self._masters(params)
        start = [w.detach().clone() for w in work]
        opt = torch.optim.Adam(work, lr=self.lr, weight_decay=self.weight_decay)
        chunks = [batch[i : i + self.batch_size] for i in range(0, len(batch), self.batch_size)]
        epochs = []
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                for _ in range(self.steps):
                    total = 0.0
                    for chunk in chunks:
                        opt.zero_grad(set_to_none=True)
                        loss = self.loss(chunk)
                        total += float(loss.detach()) * len(chunk)
                        if float(loss.detach()) >= STOP_LOSS:
                            loss.backward()
                            for w, p in zip(work, params):
                                if w is not p:
                                    w.grad = p.grad.float()
                            opt.step()
                        with torch.no_grad():
                            for w, w0, p in zip(work, start, params):
                                if self.eps is not None:
                                    w.copy_(w0 + (w - w0).clamp(-self.eps, self.eps))
                                if w is not p:
                                    p.copy_(w)
                    epochs.append(total / len(batch))
                    if epochs[-1] < STOP_LOSS:
                        break
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        self._written = self._outputs_at_keys(batch)
        return {"ft_loss_before": epochs[0], "ft_loss_after": epochs[-1],
                "ft_epochs": float(len(epochs)),
                f"layer{self.layer}/update_norm": float((work[0].detach() - start[0]).norm())}

    def _outputs_at_keys(self, batch: list[Record]) -> dict[int, tuple[torch.Tensor,
                                                                        torch.Tensor]]:
        """FT has no target values: what it wrote is the map's output, after the batch, at each
        request's key (the map's input at the subject's last token of its plain prompt)."""
        keys, _ = template_keys_and_hidden(self.handle, batch, ["{}"], self.layer, self.layer)
        K = keys[:, 0].T  # (d_in, n)
        W = self.handle.weight(self.layer).detach().float()  # (d_out, d_in)
        K = K.to(W.device)
        return {self.layer: (K, W @ K)}

    def written(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return self._written

    def state_dict(self) -> dict:
        return {"masters": self.masters}

    def load_state_dict(self, state: dict) -> None:
        device = self.handle.edited_module(self.layer).weight.device
        self.masters = [m.to(device) for m in state.get("masters", [])]
