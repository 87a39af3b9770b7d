"""Target optimisation settings: at which step size, clamp and step count the target NLL of the
tuning records converges at the inject layer (the measurement docs/smollm2.md made by hand).

Every (lr, clamp) pair optimises the same requests with every early stop off for twice the
configured steps, recording the mean target NLL after each step (:func:`target_curves`).
:func:`choose_targets` states and applies the rule.
"""

from __future__ import annotations

import time
from dataclasses import replace

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editing.targets import optimise_targets
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.settings import TargetConfig

LRS = (0.1, 0.25, 0.5, 1.0)
CLAMPS = (0.75, 2.0, 4.0)
CONVERGED_NLL = 0.1  # mean target NLL (nats): p(target) about 0.9 after every prompt


def target_curves(handle: ModelHandle, requests: list[Record], templates: list[str],
                  z_layer: int, target: TargetConfig, lrs, clamps, steps: int,
                  scale_by: str = "residual") -> list[dict]:
    """For each (lr, clamp): the mean target NLL of ``requests`` after each of ``steps`` steps
    (``nll[0]``: before the first step) and the seconds it took. ``scale_by``: as
    :func:`optimise_targets` (``"map"`` for ROME)."""
    from rlsedit_cli.progress import progress

    rows = []
    for lr, clamp in progress([(lr, c) for lr in lrs for c in clamps], desc="target settings",
                              unit="setting"):
        cfg = replace(target, lr=float(lr), clamp_norm_factor=float(clamp), steps=steps,
                      early_stop_loss=0.0, stop_when_top1=False, stop_below_nll=None)
        curve: list[float] = []
        t0 = time.perf_counter()
        optimise_targets(handle, requests, templates, z_layer, cfg, scale_by,
                         on_step=lambda _, nll, curve=curve: curve.append(float(nll.mean())))
        rows.append({"lr": float(lr), "clamp": float(clamp), "nll": curve,
                     "seconds": round(time.perf_counter() - t0, 2)})
    return rows


def converged_at(curve: list[float], threshold: float) -> int | None:
    """The first step count after which the mean NLL is below ``threshold`` (None: never)."""
    return next((i for i, v in enumerate(curve) if v < threshold), None)


def choose_targets(rows: list[dict], configured: dict, threshold: float = CONVERGED_NLL) -> dict:
    """The rule: keep the configured clamp (the references' bound on the edit's size) when some
    step size converges under it, else the smallest clamp that lets one converge; at that clamp
    the smallest step size whose mean NLL falls below ``threshold`` within the configured steps
    (a gentler step; early stopping ends each request sooner anyway), else the one that gets
    there in the fewest steps, with the step count raised to the next multiple of 5 above it.
    ``configured``: ``lr``, ``clamp_norm_factor``, ``steps``. Returns the choice with ``rule``
    and ``converged`` (False: nothing converged; the configured values are kept)."""
    steps = int(configured["steps"])
    at = [(r, converged_at(r["nll"], threshold)) for r in rows]
    clamps = sorted({r["clamp"] for r in rows},
                    key=lambda c: (c != float(configured["clamp_norm_factor"]), c))
    for clamp in clamps:
        reached = [(r, s) for r, s in at if r["clamp"] == clamp and s is not None]
        if not reached:
            continue
        within = sorted((r["lr"], s) for r, s in reached if s < steps)  # s steps: s + 1 passes
        if within:
            lr, step = within[0]
            chosen_steps = steps
        else:
            step, lr = min((s, r["lr"]) for r, s in reached)
            chosen_steps = -(-(step + 1) // 5) * 5
        return {"lr": lr, "clamp_norm_factor": clamp, "steps": chosen_steps, "converged": True,
                "converged_at": step, "threshold": threshold,
                "rule": f"the configured clamp when a step size converges under it, else the "
                        f"smallest that does; the smallest lr whose mean target NLL falls "
                        f"below {threshold:g} within {steps} steps (else the fewest steps, "
                        "rounded up to 5)"}
    return {"lr": float(configured["lr"]), "clamp_norm_factor":
            float(configured["clamp_norm_factor"]), "steps": steps, "converged": False,
            "converged_at": None, "threshold": threshold,
            "rule": f"no step size and clamp brought the mean target NLL below {threshold:g} "
                    f"in {2 * steps} steps: the configured values are kept"}
