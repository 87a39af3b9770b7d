"""``rlsedit tune``: an editor's settings for a model, found on held-out records and written
where the configs read them (:mod:`rlsedit_cli.tune.pipeline`); ``rlsedit tune trace``: the
causal trace alone, in a folder of its own."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from rlsedit_cli.errors import ConfigError, DataError

log = logging.getLogger(__name__)

VERBS = ("all", "trace")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas") from None


def _ints(text: str) -> list[int]:
    return [int(x) for x in _floats(text)]


def add_parser(sub) -> None:
    tune = sub.add_parser("tune", help="find an editor's settings for a model: rlsedit tune "
                                       "model=M editor=E dataset=... (or tune trace)")
    verbs = tune.add_subparsers(dest="tune_verb", required=True, metavar="VERB")
    every = verbs.add_parser("all", help="every step (the default verb): knowledge, causal "
                                         "trace, targets, anchor samples, trade-off; writes "
                                         "conf/tuned/EDITOR_MODEL.yaml")
    every.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides as for `rlsedit run` (model=..., editor=..., "
                            "dataset=..., dataset.path=...)")
    every.add_argument("--out", help="the tune's folder (default: outputs/tune/MODEL/EDITOR); "
                                     "the same command again continues a tune stopped there")
    every.add_argument("--offset", type=int, default=None,
                       help="first stream position of the tuning records (default 5,000, or "
                            "the dataset's second half when it is smaller): keep them out of "
                            "the runs you report")
    every.add_argument("--edits", type=int, default=200, help="tuning records, edited by "
                                                              "every job")
    every.add_argument("--batch", type=int, default=100, help="edits per batch in every job")
    every.add_argument("--steps", type=lambda t: [x for x in t.split(",") if x],
                       default=["know", "trace", "targets", "samples", "grid"],
                       help="which steps to run, in order: know,trace,targets,samples,grid "
                            "(a later step uses what earlier ones found in the folder)")
    every.add_argument("--trace-records", type=int, default=None,
                       help="tuning records traced (default: all of them)")
    every.add_argument("--trace-samples", type=int, default=10,
                       help="corrupted copies per traced prompt")
    every.add_argument("--window", type=int, default=10, help="MLP layers restored together")
    every.add_argument("--noise", type=float, default=3.0, help="noise in subject-embedding "
                                                                "standard deviations")
    every.add_argument("--target-records", type=int, default=10,
                       help="requests whose target optimisation is measured")
    every.add_argument("--lrs", type=_floats, default=[0.1, 0.25, 0.5, 1.0],
                       help="target step sizes tried")
    every.add_argument("--clamps", type=_floats, default=[0.75, 2.0, 4.0],
                       help="target clamps tried (the configured one is added)")
    every.add_argument("--sample-counts", type=_ints, default=None,
                       help="anchor sample counts tried (default 100, 300, 1000, ... up to the "
                            "configured count)")
    every.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a trade-off axis (repeat for more; default: the editor's own)")
    every.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                       help="stop starting steps and jobs after this many minutes (the same "
                            "command continues)")
    every.add_argument("--settings-dir", default=None,
                       help="write tuned/EDITOR_MODEL.yaml here (default: the configs' folder, "
                            "read by the next run; 'none': do not write)")
    trace = verbs.add_parser("trace", help="ROME's causal tracing over held-out records: where "
                                           "the model's facts are, and a window of layers")
    trace.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides as for `rlsedit run` (model=..., dataset=..., "
                            "dataset.path=...)")
    trace.add_argument("--records", type=int, default=50, help="records to trace")
    trace.add_argument("--offset", type=int, default=5000,
                       help="first record (file order): keep the traced records out of the "
                            "runs you report")
    trace.add_argument("--samples", type=int, default=10, help="corrupted copies per prompt")
    trace.add_argument("--window", type=int, default=10,
                       help="MLP layers restored around each layer (ROME: 10)")
    trace.add_argument("--noise", type=float, default=3.0,
                       help="noise as this many standard deviations of the subject tokens' "
                            "embeddings (ROME's rule s3)")
    trace.add_argument("--width", type=int, default=None,
                       help="layers of the proposed window (default: as many as the model's "
                            "edit_layers)")
    trace.add_argument("--device", default="auto")
    trace.add_argument("--out", help="folder to write (default: outputs/tune/MODEL/trace-TIME)")


def with_verb(argv: list[str]) -> list[str]:
    """``tune KEY=VALUE ...`` is ``tune all KEY=VALUE ...``."""
    if argv[:1] == ["tune"] and (len(argv) == 1 or argv[1] not in (*VERBS, "-h", "--help")):
        return ["tune", "all", *argv[1:]]
    return argv


def _check(pairs) -> None:
    for name, value, low in pairs:
        if value is not None and value < low:
            raise ConfigError(f"{name}={value} must be at least {low}")


def tune_command(args: argparse.Namespace) -> int:
    return trace_command(args) if args.tune_verb == "trace" else all_command(args)


def all_command(args: argparse.Namespace) -> int:
    from rlsedit_cli.config import conf_dir
    from rlsedit_cli.tune import jobs, pipeline

    _check((("--edits", args.edits, 1), ("--batch", args.batch, 1), ("--offset", args.offset, 0),
            ("--trace-records", args.trace_records, 1), ("--trace-samples", args.trace_samples,
                                                         1), ("--window", args.window, 1),
            ("--target-records", args.target_records, 1)))
    unknown = [s for s in args.steps if s not in pipeline.STEPS]
    if unknown:
        raise ConfigError(f"--steps {','.join(unknown)}: the steps are "
                          f"{','.join(pipeline.STEPS)}")
    if not args.noise > 0 or any(x <= 0 for x in [*args.lrs, *args.clamps]):
        raise ConfigError("--noise, --lrs and --clamps must be above 0")
    cfg = pipeline.compose(args.overrides)
    clamps = list(args.clamps)
    if "target" in cfg.editor and float(cfg.editor.target.clamp_norm_factor) not in clamps:
        clamps = sorted([*clamps, float(cfg.editor.target.clamp_norm_factor)])
    grid = (jobs.parse_grid(args.grid) if args.grid
            else jobs.default_grid(str(cfg.editor.name), cfg))
    settings = pipeline.TuneSettings(
        overrides=list(args.overrides), offset=_offset(cfg, args.offset, args.edits),
        edits=args.edits, batch=args.batch, trace_records=args.trace_records or args.edits,
        trace_samples=args.trace_samples, window=args.window, noise=args.noise,
        target_records=args.target_records, lrs=args.lrs, clamps=clamps, grid=grid,
        sample_counts=args.sample_counts or [])
    write_to = (None if args.settings_dir == "none" else
                Path(args.settings_dir).expanduser() if args.settings_dir else conf_dir())
    out = Path(args.out or f"{cfg.paths.output_dir}/tune/{cfg.model.name}/"
                           f"{cfg.editor.name}").expanduser()
    tune = pipeline.Tune(cfg, out, settings, pipeline.Budget(args.budget), write_to)
    try:
        tune.run(args.steps)
    except pipeline.BudgetSpentError as e:
        log.warning("%s", e)
    return 0


def _offset(cfg, given: int | None, edits: int) -> int:
    """The tuning records' first stream position: ``given``, else 5,000, else the second half
    of a dataset too small for that."""
    from rlsedit_cli.runner.run import build

    n = len(build(cfg.dataset).records)
    offset = given if given is not None else (5000 if n >= 5000 + edits else n // 2)
    if offset + edits > n:
        raise ConfigError(f"--offset {offset} with --edits {edits} needs {offset + edits} "
                          f"records; the dataset has {n}: lower --offset or --edits")
    return offset


def trace_command(args: argparse.Namespace) -> int:
    from rlsedit_cli.config import composed
    from rlsedit_cli.models.loader import load_configured, resolve_device
    from rlsedit_cli.runner.run import build
    from rlsedit_cli.tune.layers import trace_records, write_trace

    cfg = composed([*args.overrides])
    out = Path(args.out or f"{cfg.paths.output_dir}/tune/{cfg.model.name}/"
                           f"trace-{time.strftime('%Y-%m-%d_%H-%M-%S')}").expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty: choose a new folder (tune writes its own)")
    for name, value, low in (("--records", args.records, 1), ("--samples", args.samples, 1),
                             ("--window", args.window, 1), ("--offset", args.offset, 0)):
        if value < low:
            raise ConfigError(f"{name}={value} must be at least {low}")
    if not args.noise > 0:
        raise ConfigError(f"--noise={args.noise} must be above 0")
    handle = load_configured(cfg, resolve_device(args.device))
    records = build(cfg.dataset).records[args.offset : args.offset + args.records]
    if not records:
        raise DataError(f"--offset {args.offset} is past the dataset's records: lower it")
    configured = list(cfg.model.edit_layers)
    result = trace_records(handle, records,
                           f"{args.offset}..{args.offset + len(records) - 1} in file order",
                           args.samples, args.window, args.noise,
                           args.width or len(configured), configured)
    out.mkdir(parents=True, exist_ok=True)
    write_trace(out, result, cfg.model.name)
    log.info("causal trace of %s over %d records (%d skipped): MLP peak at layer %d; proposed "
             "layers %s; %s", cfg.model.name, result["traced"], result["skipped"],
             result["peak_layer"], result["proposed_layers"], out)
    return 0


