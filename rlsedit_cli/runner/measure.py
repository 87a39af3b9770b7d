"""What the runner measures and when: before the stream, after each batch, at the end."""

from __future__ import annotations

import logging
import time

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.datasets.references import References
from rlsedit_cli.eval.counterfact import FAMILIES, evaluate
from rlsedit_cli.eval.general import GeneralSettings, check_strict, evaluate_general
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.runner.record import RunRecord

log = logging.getLogger(__name__)
UNCONVERGED_NLL = 1.0  # mean target NLL after the optimisation above it: p(target) < 0.37


class Measurer:
    """CounterFact metrics, retention of the first edits and general ability of one run.

    What it measures goes to the run's :class:`RunRecord`; what a resumed run needs again (the
    figures before editing, the general-ability history, the time spent) is its state.
    """

    def __init__(self, handle: ModelHandle, refs: References | None, cfg, general, seed: int,
                 record: RunRecord, retention: list[Record], protocol: str = "probability",
                 ) -> None:
        """``cfg``: the ``measure`` section (editing metrics); ``general``: the ``eval`` group;
        ``protocol``: how the dataset's edits are scored (probability | accuracy)."""
        self.handle, self.refs, self.cfg, self.seed = handle, refs, cfg, seed
        self.protocol = protocol
        self.tasks = general
        self.record, self.retention = record, retention
        self.pre: dict | None = None
        self.general: list[dict] = []
        self.seconds = 0.0
        self.warnings: list[str] = []  # runs that do not work say so (summary["warnings"])

    def warn(self, message: str) -> None:
        log.warning(message)
        self.warnings.append(message)

    def check_batch(self, row: dict) -> None:
        """Warn when a batch's targets did not converge or its edits did not take."""
        nll, before = row.get("target_nll_after"), row.get("target_nll_before")
        if nll is not None and nll > UNCONVERGED_NLL:
            self.warn(f"batch {row['batch']}: the targets did not converge (mean target NLL "
                      f"{before:.2f} -> {nll:.2f} after the optimisation): raise "
                      "editor.target.steps or editor.target.lr")
        efficacy = row.get("batch_efficacy")
        if efficacy is not None and efficacy < 50.0:
            self.warn(f"batch {row['batch']}: only {efficacy:.0f}% of its edits took (efficacy "
                      "right after the edit)")

    def _metrics(self, records: list[Record], families: tuple[str, ...] = tuple(FAMILIES)):
        return self._timed(evaluate, self.handle, records, self.refs, self.cfg, families,
                           self.seed, self.protocol)

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def measure_general(self, edits: int) -> dict:
        """lm-eval on the model as it is now; one general.csv row per task."""
        cfg = self.tasks
        res = evaluate_general(self.handle, list(cfg.tasks),
                               GeneralSettings.from_cfg(cfg, self.seed))
        check_strict(res, cfg.strict)
        self.record.general(edits, res.scores)
        self.general.append({"edits": edits, "scores": res.scores, "errors": res.errors,
                             "settings": res.settings})
        log.info("general ability after %d edits: %s", edits, res.scores)
        return res.scores

    def before(self, records: list[Record]) -> None:
        """Figures of the unedited model on the records to be edited (summary['pre'])."""
        self.pre = self._metrics(records)
        if self.protocol == "probability" and (self.pre.get("efficacy") or 0.0) > 50.0:
            self.warn(f"before editing, the model already prefers target_new over target_true on "
                      f"{self.pre['efficacy']:.0f}% of the records: it does not know these facts, "
                      "so their edits say little")
        if self.tasks.tasks:
            self._timed(self.measure_general, 0)
        log.info("before editing: %s", brief(self.pre))

    def after_batch(self, index: int, last: bool, batch: list[Record], done: int) -> dict:
        """The batch's efficacy right after its edit; retention and general ability when due.

        Retention measures one fixed set, the stream's first ``retention_edits`` edits: right
        after the batch that completes it, then every ``retention_every`` batches and at the end.
        """
        cfg = self.cfg
        now = self._metrics(batch, ("efficacy",))
        row: dict = {"batch_efficacy": now["efficacy"]}
        every, size = cfg.retention_every, len(self.retention)
        completed = done >= size > done - len(batch)  # this batch made the set's last edit
        due = completed or last or (every > 0 and (index + 1) % every == 0)
        if self.retention and due and done >= size:  # always the whole set, from its first row
            ret = self._metrics(self.retention)
            self.record.retention(index, done, size, ret)
            row["retention"] = {k: v for k, v in ret.items()
                                if not k.endswith("_ci95") and k != "fluency_prompts"}
        step = self.tasks.every_edits
        if self.tasks.tasks and (last or (step > 0 and done // step > (done - len(batch)) // step)):
            row["general"] = self._timed(self.measure_general, done)
        return row

    def final(self, records: list[Record]) -> dict:
        """The paper's protocol: every metric over every edited record, plus general ability
        (and the figures before editing, under "pre", when they were measured)."""
        out = self._metrics(records)
        if self.pre is not None:
            out["pre"] = self.pre
            if out.get("efficacy") is not None and out["efficacy"] < self.pre["efficacy"]:
                self.warn(f"the edits lowered efficacy ({self.pre['efficacy']:.1f} before, "
                          f"{out['efficacy']:.1f} after)")
        out["warnings"] = list(self.warnings)
        if self.general:
            out["general"] = {**self.general[-1]["scores"], "points": self.general,
                              "errors": self.general[-1]["errors"],
                              "settings": self.general[-1].get("settings", {})}
        return out

    def state_dict(self) -> dict:
        return {"pre": self.pre, "general": self.general, "seconds": self.seconds,
                "warnings": self.warnings}

    def load_state_dict(self, state: dict) -> None:
        self.pre, self.general, self.seconds = state.get("pre"), state["general"], state["seconds"]
        self.warnings = list(state.get("warnings", []))


def brief(metrics: dict) -> str:
    keys = ("efficacy", "generalization", "specificity", "fluency", "consistency")
    return ", ".join(f"{k} {metrics[k]:.2f}" for k in keys if metrics.get(k) is not None)
