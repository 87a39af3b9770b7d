"""`rlsedit bench targets`: the batched target optimisation against one request at a time.

Three paths run the same optimisation (:func:`optimise_targets`: Adam, the same loss) on the
same requests (the first of the configured stream: the toy world on the shipped tiny GPT-2 by
default, any model and dataset config by overrides), with early stopping off so that all do the
same number of steps:

- batched: every request in one forward/backward per step, with the fast loss (cached
  prefixes, replayed blocks, MLPs cut to the positions that count);
- batched, whole prefixes: the same, with each row's prefix run whole (the context templates'
  tokens once per row, not once per chunk: ``TargetLoss(share_prefixes=False)``);
- one at a time: the same fast loss, one request per call;
- the references' way: one request per call, each step one full forward pass of its prompts
  through the whole model with logits everywhere (:class:`FullForwardLoss`, as MEMIT's
  compute_z.py, which AlphaEdit's and the paper's code share).

Each path is warmed up, then timed ``repeat`` times in turn; the medians are reported, with how
far the targets of each path are from the batched ones. Then single batched steps are timed
between float32 GEMMs: the step's FLOPs, its GFLOP/s and its share of the GEMM rate.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from functools import partial

import torch

from rlsedit_cli.accel.target_loss import TargetLoss
from rlsedit_cli.bench.gemm import share_of_gemm, timed
from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editing.reference import FullForwardLoss
from rlsedit_cli.editing.targets import optimise_targets
from rlsedit_cli.editing.templates import context_templates
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.settings import TargetConfig


def bench_targets(handle: ModelHandle, records: list[Record], z_layer: int,
                  target: TargetConfig, steps: int = 25, repeat: int = 3,
                  step_repeat: int = 10) -> dict:
    """Seconds for ``records`` optimised together and one by one, and the speed-up; then
    ``step_repeat`` single batched steps against the GEMM rate (:func:`time_target_step`).

    ``target``: the model's target settings (conf/target/MODEL.yaml); every early stop is turned
    off and ``steps`` fixed so that all paths do the same work.
    """
    batch = len(records)
    cfg = replace(target, steps=steps, early_stop_loss=0.0, stop_when_top1=False,
                  stop_below_nll=None, chunk_size=batch)
    templates = context_templates(handle, cfg.context_templates, seed=0)

    def together() -> torch.Tensor:
        return optimise_targets(handle, records, templates, z_layer, cfg, loss=TargetLoss).z

    def whole() -> torch.Tensor:
        return optimise_targets(handle, records, templates, z_layer, cfg,
                                loss=partial(TargetLoss, share_prefixes=False)).z

    def alone() -> torch.Tensor:
        return torch.cat([optimise_targets(handle, [r], templates, z_layer, cfg, loss=TargetLoss).z
                          for r in records])

    def references() -> torch.Tensor:  # one request at a time, a full forward every step
        return torch.cat([optimise_targets(handle, [r], templates, z_layer, cfg,
                                           loss=FullForwardLoss).z for r in records])

    optimise_targets(handle, records[:2], templates, z_layer, cfg)  # warm-up
    paths = {"batched": together, "batched_whole_prefixes": whole, "one_at_a_time": alone,
             "references_way": references}
    runs: dict[str, list[float]] = {name: [] for name in paths}
    z: dict[str, torch.Tensor] = {}
    for _ in range(max(1, repeat)):
        for name, fn in paths.items():
            seconds, z[name] = timed(fn, handle.device)
            runs[name].append(seconds)
    med = {name: statistics.median(times) for name, times in runs.items()}
    gap = {name: float((z["batched"] - z[name]).norm() / z[name].norm()) for name in paths}
    return {"bench": "targets", "device": str(handle.device), "model": str(handle.spec.name),
            "requests": batch, "templates": len(templates), "steps": steps, "repeat": repeat,
            "batched_s": round(med["batched"], 3),
            "batched_whole_prefixes_s": round(med["batched_whole_prefixes"], 3),
            "one_at_a_time_s": round(med["one_at_a_time"], 3),
            "references_way_s": round(med["references_way"], 3),
            "speedup": round(med["one_at_a_time"] / med["batched"], 2),
            "speedup_vs_references_way": round(med["references_way"] / med["batched"], 2),
            "speedup_of_shared_prefixes": round(med["batched_whole_prefixes"] / med["batched"], 2),
            "relative_difference": round(gap["one_at_a_time"], 8),
            "relative_difference_whole_prefixes": round(gap["batched_whole_prefixes"], 8),
            "relative_difference_references_way": round(gap["references_way"], 8),
            **{f"{name}_runs_s": [round(x, 3) for x in times] for name, times in runs.items()},
            **time_target_step(handle, records, templates, z_layer, cfg, repeat=step_repeat)}


def time_target_step(handle: ModelHandle, records, templates: list[str], z_layer: int, cfg,
                     repeat: int = 10) -> dict:
    """One batched target step (forward, backward, Adam) against the machine's GEMM rate.

    The step's floating-point operations are counted by torch's FlopCounterMode (matrix products;
    the elementwise rest is not counted). Each of ``repeat`` timed steps sits between two timed
    float32 GEMMs (:func:`rlsedit_cli.bench.gemm.share_of_gemm`), so that its share of the GEMM
    rate compares the two at the same moment of a machine whose speed drifts; medians reported.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from rlsedit_cli.editing.targets import kl_divergence

    loss = TargetLoss(handle, records, templates, z_layer, int(cfg.loss_layer))
    d_model = handle.weight_shape(z_layer)[0]
    delta = torch.zeros(len(records), d_model, device=handle.weight(z_layer).device,
                        requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    with torch.enable_grad():
        kl_init = loss(delta)[1].detach()  # the first call records what later steps replay

        def step() -> None:
            nll, kl_logp = loss(delta)
            (nll + cfg.kl_factor * kl_divergence(kl_logp, kl_init)).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with FlopCounterMode(display=False) as counter:
            step()
        flops = float(counter.get_total_flops())
        measure = share_of_gemm(handle.device)
        _, seconds, rates, shares = zip(*(measure(step, flops) for _ in range(max(1, repeat))))
    step_s = statistics.median(seconds)
    return {"step_gflop": round(flops / 1e9, 4), "step_s": round(step_s, 4),
            "step_gflops_achieved": round(flops / step_s / 1e9, 2),
            "gemm_gflops": round(statistics.median(rates), 2),
            "step_share_of_gemm": round(statistics.median(shares), 3),
            "step_share_runs": [round(x, 3) for x in shares]}
