"""What the runner measures and when: before the stream, after each batch, at the end."""

from __future__ import annotations

import logging
import time

from omegaconf import OmegaConf

from rlsedit_cli.accel.lower import LowerStates
from rlsedit_cli.datasets.records import Record
from rlsedit_cli.datasets.references import References
from rlsedit_cli.eval.counterfact import FAMILIES, evaluate, evaluate_records
from rlsedit_cli.eval.general import (
    GeneralSettings,
    TaskManagers,
    check_strict,
    evaluate_general,
)
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.runner.record import RunRecord
from rlsedit_cli.runner.unedited import EVAL_NOT_IN_KEY, UneditedFigures

log = logging.getLogger(__name__)
PHASES = ("pre", "batch", "retention", "general", "final")  # the measurements of a run
UNCONVERGED_NLL = 1.0  # mean target NLL after the optimisation above it: p(target) < 0.37
PERPLEXITY = "word_perplexity,none"  # lm-eval's metric that the collapse alarm follows


class Measurer:
    """CounterFact metrics, retention of the first edits and general ability of one run.

    What it measures goes to the run's :class:`RunRecord`; what a resumed run needs again (the
    figures before editing, the general-ability history, the time spent) is its state.
    """

    def __init__(self, handle: ModelHandle, refs: References | None, cfg, general, seed: int,
                 record: RunRecord, retention: list[Record], protocol: str = "probability",
                 unedited: UneditedFigures | None = None,
                 lower: LowerStates | None = None) -> None:
        """``cfg``: the ``measure`` section (editing metrics); ``general``: the ``eval`` group;
        ``protocol``: how the dataset's edits are scored (probability | accuracy);
        ``unedited``: where the unedited model's figures are reused from (None: measure);
        ``lower``: the general-ability passes' record of the blocks below the edited layers
        (accel/lower.py; None: every block at every point)."""
        self.handle, self.refs, self.cfg, self.seed = handle, refs, cfg, seed
        self.lower = lower
        self.protocol, self.unedited = protocol, unedited
        self.tasks = general
        self.record, self.retention = record, retention
        self.pre: dict | None = None
        self.general: list[dict] = []
        self.managers = TaskManagers()  # lm-eval's task index, once for the run's points
        self.seconds = 0.0
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)  # where the measuring time went
        self.warnings: list[str] = []  # runs that do not work say so (summary["warnings"])
        self.collapse: dict | None = None  # the first point past the collapse alarm

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

    def _metrics(self, phase: str, records: list[Record],
                 families: tuple[str, ...] = tuple(FAMILIES), texts: bool = True,
                 answers: bool = True):
        return self._timed(phase, evaluate, self.handle, records, self.refs, self.cfg, families,
                           self.seed, self.protocol, texts, answers)

    def _timed(self, phase: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds = time.perf_counter() - t0
            self.seconds += seconds
            self.phase_seconds[phase] += seconds

    def measure_general(self, edits: int) -> dict:
        """lm-eval on the model as it is now; one general.csv row per task."""
        cfg = self.tasks
        settings = OmegaConf.to_container(cfg, resolve=True)
        key = {"eval": {k: v for k, v in settings.items() if k not in EVAL_NOT_IN_KEY},
               "point": 3}  # 3: with per-document results
        point = (self.unedited.get("general", [], extra=key)
                 if edits == 0 and self.unedited else None)
        if point is None:
            res = evaluate_general(self.handle, list(cfg.tasks),
                                   GeneralSettings.from_cfg(cfg, self.seed), self.managers,
                                   self.lower)
            check_strict(res, cfg.strict)
            point = {"scores": res.scores, "errors": res.errors, "settings": res.settings,
                     "perplexity": {task: values[PERPLEXITY] for task, values in
                                    res.metrics.items() if PERPLEXITY in values},
                     "documents": res.documents}
            if edits == 0 and self.unedited:
                self.unedited.put("general", [], point, extra=key)
        self.record.documents(edits, point.pop("documents", {}))
        scores = named_scores(point)
        self.record.general(edits, point["scores"], metric_names(point))
        self.general.append({"edits": edits, **point})
        log.info("general ability after %d edits: %s", edits,
                 ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        self._check_collapse(edits, point.get("perplexity", {}))
        return scores

    def _check_collapse(self, edits: int, perplexity: dict[str, float]) -> None:
        """The collapse alarm: a perplexity above ``collapse_factor`` times the unedited one
        (a warning in the console, run.log and summary.json; the first one is kept)."""
        factor = self.cfg.collapse_factor
        base = self.general[0].get("perplexity", {}) if self.general[0]["edits"] == 0 else {}
        if factor is None or edits == 0:
            return
        for task, value in perplexity.items():
            ref = base.get(task)
            if ref is None or value <= factor * ref:  # NaN is past it too
                continue
            self.warn(f"collapse after {edits} edits: {task} word perplexity {value:.4g}, "
                      f"more than {factor:g}x the unedited model's {ref:.4g}")
            if self.collapse is None:
                self.collapse = {"edits": edits, "task": task, "perplexity": value,
                                 "unedited": ref, "factor": factor}

    def before(self, records: list[Record]) -> None:
        """Figures of the unedited model on the records to be edited (summary['pre'])."""
        self.pre = self.unedited.get("pre", records, self.refs) if self.unedited else None
        if self.pre is None:
            self.pre = self._metrics("pre", records)
            if self.unedited:
                self.unedited.put("pre", records, self.pre, self.refs)
        if self.protocol == "probability" and (self.pre.get("efficacy") or 0.0) > 50.0:
            self.warn(f"before editing, the model already prefers target_new over target_true on "
                      f"{self.pre['efficacy']:.0f}% of the records: it does not know these facts, "
                      "so their edits say little")
        if self.tasks.tasks:
            self._timed("general", self.measure_general, 0)
        log.info("before editing: %s", brief(self.pre))

    def after_batch(self, index: int, last: bool, batch: list[Record], done: int) -> dict:
        """The batch's efficacy right after its edit; retention and general ability when due.

        Retention measures one fixed set, the stream's first ``retention_edits`` edits: right
        after the batch that completes it, then every ``retention_every`` batches and at the end.
        """
        cfg = self.cfg
        answers = cfg.generated_at == "every"  # greedy answers here too, or only at the ends
        now = self._metrics("batch", batch, ("efficacy",), answers=answers)
        row: dict = {"batch_efficacy": now["efficacy"]}
        if now.get("efficacy_generated") is not None:
            row["batch_efficacy_generated"] = now["efficacy_generated"]
        every, size = cfg.retention_every, len(self.retention)
        completed = done >= size > done - len(batch)  # this batch made the set's last edit
        due = completed or last or (every > 0 and (index + 1) % every == 0)
        if self.retention and due and done >= size:  # always the whole set, from its first row
            ret = self._metrics("retention", self.retention,
                                texts=cfg.fluency_at == "every", answers=answers)
            self.record.retention(index, done, size, ret)
            row["retention"] = {k: v for k, v in ret.items()
                                if not k.endswith("_ci95") and k != "fluency_prompts"}
        step = self.tasks.every_edits
        if self.tasks.tasks and (last or (step > 0 and done // step > (done - len(batch)) // step)):
            row["general"] = self._timed("general", self.measure_general, done)
        return row

    def final(self, records: list[Record]) -> dict:
        """The paper's protocol: every metric over every edited record, plus general ability
        (and the figures before editing, under "pre", when they were measured)."""
        out, values = self._timed("final", evaluate_records, self.handle, records, self.refs,
                                  self.cfg, tuple(FAMILIES), self.seed, self.protocol)
        self.record.final_records([r.case_id for r in records], values)
        if self.pre is not None:
            out["pre"] = self.pre
            if out.get("efficacy") is not None and out["efficacy"] < self.pre["efficacy"]:
                self.warn(f"the edits lowered efficacy ({self.pre['efficacy']:.1f} before, "
                          f"{out['efficacy']:.1f} after)")
        out["warnings"] = list(self.warnings)
        out["collapse"] = self.collapse
        out["measure_seconds"] = {k: round(v, 3) for k, v in self.phase_seconds.items()}
        out["measurement"] = {"generation_prompts": self.cfg.generation_prompts,
                              "fluency_records": self.cfg.fluency_records,
                              "fluency_at": self.cfg.fluency_at,
                              "generated_at": self.cfg.generated_at,
                              "compute_dtype": self.cfg.compute_dtype,
                              "unedited_from_cache": dict(self.unedited.used)
                              if self.unedited else {},
                              # general ability's passes that replayed the blocks below
                              # the edited layers (accel/lower.py): the same figures
                              "replayed_below": self.lower.below if self.lower else 0,
                              "replayed_passes": self.lower.replayed if self.lower else 0}
        if self.general:
            out["general"] = {**named_scores(self.general[-1]), "points": self.general,
                              "errors": self.general[-1]["errors"],
                              "settings": self.general[-1].get("settings", {})}
        return out

    def state_dict(self) -> dict:
        return {"pre": self.pre, "general": self.general, "seconds": self.seconds,
                "phase_seconds": self.phase_seconds, "warnings": self.warnings,
                "collapse": self.collapse}

    def load_state_dict(self, state: dict) -> None:
        self.pre, self.general, self.seconds = state.get("pre"), state["general"], state["seconds"]
        self.warnings = list(state.get("warnings", []))
        self.collapse = state.get("collapse")
        self.phase_seconds = dict.fromkeys(PHASES, 0.0) | state.get("phase_seconds", {})


def brief(metrics: dict) -> str:
    keys = ("efficacy", "efficacy_generated", "generalization", "specificity", "fluency",
            "consistency")
    return ", ".join(f"{k} {metrics[k]:.2f}" for k in keys if metrics.get(k) is not None)


def metric_names(point: dict) -> dict[str, str]:
    """task -> the name of its figure (lm-eval's metric without its "none" filter:
    word_perplexity, acc, exact_match,strict-match, ...)."""
    settings = point.get("settings") or {}
    return {task: str(settings.get(task, {}).get("metric", "score")).removesuffix(",none")
            for task in point["scores"]}


def named_scores(point: dict) -> dict[str, float]:
    """A general-ability point's scores keyed ``task/metric`` (summary.json, W&B, the log)."""
    names = metric_names(point)
    return {f"{task}/{names[task]}": value for task, value in point["scores"].items()}
