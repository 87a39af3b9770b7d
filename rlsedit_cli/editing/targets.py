"""Batched target-value optimisation (docs/design.md section 4.2), shared by the key-value
editors.

For each request i an additive delta_i (d_model) is added to the residual stream after block
``z_layer`` at the subject's last token, in every context-prefixed rewrite prompt and in the KL
prompt "{subject} is a" (whose next-token distribution is read at that same token, as MEMIT's
compute_z.py and ROME's compute_v.py read it). All requests of a chunk go through ONE
forward/backward per step: each delta_i only reaches its own rows, so the summed loss gives
every request exactly the gradient it would get alone, and Adam (element-wise) follows the same
trajectory as one-at-a-time runs. The loss of a step is editing/reference.py's
:class:`FullForwardLoss` (the references' full pass), or where the ``target_loss`` acceleration
runs, accel/target_loss.py's :class:`TargetLoss` (the same values, the work the deltas cannot
change done once).

Per request, as in MEMIT: loss_i = mean over its prompts of the mean target-token NLL
+ kl_factor * KL(p_now || p_init) on the KL prompt + weight_decay * ||delta_i|| / ||h_i||^2,
with h_i the unedited hidden state (or the edited map's output there, for ROME); a request
stops once its loss is below ``early_stop_loss`` (or, with ``stop_when_top1``, as ENCORE does,
once each target token is the most likely one after every prompt; with ``stop_below_nll``, once
its mean target NLL alone is below that); after each step
||delta_i|| is clamped to ``clamp_norm_factor * ||h_i||``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlsedit_cli.accel.target_loss import TargetLoss
from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editing.reference import FullForwardLoss
from rlsedit_cli.models.handle import ModelHandle


@dataclass
class TargetResult:
    """z = h + delta per request, (n, d_model) float32, and optimisation diagnostics."""

    z: torch.Tensor
    init_loss: torch.Tensor  # (n,) NLL before optimisation
    final_loss: torch.Tensor  # (n,) NLL at the last step
    final_kl: torch.Tensor  # (n,) KL(p_now || p_init) after the KL prompt's subject, last step
    steps: torch.Tensor  # (n,) optimiser steps taken


def kl_divergence(logp: torch.Tensor, logp_init: torch.Tensor) -> torch.Tensor:
    """KL(p || p_init) per row of log-probabilities (n, vocab) -> (n,)."""
    return (logp.exp() * (logp - logp_init)).sum(-1)


def optimise_targets(handle: ModelHandle, requests: list[Record], templates: list[str],
                     z_layer: int, cfg, scale_by: str = "residual",
                     loss: type | None = None, on_step=None) -> TargetResult:
    """Target hidden states z for ``requests`` (in chunks of ``cfg.chunk_size``).

    ``scale_by``: the norm that scales the weight decay and the clamp: of the residual stream
    after ``z_layer`` (MEMIT's compute_z.py) or of the edited map's output there ("map": ROME's
    compute_v.py, whose target is the MLP's output). ``loss``: how the loss is computed
    (:class:`TargetLoss` or :class:`FullForwardLoss`; None: the first where the ``target_loss``
    acceleration runs on the handle's device, else the second). ``on_step(step, nll)``, when
    given, sees each step's target NLL of the requests still optimised ((m,), detached).
    """
    if loss is None:
        loss = TargetLoss if handle.accel.on("target_loss", handle.device) else FullForwardLoss
    parts = [_optimise_chunk(handle, requests[s : s + cfg.chunk_size], templates, z_layer, cfg,
                             scale_by, loss, on_step)
             for s in range(0, len(requests), max(1, cfg.chunk_size))]
    return TargetResult(*(torch.cat([getattr(p, f) for p in parts])
                          for f in ("z", "init_loss", "final_loss", "final_kl", "steps")))


def _optimise_chunk(handle: ModelHandle, requests: list[Record], templates: list[str],
                    z_layer: int, cfg, scale_by: str, loss: type, on_step=None) -> TargetResult:
    """Adam on the deltas of one chunk; each request stops on its own (see module doc).

    A request that stopped keeps its delta; from the next step on, a loss that can
    (:meth:`TargetLoss.keep`) computes only the requests still running: each request's loss and
    gradient depend on its own rows only, so this changes no figure, only the time.
    """
    target_loss = loss(handle, requests, templates, z_layer, int(cfg.loss_layer),
                       dtype=cfg.compute_dtype)
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
            if on_step is not None:
                on_step(it, nll.detach())
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
