"""``rlsedit bench update|targets|stats|stream|general|all``: each verb's inputs from the command
line and the composed config, one JSON line per result on stdout (and appended to --out)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlsedit_cli.config import composed


def _bench_targets(args: argparse.Namespace) -> dict:
    """The first ``--batch`` requests of the configured stream, batched against one at a time."""
    from omegaconf import OmegaConf

    from rlsedit_cli.bench.targets import bench_targets
    from rlsedit_cli.datasets.stream import stream_of
    from rlsedit_cli.editors.base import target_config
    from rlsedit_cli.models.loader import load_configured, resolve_device
    from rlsedit_cli.runner.run import build

    cfg = composed([f"model={args.model}", *args.overrides])
    records = [r for b in stream_of(build(cfg.dataset).records, cfg.stream) for r in b]
    handle = load_configured(cfg, resolve_device(args.device))
    target = target_config(OmegaConf.to_container(cfg.editor.target, resolve=True))
    return bench_targets(handle, records[: args.batch], z_layer=max(cfg.model.edit_layers),
                         target=target, steps=args.steps, repeat=args.repeat)


def _bench_stream(args: argparse.Namespace) -> list[dict]:
    """One run of the configured stream in a fresh folder, timed by phase; with --against, a run
    of each further configuration on the same records and their comparison."""
    from datetime import datetime

    from omegaconf import open_dict

    from rlsedit_cli.bench.stream import DEFAULTS, bench_stream, compare_streams

    root = Path(args.run_dir) if args.run_dir else None
    variants = ["", *args.against]
    # every configuration composed before the first runs: a YAML file edited meanwhile must not
    # change a later configuration of the same comparison
    configs = [composed([f"model={args.model}", f"device={args.device}", *DEFAULTS,
                         *args.overrides, *variant.split()]) for variant in variants]
    rows = []
    for k, (variant, cfg) in enumerate(zip(variants, configs)):
        with open_dict(cfg):
            folder = root or (Path(cfg.paths.output_dir) / "bench" / "stream"
                              / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f"))
            cfg.paths.run_dir = str(folder / f"config{k}" if args.against else folder)
        rows.append(bench_stream(cfg) | {"config": variant or "(as given)"})
        if args.against:  # each result as soon as it is measured
            _emit(rows[-1], args.out)
    if args.against:
        return [compare_streams(rows, [r["config"] for r in rows])]
    return rows


def _bench_stats(args: argparse.Namespace) -> dict:
    """The anchor statistics of the model's edited layers against a plain forward pass."""
    from rlsedit_cli.bench.stats import bench_stats
    from rlsedit_cli.models.loader import load_configured, resolve_device

    cfg = composed([f"model={args.model}", *args.overrides])
    handle = load_configured(cfg, resolve_device(args.device))
    return bench_stats(handle, list(cfg.model.edit_layers), cfg.stats.corpus, args.samples,
                       cfg.stats.max_length, cfg.stats.batch_size, cfg.stats.seed)


