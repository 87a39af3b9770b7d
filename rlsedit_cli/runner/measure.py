"""What the runner measures and when: before the stream, after each batch, at the end."""

from __future__ import annotations

import logging
import time

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.eval.counterfact import References, evaluate
from rlsedit_cli.eval.general import check_strict, evaluate_general
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.runner.folder import RunFolder

log = logging.getLogger(__name__)


class Measurer:
    """CounterFact metrics, retention of the first edits and lm-eval checkpoints of one run."""

    def __init__(self, handle: ModelHandle, refs: References | None, cfg, seed: int,
                 folder: RunFolder, tracker, retention: list[Record]) -> None:
        self.handle, self.refs, self.cfg, self.seed = handle, refs, cfg, seed
        self.folder, self.tracker, self.retention = folder, tracker, retention
        self.general: list[dict] = []
        self.seconds = 0.0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def general_checkpoint(self, edits: int) -> dict:
        """lm-eval on the model as it is now; one general.csv row per task."""
        cfg = self.cfg
        res = evaluate_general(self.handle, list(cfg.tasks), cfg.limit, cfg.num_fewshot,
                               cfg.lm_batch_size, cfg.allow_code_execution, self.seed)
        check_strict(res, cfg.strict)
        for task, score in res.scores.items():
            self.folder.append_csv("general.csv", {"edits": edits, "task": task, "score": score})
        self.general.append({"edits": edits, "scores": res.scores, "errors": res.errors})
        log.info("general ability after %d edits: %s", edits, res.scores)
        return res.scores

    def before(self, records: list[Record]) -> dict:
        """Figures of the unedited model on the records to be edited (summary['pre'])."""
        pre = self._timed(evaluate, self.handle, records, self.refs, self.cfg)
        if self.cfg.tasks:
            self.tracker.log({"general": self._timed(self.general_checkpoint, 0)}, step=0)
        log.info("before editing: %s", brief(pre))
        return pre

    def after_batch(self, index: int, last: bool, batch: list[Record], done: int) -> dict:
        """The batch's efficacy right after its edit; retention and general ability when due."""
        cfg = self.cfg
        now = self._timed(evaluate, self.handle, batch, self.refs, cfg, ("efficacy",))
        row: dict = {"batch_efficacy": now["efficacy"]}
        every = cfg.retention_every
        if self.retention and (last or (every > 0 and (index + 1) % every == 0)):
            measured = self.retention[:done]
            ret = self._timed(evaluate, self.handle, measured, self.refs, cfg)
            self.folder.append_csv("retention.csv", {"batch": index, "edits": done,
                                                     "measured": len(measured), **ret})
            row["retention"] = {k: v for k, v in ret.items()
                                if not k.endswith("_ci95") and k != "fluency_prompts"}
        step = cfg.every_edits
        if cfg.tasks and (last or (step > 0 and done // step > (done - len(batch)) // step)):
            row["general"] = self._timed(self.general_checkpoint, done)
        return row

    def final(self, records: list[Record]) -> dict:
        """The paper's protocol: every metric over every edited record, plus general ability."""
        out = self._timed(evaluate, self.handle, records, self.refs, self.cfg)
        if self.general:
            out["general"] = {**self.general[-1]["scores"], "checkpoints": self.general,
                              "errors": self.general[-1]["errors"]}
        return out

    def state_dict(self) -> dict:
        return {"general": self.general, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.general, self.seconds = state["general"], state["seconds"]


def brief(metrics: dict) -> str:
    keys = ("efficacy", "generalization", "specificity", "fluency", "consistency")
    return ", ".join(f"{k} {metrics[k]:.2f}" for k in keys if metrics.get(k) is not None)
