"""`rlsedit bench targets`: the batched target optimisation against one request at a time.

Three paths run the same optimisation (:func:`optimise_targets`: Adam, the same loss) on the
same requests (the first of the configured stream: the toy world on the shipped tiny GPT-2 by
default, any model and dataset config by overrides), with early stopping off so that all do the
same number of steps:

- batched: every request in one forward/backward per step, with the fast loss (cached
  prefixes, replayed blocks, MLPs cut to the positions that count);
- one at a time: the same fast loss, one request per call;
- the references' way: one request per call, each step one full forward pass of its prompts
  through the whole model with logits everywhere (:class:`FullForwardLoss`, as MEMIT's
  compute_z.py, which AlphaEdit's and the paper's code share).

Each path is warmed up, then timed ``repeat`` times in turn; the medians are reported, with how
far the targets of each path are from the batched ones.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from rlsedit_cli.config import TargetConfig
from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editing.reference import FullForwardLoss
from rlsedit_cli.editing.targets import optimise_targets
from rlsedit_cli.editing.templates import context_templates
from rlsedit_cli.models.handle import ModelHandle


def bench_targets(handle: ModelHandle, records: list[Record], z_layer: int,
                  target: TargetConfig, steps: int = 25, repeat: int = 3) -> dict:
    """Seconds for ``records`` optimised together and one by one, and the speed-up.

    ``target``: the model's target settings (conf/target/MODEL.yaml); early stopping is turned
    off and ``steps`` fixed so that both paths do the same work.
    """
    batch = len(records)
    cfg = replace(target, steps=steps, early_stop_loss=0.0, stop_when_top1=False,
                  chunk_size=batch)
    templates = context_templates(handle, cfg.context_templates, seed=0)
    sync = torch.cuda.synchronize if handle.device.type == "cuda" else (lambda: None)

    def together() -> torch.Tensor:
        return optimise_targets(handle, records, templates, z_layer, cfg).z

    def alone() -> torch.Tensor:
        return torch.cat([optimise_targets(handle, [r], templates, z_layer, cfg).z
                          for r in records])

    def references() -> torch.Tensor:  # one request at a time, a full forward every step
        return torch.cat([optimise_targets(handle, [r], templates, z_layer, cfg,
                                           loss=FullForwardLoss).z for r in records])

    def timed(fn) -> tuple[float, torch.Tensor]:
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    optimise_targets(handle, records[:2], templates, z_layer, cfg)  # warm-up
    paths = {"batched": together, "one_at_a_time": alone, "references_way": references}
    runs: dict[str, list[float]] = {name: [] for name in paths}
    z: dict[str, torch.Tensor] = {}
    for _ in range(max(1, repeat)):
        for name, fn in paths.items():
            seconds, z[name] = timed(fn)
            runs[name].append(seconds)
    med = {name: statistics.median(times) for name, times in runs.items()}
    gap = {name: float((z["batched"] - z[name]).norm() / z[name].norm()) for name in paths}
    step_flops = target_step_flops(handle, records, templates, z_layer, cfg)
    step_s = med["batched"] / max(1, steps - 1)  # the last step reads the loss and stops
    return {"bench": "targets", "device": str(handle.device), "model": str(handle.spec.name),
            "requests": batch, "templates": len(templates), "steps": steps, "repeat": repeat,
            "batched_s": round(med["batched"], 3),
            "one_at_a_time_s": round(med["one_at_a_time"], 3),
            "references_way_s": round(med["references_way"], 3),
            "speedup": round(med["one_at_a_time"] / med["batched"], 2),
            "speedup_vs_references_way": round(med["references_way"] / med["batched"], 2),
            "relative_difference": round(gap["one_at_a_time"], 8),
            "relative_difference_references_way": round(gap["references_way"], 8),
            **{f"{name}_runs_s": [round(x, 3) for x in times] for name, times in runs.items()},
            "step_gflop": round(step_flops / 1e9, 4),
            "step_gflops_achieved": round(step_flops / step_s / 1e9, 2),
            "gemm_gflops": round(gemm_rate(handle.device), 2)}


def target_step_flops(handle: ModelHandle, records, templates: list[str], z_layer: int,
                      cfg) -> float:
    """Floating-point operations of one batched target step (forward and backward), counted by
    torch's FlopCounterMode (matrix products; the elementwise rest is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rlsedit_cli.editing.targets import TargetLoss

    loss = TargetLoss(handle, records, templates, z_layer, int(cfg.loss_layer))
    d_model = handle.weight_shape(z_layer)[0]
    delta = torch.zeros(len(records), d_model, device=handle.weight(z_layer).device,
                        requires_grad=True)
    with torch.enable_grad():
        loss(delta)  # the first call records what later steps replay
        with FlopCounterMode(display=False) as counter:
            nll, _ = loss(delta)
            nll.sum().backward()
    return float(counter.get_total_flops())


def gemm_rate(device: torch.device, n: int = 2048, repeat: int = 3) -> float:
    """The machine's float32 matrix-multiply rate (GFLOP/s) on ``device``: a reference for how
    close a target step runs to the limit, timed in the same run."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm-up
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9
