"""The two architecture facts the editing pipeline relies on, checked on the loaded model.

1. The edited map's output is added to the residual stream as it is: a change d of its output at
   one position changes the block's output there by exactly d (no norm after the MLP, as
   Gemma-2's post-feed-forward norm would add).
2. The logits are ``lm_head(ln_f(h))`` of the last block's output h, nothing after (no logit
   soft-capping, as Gemma-2 has).

The target loss (editing/targets.py) and the residuals R = z - h assume both; conf/model files
declare them (``mlp_out_is_residual``, ``logits_are_head_of_norm``) and the loader refuses a
model for which either is declared false or does not hold numerically.
"""

from __future__ import annotations

import torch

from rlsedit_cli.errors import ModelLoadError
from rlsedit_cli.models.handle import ModelHandle, block_hidden

TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}


def _forward(handle: ModelHandle, ids: torch.Tensor, layer: int, change: torch.Tensor | None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass on ``ids``, with ``change`` added to the edited map's output of
    ``layer`` at the last position. Returns block ``layer``'s output (T, d_model), the last
    block's output (1, T, d_model) and the logits (T, vocab)."""
    found = {}

    def add(module, args, output):
        out = output.clone()
        out[:, -1] += change.to(out)
        return out

    def keep(name):
        return lambda module, args, output: found.update({name: block_hidden(output)})

    hooks = [handle.layer_module(layer).register_forward_hook(keep("h")),
             handle.layer_module(handle.num_layers - 1).register_forward_hook(keep("last"))]
    if change is not None:
        hooks.append(handle.edited_module(layer).register_forward_hook(add))
    try:
        logits = handle.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    finally:
        for h in hooks:
            h.remove()
    return found["h"][0].float(), found["last"], logits


@torch.no_grad()
def check_facts(handle: ModelHandle) -> None:
    """Raise :class:`ModelLoadError` (one line) if the pipeline's assumptions do not hold."""
    spec, name = handle.spec, handle.spec.name
    for key in ("mlp_out_is_residual", "logits_are_head_of_norm"):
        if not bool(getattr(spec, key, True)):
            raise ModelLoadError(f"model={name} declares {key}: false; the editing pipeline "
                                 "needs both architecture facts (see rlsedit_cli/models/facts.py)")
    ids = torch.tensor([handle.tok("The capital of France is")["input_ids"][:8]],
                       device=handle.device)
    layer = int(spec.edit_layers[0])
    d_model = handle.weight_shape(layer)[0]
    hidden, last, logits = _forward(handle, ids, layer, None)
    base = hidden[-1]  # (d_model,)
    wanted = torch.randn(d_model, generator=torch.Generator().manual_seed(0))
    wanted = wanted * base.norm().cpu() / wanted.norm()  # as large as the residual stream
    moved = _forward(handle, ids, layer, wanted)[0][-1]
    wanted = wanted.to(moved.device)
    tol = TOLERANCE.get(handle.model.dtype, 1e-3)
    if (moved - base - wanted).norm() > tol * wanted.norm():
        raise ModelLoadError(f"model={name}: a change of the MLP output of layer {layer} does not "
                             "reach the residual stream as it is (a norm after the MLP?); the "
                             "editing pipeline cannot edit this architecture")
    ln_f, head = handle.module(spec.ln_f), handle.module(spec.lm_head)
    ours = head(ln_f(last))[0].float()
    if (ours - logits.to(ours.device)).norm() > tol * logits.norm():
        raise ModelLoadError(f"model={name}: its logits are not {spec.lm_head}({spec.ln_f}(h)) of "
                             "the last block's output (logit soft-capping?); the target loss "
                             "would differ from the model's own")
