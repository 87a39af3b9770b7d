"""The ``rlsedit`` command: run, ls, toy, report, bench, export, stats, tune.

``rlsedit run ARGS`` hands ARGS to Hydra untouched (overrides, ``-m``, ``--cfg job``, ``--help``).
User errors (bad config, missing file, unreachable hub, ...) end in one ``error:`` line and exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from pathlib import Path

log = logging.getLogger("rlsedit")

GROUPS = ("model", "editor", "dataset", "eval", "logger", "experiment", "target", "editor_model",
          "tuned", "speed", "measure", "hydra/launcher", "hydra/sweeper")


NOISE = ("reference_type=", "object_type=", "Config search path", "provider=")


def _missing_choice(err: BaseException) -> str | None:
    """'no config X in group G: choose one of ...' for an unknown group choice."""
    missing = getattr(err, "missing_cfg_file", None)
    options = [o for o in (getattr(err, "options", None) or []) if not o.endswith("_schema")]
    if not missing or not options or "/" not in missing:
        return None
    group, _, name = missing.rpartition("/")
    return (f"no config '{name}' in group {group}: choose one of {', '.join(options)} "
            "(`rlsedit ls` lists every group)")


def _lines(err: BaseException) -> list[str]:
    """The non-empty lines of an error's text, without Hydra's diagnostic noise."""
    text = re.sub(r"To append to your config use \+\S+", "", str(err))  # to a key nothing reads
    return [ln.strip().rstrip(".") for ln in text.splitlines()
            if ln.strip() and not ln.strip().startswith(NOISE)]


def one_line(err: BaseException) -> str:
    """A Hydra/OmegaConf/rlsedit error as one line, with the fix where one is known."""
    for e in (err, err.__cause__, err.__context__):
        if e is not None and (text := _missing_choice(e)):
            return text
    lines = _lines(err)
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in " ".join(lines):
        lines += _lines(cause)
    text = "; ".join(dict.fromkeys(lines)) or type(err).__name__
    for plugin, extra in (("submitit", "slurm"), ("optuna", "optuna")):
        if plugin in text:
            return text + f" (this choice needs a plugin: pip install 'rlsedit[{extra}]')"
    if "not in" in text or "Could not override" in text or "not a valid" in text.lower():
        text += " (check the spelling; `rlsedit run --cfg job` prints every key)"
    elif "Could not find" in text or "In '" in text:
        text += " (`rlsedit ls` lists the choices of every group)"
    return text


def run_command(args: list[str]) -> int:
    """``rlsedit run``: compose with Hydra and run (or sweep)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlsedit_cli.errors import RlseditError

    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach this function, printed in one line
    argv0, sys.argv = sys.argv, ["rlsedit run", *args]
    lock = None
    try:
        lock = _check_folder_first(args)
        from rlsedit_cli import app

        app.FAILED_JOBS.clear()
        signal.signal(signal.SIGTERM, app.raise_terminated)
        app.main()
        if app.FAILED_JOBS:
            log.error("error: %d job(s) of the sweep failed (each folder's error.txt says why): "
                      "%s", len(app.FAILED_JOBS), "; ".join(app.FAILED_JOBS))
            return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt as e:  # a sweep's launcher interrupted between its jobs
        from rlsedit_cli.errors import stopped_by

        how, status = stopped_by(e)
        log.error("error: %s; each job's folder keeps what it finished (a job with a "
                  "checkpoint continues with `rlsedit run resume=FOLDER`)", how)
        return status
    except (HydraException, OmegaConfBaseException, RlseditError) as e:
        log.error("error: %s", one_line(e))
        return 2
    except OSError as e:  # e.g. the run folder on a read-only or full file system
        return _cannot_write(e, "hydra.run.dir=..., paths.output_dir=...")
    except ValueError as e:
        if not str(e).startswith("Only one of --run"):  # Hydra's refusal of -m with --cfg
            raise
        log.error("error: %s (--cfg job prints one job's config: drop -m and give one value "
                  "of each swept key)", e)
        return 2
    finally:
        sys.argv = argv0
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if lock is not None:
            lock.release()
    return 0


def _cannot_write(err: OSError, where: str) -> int:
    """A file-system failure as the one error line; ``where`` names the setting to change."""
    from rlsedit_cli.errors import first_line

    what = err.filename or "the folder"
    why = err.strerror or first_line(err)
    log.error("error: cannot write %s (%s): make it writable, free space, or choose another "
              "folder (%s)", what, why, where)
    return 2


