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
    return {"bench": "targets", "device": str(handle.device), "model": str(handle.spec.name),
            "requests": batch, "templates": len(templates), "steps": steps, "repeat": len(batched),
            "batched_s": round(batched_s, 3), "one_at_a_time_s": round(single_s, 3),
            "speedup": round(single_s / batched_s, 2), "relative_difference": round(gap, 8),
            "batched_runs_s": [round(x, 3) for x in batched],
            "one_at_a_time_runs_s": [round(x, 3) for x in single]}
