"""Weights & Biases tracker: offline by default, online on request, never blocking a run.

If ``mode=online`` cannot start (no API key, no network) the run falls back to offline with a
warning; if W&B cannot start at all, tracking is off with a warning and the run goes on (the run
folder holds every figure anyway). ``WANDB_MODE`` in the environment wins over ``logger.mode``,
as in W&B itself (tests set it to ``disabled``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rlsedit_cli.errors import first_line
from rlsedit_cli.files import flatten
from rlsedit_cli.loggers.base import Tracker

log = logging.getLogger(__name__)


def _numbers(tree: dict) -> dict:
    """The numeric leaves of a nested dict, keyed "a/b" (W&B's panel grouping)."""
    return {k: v for k, v in flatten(tree, "/").items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbLogger(Tracker):
    def __init__(self, run_dir: str | Path, run_config: dict, run_name: str, name: str = "wandb",
                 mode: str = "offline", project: str = "rlsedit", entity: str | None = None,
                 group: str | None = None, tags: list[str] | None = None,
                 init_timeout: float = 60.0) -> None:
        super().__init__(name)
        import wandb

        self._wandb = wandb
        self.run = None
        env = os.environ.get("WANDB_MODE")
        if env and env != mode:
            log.info("WANDB_MODE=%s in the environment overrides logger.mode=%s", env, mode)
        mode = env or mode
        if mode not in ("online", "offline", "disabled"):
            log.warning("logger.mode=%s is not online/offline/disabled: using offline", mode)
            mode = "offline"
        kwargs = dict(project=project, entity=entity, group=group, tags=list(tags or []),
                      name=run_name, dir=str(run_dir), config=run_config,
                      settings=wandb.Settings(init_timeout=init_timeout, silent=True))
        for attempt in (mode, "offline") if mode == "online" else (mode,):
            try:
                self.run = wandb.init(mode=attempt, **kwargs)
                if attempt != mode:
                    log.warning("W&B logging offline instead; sync later with `wandb sync %s`",
                                run_dir)
                break
            except Exception as e:  # noqa: BLE001 - any W&B failure must not stop the run
                log.warning("W&B %s could not start (%s)", attempt, first_line(e)[:200])
        if self.run is None:
            log.warning("W&B tracking is off for this run; figures are in %s", run_dir)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(_numbers(metrics), step=step)

    def log_summary(self, summary: dict) -> None:
        if self.run is not None:
            self.run.summary.update(_numbers(summary))

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Table(columns=columns, data=rows)})

    def log_image(self, key: str, path: Path) -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Image(str(path))})

    def finish(self, ok: bool = True) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
