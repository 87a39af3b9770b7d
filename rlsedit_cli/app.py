"""The Hydra entry point: a thin wrapper over :func:`rlsedit_cli.runner.run.run`."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rlsedit_cli import config
from rlsedit_cli.errors import RlseditError, Terminated, stopped_by
from rlsedit_cli.validate import check_added_keys

config.register()
log = logging.getLogger("rlsedit")
FAILED_JOBS: list[str] = []  # a multirun's failed jobs in this process, reported at its end


@hydra.main(version_base="1.3", config_path=str(config.conf_dir()), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; return the sweep objective (``None`` when the config names none)."""
    from rlsedit_cli.runner.run import run

    hydra_cfg = HydraConfig.get()
    try:
        check_added_keys(cfg, list(hydra_cfg.overrides.task))
        config.log_composition(dict(hydra_cfg.runtime.choices), cfg.editor)
        summary = run(cfg, overrides=list(hydra_cfg.overrides.task))
    except RlseditError as e:
        log.error("error: %s", e)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise SystemExit(2) from None
        # one bad point must not stop the sweep: the job says why in its folder, the rest runs
        job = Path(hydra_cfg.runtime.output_dir)
        write_error(job, str(e))
        FAILED_JOBS.append(f"{job.name}: {e}")
        return None
    except KeyboardInterrupt as e:
        how, status = stopped_by(e)
        log.error("error: %s", interrupted(Path(cfg.resume or cfg.paths.run_dir), how))
        raise SystemExit(status) from None
    return summary.get("objective")


def write_error(job: Path, text: str) -> None:
    """A failed sweep job's error.txt, in a folder the job owns (never into a finished job's
    folder, nor over a file the tool did not write)."""
    from rlsedit_cli.runner import plan
    from rlsedit_cli.runner.folder import RunFolder

    if (job / "summary.json").exists() or plan.foreign_outputs(job):
        return
    folder = RunFolder(job)
    folder.claim("error.txt")
    (job / "error.txt").write_text(f"{text}\n", encoding="utf-8")


def interrupted(folder: Path, how: str = "interrupted") -> str:
    """What a user needs after Ctrl-C or SIGTERM: where the run stands and how to continue it."""
    if (folder / "checkpoint.pt").is_file():
        return (f"{how}; the last checkpoint is in {folder}: continue with "
                f"`rlsedit run resume={folder}`")
    return (f"{how} before any checkpoint (checkpoint.every=N saves one every N batches); "
            f"the partial run is in {folder}")


def raise_terminated(signum, frame) -> None:
    """SIGTERM's handler in a run this process leads (not in a submitit job: submitit keeps its
    own handlers there, and requeues the job on its preemption signal)."""
    del signum, frame
    raise Terminated()