def _bench_general(args: argparse.Namespace) -> list[dict]:
    """The eval group's tasks (eval=..., eval.limit=...) on the unedited model: a line per task
    (with its floor: the FLOPs of its passes over the GEMM rate) and one per point (its seconds:
    a run's later point, which replays the blocks below the model's edit_layers as a run of
    the key-value editors does; and its first point's, which prepares the tasks); with
    --against, each further configuration (eval.* keys) on the same model and documents, then
    their comparison."""
    import time
    from dataclasses import replace

    import torch

    from rlsedit_cli.accel.lower import lower_states
    from rlsedit_cli.accel.precision import DTYPES
    from rlsedit_cli.bench.floor import PassCounter, floor_seconds, point_flops
    from rlsedit_cli.bench.gemm import gemm_timer
    from rlsedit_cli.bench.general import bench_general, compare_general
    from rlsedit_cli.eval.general import GeneralSettings, TaskManagers
    from rlsedit_cli.models.loader import load_configured, resolve_device

    # every configuration composed (and checked) before the model loads and the first one runs
    configs = [(variant, composed([f"model={args.model}", *args.overrides, *variant.split()]))
               for variant in ["", *args.against]]
    handle = load_configured(configs[0][1], resolve_device(args.device))
    points, index = [], TaskManagers()  # the task index built once, as a run builds it
    for variant, cfg in configs:
        opts = GeneralSettings.from_cfg(cfg.eval, cfg.seed)
        # a run's first point prepares its tasks (eval/prepared.py); the point reported is a
        # later one, as each further point of a run costs it
        managers, first = TaskManagers(index_of=index), time.perf_counter()
        lower = lower_states(handle, list(cfg.model.edit_layers), cfg.eval.kept_states_mb)
        for _ in bench_general(handle, list(cfg.eval.tasks), opts, managers, lower):
            pass
        first = time.perf_counter() - first
        gemm = gemm_timer(handle.device, DTYPES[cfg.eval.compute_dtype] or torch.float32)
        rate, start, rows = gemm(), time.perf_counter(), []
        with PassCounter(handle.model, lower) as counts:
            before = replace(counts)
            for row in bench_general(handle, list(cfg.eval.tasks), opts, managers, lower):
                # each task's own floor: what its passes computed, over the rate measured before
                floor = floor_seconds(point_flops(handle.model, counts.since(before)), rate)
                rows.append(row | {"config": variant or "(as given)"}
                            | ({} if "error" in row else {"floor_seconds": floor}))
                before = replace(counts)
                _emit(rows[-1], args.out)
        seconds = time.perf_counter() - start
        rate = (rate + gemm()) / 2
        flops = point_flops(handle.model, counts)
        points.append({"bench": "general_point", "config": variant or "(as given)",
                       "model": str(handle.spec.name), "device": str(handle.device),
                       "seconds": round(seconds, 1), "first_point_seconds": round(first, 1),
                       "replayed_below": lower.below if lower else 0,
                       "replayed_passes": lower.replayed if lower else 0,
                       "tokens": counts.tokens,
                       "real_tokens": counts.real, "head_rows": counts.head_rows,
                       "gflop": {k: round(v / 1e9, 3) for k, v in flops.items()},
                       "gemm_gflops": round(rate, 1),
                       "floor_seconds": floor_seconds(flops, rate),
                       "task_seconds": {r["task"]: r.get("seconds") for r in rows},
                       "tasks": rows})
        _emit({k: v for k, v in points[-1].items() if k != "tasks"}, args.out)
    return [compare_general(points)] if args.against else []


def bench_command(args: argparse.Namespace) -> int:
    """``rlsedit bench update|targets|stats|stream|all``: JSON lines on stdout (and appended to
    --out)."""

    from rlsedit_cli.bench.update import bench_update
    from rlsedit_cli.errors import ConfigError
    from rlsedit_cli.models.loader import resolve_device

    for name in ("d_in", "d_out", "u", "batches", "batch", "repeat", "samples"):
        if getattr(args, name) < 1:
            raise ConfigError(f"bench --{name.replace('_', '-')}={getattr(args, name)} must be at "
                              "least 1")
    if args.against and args.bench_verb not in ("stream", "general"):
        raise ConfigError(f"bench --against is for bench stream and general, not bench "
                          f"{args.bench_verb}")
    if args.overrides and args.bench_verb == "update":
        raise ConfigError(f"bench update takes no config overrides ({args.overrides[0]}): they "
                          "are for bench targets, stats, stream and general")
    rows = []
    if args.bench_verb in ("update", "all"):
        rows += bench_update(args.d_in, args.d_out, args.u, args.batches,
                             str(resolve_device(args.device)), args.dtype)
    if args.bench_verb in ("targets", "all"):
        rows.append(_bench_targets(args))
    if args.bench_verb in ("stats", "all"):
        rows.append(_bench_stats(args))
    if args.bench_verb in ("stream", "all"):
        rows += _bench_stream(args)
    if args.bench_verb == "general":  # not in `all`: minutes to hours; a line per task
        rows = _bench_general(args)
    for row in rows:
        _emit(row, args.out)
    return 0


def _emit(row: dict, out: str | None) -> None:
    """One JSON line on stdout (and appended to ``out``)."""
    line = json.dumps(row)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if out:
        with open(Path(out), "a", encoding="utf-8") as f:
            f.write(line + "\n")