def _check_folder_first(args: list[str]):
    """Claim the run folder named on the command line before Hydra writes .hydra/ into it (the
    lock the run holds, the refusals of runner/plan.py); a sweep folder that holds an earlier
    sweep is refused unless resume_jobs=true. Returns the lock (None: nothing to claim)."""
    from rlsedit_cli.files import parse_override
    from rlsedit_cli.runner import plan

    if {"--cfg", "-c", "--help", "-h"} & set(args):
        return None
    given = dict(parse_override(a) for a in args if "=" in a and not a.startswith("-"))
    overwrite = given.get("overwrite", "false").lower() == "true"
    resume_jobs = given.get("resume_jobs", "false").lower() == "true"
    if {"-m", "--multirun"} & set(args):
        plan.sweep_folder(given.get("hydra.sweep.dir"), resume_jobs)
        return None
    if resume_jobs:
        return None  # the run finds its own earlier attempt (runner/plan.py)
    if given.get("resume") not in (None, "", "null"):
        return plan.claim(given["resume"], True, overwrite, before_hydra=True)[0]
    if given.get("hydra.run.dir"):
        return plan.claim(given["hydra.run.dir"], False, overwrite, before_hydra=True)[0]
    return None


def ls_command(args: argparse.Namespace) -> int:
    """List the choices of every config group, with each YAML's first comment line."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlsedit_cli import config

    config.register()
    root = config.conf_dir()
    groups = [args.group] if args.group else list(GROUPS)
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group in groups:
            options = [o for o in loader.get_group_options(group) if not o.endswith("_schema")]
            if not options:
                if args.group:
                    log.error("error: no config group %r (groups: %s)", group, ", ".join(GROUPS))
                    return 2
                continue
            sys.stdout.write(f"{group}:\n")
            for option in options:
                sys.stdout.write(f"  {option:<28} {_describe(root / group / f'{option}.yaml')}\n")
    return 0


def _describe(path) -> str:
    if not path.is_file():
        return ""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


def toy_command(args: argparse.Namespace) -> int:
    """``rlsedit toy build|check``."""
    import json

    from rlsedit_cli.config import ASSETS_DIR

    if args.toy_verb == "build":
        from rlsedit_cli.toy.build import BuildConfig, build_bundle

        cfg = BuildConfig(num_subjects=args.subjects, seed=args.seed, epochs=args.epochs,
                          vocab_size=args.vocab_size, n_embd=args.n_embd, n_layer=args.n_layer)
        info = build_bundle(args.out, cfg, facts=args.facts, limit=args.limit)
        log.info("bundle written to %s", args.out)
        sys.stdout.write(json.dumps({k: info[k] for k in ("records", "steps", "train_seconds",
                                                          "knowledge")}) + "\n")
        return 0
    from rlsedit_cli.toy.build import check_bundle

    bundle = args.bundle or str(ASSETS_DIR / "gpt2_tiny")
    sys.stdout.write(json.dumps(check_bundle(bundle)) + "\n")
    return 0


def report_command(args: argparse.Namespace) -> int:
    """``rlsedit report RUN_DIR...``: report.md and plots."""
    import time

    from rlsedit_cli.report import make_report

    out = args.out
    if out is None:
        out = (Path(args.runs[0]) / "report" if len(args.runs) == 1
               else Path("outputs") / "reports" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    done = make_report(args.runs, out, args.metric)
    sys.stdout.write(done["table"])
    log.info("%d runs: %s", done["runs"], done["report"])
    return 0


def export_command(args: argparse.Namespace) -> int:
    """``rlsedit export RUN --out DIR [--full]``: the run's edited model."""
    import json

    from rlsedit_cli.runner.export import export_run

    sys.stdout.write(json.dumps(export_run(args.run, args.out, args.full)) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rlsedit_cli.stats import commands as stats_commands
    from rlsedit_cli.tune import commands as tune_commands

    parser = argparse.ArgumentParser(
        prog="rlsedit",
        description="Lifelong knowledge editing runner: RLSEdit and its baselines, streamed "
                    "over CounterFact-style edits, measured and logged.",
        epilog="`rlsedit run --help` shows the run options; `rlsedit ls` the config choices.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run an experiment; every further argument goes to Hydra "
                               "(overrides, -m, --cfg job, --help)", add_help=False)
    ls = sub.add_parser("ls", help="list the choices of every config group")
    ls.add_argument("group", nargs="?", help="one group only (e.g. editor)")

    report = sub.add_parser("report", help="markdown table and plots over finished runs")
    report.add_argument("runs", nargs="+", help="run folders or multirun sweep folders")
    report.add_argument("--out", help="output folder (default: RUN_DIR/report for one folder)")
    report.add_argument("--metric", default="efficacy",
                        help="metric of a sweep's heat map (efficacy, objective, fluency, ...)")

    export = sub.add_parser("export", help="a run's edited model: its edited maps "
                                           "(safetensors), with --full a transformers model")
    export.add_argument("run", help="a run folder: a finished run, or one with a checkpoint")
    export.add_argument("--out", required=True, help="folder to write")
    export.add_argument("--full", action="store_true",
                        help="also the whole edited model (OUT/model, from_pretrained loads it)")

    stats_commands.add_parser(sub)
    tune_commands.add_parser(sub)

    toy = sub.add_parser("toy", help="build or check a tiny GPT-2 that knows a set of facts")
    toy_sub = toy.add_subparsers(dest="toy_verb", required=True, metavar="VERB")
    build = toy_sub.add_parser("build", help="train the tokenizer and the tiny GPT-2 (CPU)")
    build.add_argument("--out", default="outputs/toy/gpt2_tiny", help="bundle folder to write")
    build.add_argument("--facts", help="a CounterFact file (ROME or EasyEdit layout) instead "
                                       "of the toy world")
    build.add_argument("--limit", type=int, help="use only the first N records of --facts")
    build.add_argument("--subjects", type=int, default=3000, help="toy world size")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--epochs", type=float, default=24.0)
    build.add_argument("--vocab-size", type=int, default=4096)
    build.add_argument("--n-embd", type=int, default=128)
    build.add_argument("--n-layer", type=int, default=4)
    check = toy_sub.add_parser("check", help="measure a bundle's pre-edit knowledge")
    check.add_argument("bundle", nargs="?", help="bundle folder (default: the shipped one)")

    bench = sub.add_parser("bench", help="benchmarks (results in docs/benchmarks.md)")
    bench.add_argument("bench_verb",
                       choices=["update", "targets", "stats", "stream", "general", "all"],
                       help="update: one batch update of RLSEdit/AlphaEdit/MEMIT over a history; "
                            "targets: batched target optimisation vs one request at a time; "
                            "stats: anchor statistics vs a plain forward; "
                            "stream: one run, seconds per edit by phase; general: the eval "
                            "group's lm-eval tasks on the unedited model (not in all)")
    bench.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="targets, stats, stream, general: config overrides as for "
                            "`rlsedit run` (e.g. "
                            "model=smollm2_135m dataset=counterfact_easyedit dataset.path=F)")
    bench.add_argument("--d-in", type=int, default=4096)
    bench.add_argument("--d-out", type=int, default=4096)
    bench.add_argument("--u", type=int, default=100, help="keys per batch")
    bench.add_argument("--batches", type=int, default=50, help="length of the history")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    bench.add_argument("--batch", type=int, default=50, help="targets: requests in the batch")
    bench.add_argument("--steps", type=int, default=25,
                       help="targets: optimiser steps of every path (no early stop)")
    bench.add_argument("--model", default="gpt2_tiny",
                       help="targets, stats, stream, general: model config (as the override "
                            "model=...)")
    bench.add_argument("--run-dir", help="stream: the run's folder (default: a new one under "
                                         "outputs/bench/stream/DATE/TIME)")
    bench.add_argument("--repeat", type=int, default=3,
                       help="targets: timed runs of each path (the median is reported)")
    bench.add_argument("--samples", type=int, default=200, help="stats: texts to read")
    bench.add_argument("--out", help="also append the JSON lines to this file")
    bench.add_argument("--against", action="append", default=[], metavar="'KEY=VALUE ...'",
                       help="stream, general: also run this configuration (overrides added "
                            "to the common ones, space-separated) on the same records or "
                            "documents and compare; repeat for more")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] %(message)s")
    if argv and argv[0] == "run":
        return run_command(argv[1:])
    from rlsedit_cli.bench.command import bench_command
    from rlsedit_cli.stats.commands import stats_command
    from rlsedit_cli.tune.commands import tune_command, with_verb

    argv = with_verb(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)  # a bench's overrides may follow its options
    if rest and (args.command not in ("bench", "stats", "tune")
                 or any(x.startswith("-") for x in rest)):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    from rlsedit_cli.errors import RlseditError

    handlers = {"ls": ls_command, "toy": toy_command, "bench": bench_command,
                "report": report_command, "export": export_command,
                "stats": stats_command, "tune": tune_command}
    try:
        return handlers[args.command](args)
    except RlseditError as e:
        log.error("error: %s", e)
        return 2
    except OSError as e:  # e.g. --out on a read-only or full file system
        return _cannot_write(e, f"{args.command} --out DIR")


if __name__ == "__main__":
    raise SystemExit(main())
