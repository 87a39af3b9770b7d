"""`rlsedit bench targets`: the batched target optimisation against one request at a time.

Both paths run the same optimisation (:func:`optimise_targets`) on the same requests of the toy
world, on the shipped tiny GPT-2 (or any model config), with early stopping off so that both do
the same number of steps; the result also reports how far apart the targets are. Both paths
are warmed up once, then timed ``repeat`` times, alternating; the medians are reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from rlsedit_cli.config import TargetConfig
from rlsedit_cli.datasets.toy import load as load_toy
from rlsedit_cli.editing.targets import optimise_targets
from rlsedit_cli.editing.templates import context_templates
from rlsedit_cli.models.handle import ModelHandle


def bench_targets(handle: ModelHandle, bundle: str, batch: int, z_layer: int,
                  target: TargetConfig, steps: int = 25, repeat: int = 3) -> dict:
    """Seconds for ``batch`` requests optimised together and one by one, and the speed-up.

    ``target``: the model's target settings (conf/target/MODEL.yaml); early stopping is turned
    off and ``steps`` fixed so that both paths do the same work.
    """
    records = load_toy(bundle).records[:batch]
    cfg = replace(target, steps=steps, early_stop_loss=0.0, chunk_size=batch)
    templates = context_templates(handle, cfg.context_templates, seed=0)
    sync = torch.cuda.synchronize if handle.device.type == "cuda" else (lambda: None)

    def together() -> torch.Tensor:
        return optimise_targets(handle, records, templates, z_layer, cfg).z

    def alone() -> torch.Tensor:
        return torch.cat([optimise_targets(handle, [r], templates, z_layer, cfg).z
                          for r in records])

    def timed(fn) -> tuple[float, torch.Tensor]:
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    optimise_targets(handle, records[:2], templates, z_layer, cfg)  # warm-up
    batched, single = [], []
    for _ in range(max(1, repeat)):
        seconds, z_together = timed(together)
        batched.append(seconds)
        seconds, z_alone = timed(alone)
        single.append(seconds)
    batched_s, single_s = statistics.median(batched), statistics.median(single)
    gap = float((z_together - z_alone).norm() / z_alone.norm())
    step_flops = target_step_flops(handle, records, templates, z_layer, cfg)
    step_s = batched_s / max(1, steps - 1)  # the last step reads the loss and stops
    return {"bench": "targets", "device": str(handle.device), "model": str(handle.spec.name),
            "requests": batch, "templates": len(templates), "steps": steps, "repeat": len(batched),
            "batched_s": round(batched_s, 3), "one_at_a_time_s": round(single_s, 3),
            "speedup": round(single_s / batched_s, 2), "relative_difference": round(gap, 8),
            "batched_runs_s": [round(x, 3) for x in batched],
            "one_at_a_time_runs_s": [round(x, 3) for x in single],
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
