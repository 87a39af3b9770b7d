"""``rlsedit tune``: the steps that find an editor's settings for a model, in a folder of their
own, each step's result a file there so that a tune run again continues where it stopped.

Steps, in order (each uses the settings the earlier ones chose):
1. know: the unedited model's figures on the tuning records; unusable records are refused.
2. trace: causal tracing; the window of layers it proposes (key-value editors, ROME's layer).
3. targets: the target optimisation's step size, clamp and step count at the inject layer.
4. samples: how many anchor samples until the figures stop moving.
5. grid: the editor's trade-off on a short held-out stream, with the configured settings as
   one more point; the chosen point's settings are written where the configs read them.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlsedit_cli.errors import ConfigError
from rlsedit_cli.files import replaced_atomically
from rlsedit_cli.tune import jobs

log = logging.getLogger(__name__)

STEPS = ("know", "trace", "targets", "samples", "grid")
NO_TUNED = {"tuned": "none"}  # a tune measures without settings an earlier tune wrote


@dataclass
class TuneSettings:
    """What a tune measures; kept in its folder (tune.json): run again, it must match."""

    overrides: list[str]
    offset: int
    edits: int
    batch: int
    trace_records: int
    trace_samples: int = 10
    window: int = 10
    noise: float = 3.0
    target_records: int = 10
    lrs: list[float] = field(default_factory=list)
    clamps: list[float] = field(default_factory=list)
    grid: dict = field(default_factory=dict)
    sample_counts: list[int] = field(default_factory=list)


class Budget:
    """Minutes this invocation may spend (None: no limit); checked before each step and job."""

    def __init__(self, minutes: float | None) -> None:
        self.minutes, self.start = minutes, time.monotonic()

    def spent(self) -> bool:
        return self.minutes is not None and time.monotonic() - self.start > 60 * self.minutes


class BudgetSpentError(Exception):
    """The budget ran out before a step or job: what is done stays, the next call goes on."""


class Tune:
    """One tune folder: its settings, its steps' results, its jobs."""

    def __init__(self, cfg, out: Path, settings: TuneSettings, budget: Budget,
                 settings_dir: Path | None) -> None:
        """``cfg``: :func:`compose` of the settings' overrides; ``settings_dir``: where the
        chosen settings are written (its ``tuned/`` folder on Hydra's search path; None: not
        written)."""
        self.cfg, self.out, self.settings, self.budget = cfg, out, settings, budget
        self.settings_dir = settings_dir
        self.editor, self.model = str(self.cfg.editor.name), str(self.cfg.model.name)
        self._handle = None

    # the folder ---------------------------------------------------------------------------
    def claim(self) -> None:
        """Write tune.json, or check that an earlier tune in the folder measured the same."""
        path = self.out / "tune.json"
        mine = asdict(self.settings)
        if path.is_file():
            earlier = self.load("tune.json")
            if earlier.get("settings") != mine:
                before = earlier.get("settings", {})
                changed = ", ".join(sorted(k for k in mine if before.get(k) != mine[k]))
                raise ConfigError(f"{self.out} holds a tune with other settings ({changed}): "
                                  "run it with the same ones to continue, or choose another "
                                  "--out")
            log.info("continuing the tune in %s", self.out)
            return
        if self.out.exists() and any(self.out.iterdir()):
            raise ConfigError(f"--out {self.out} is not empty and holds no tune: choose a new "
                              "folder (a tune writes its own)")
        self.save("tune.json", {"tool": "rlsedit tune", "editor": self.editor,
                                "model": self.model, "settings": mine})

    def save(self, name: str, data: dict) -> None:
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")

    def load(self, name: str) -> dict | None:
        path = self.out / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"{path} is not the JSON a tune writes ({e}): remove it to "
                              "measure that step again") from e

    def check_budget(self, what: str) -> None:
        if self.budget.spent():
            raise BudgetSpentError(f"the budget of {self.budget.minutes:g} minutes is spent "
                                   f"before {what}: what is done is kept in {self.out}; the "
                                   "same command continues from there")

    # inputs ------------------------------------------------------------------------------
    @property
    def handle(self):
        if self._handle is None:
            from rlsedit_cli.models.loader import load_configured, resolve_device

            self._handle = load_configured(self.cfg, resolve_device(str(self.cfg.device)))
        return self._handle

    @functools.cached_property
    def tuning_records(self) -> list:
        """The tuning records: the stream's [offset, offset + edits) (file order when the
        configured stream does not shuffle)."""
        from rlsedit_cli.datasets.stream import make_stream
        from rlsedit_cli.runner.run import build

        s = self.settings
        stream = self.cfg.stream
        batches = make_stream(build(self.cfg.dataset).records, s.edits, s.batch,
                              int(stream.seed), bool(stream.shuffle), s.offset)
        return [r for b in batches for r in b]

    def where(self) -> str:
        stream = self.cfg.stream
        order = f"shuffled with seed {stream.seed}" if stream.shuffle else "in file order"
        first = self.settings.offset
        return f"stream positions {first}..{first + self.settings.edits - 1}, {order}"

    # settings chosen so far ----------------------------------------------------------------
    def chosen(self) -> dict[str, tuple[str, str]]:
        """{override key: (value, what measured it)} from the steps done so far."""
        out: dict[str, tuple[str, str]] = {}
        trace = self.load("trace/trace.json")
        if trace and trace.get("proposed_layers"):
            layers = trace["proposed_layers"]
            why = (f"causal trace: MLP indirect effect peaks at layer {trace['peak_layer']} over "
                   f"{trace['traced']} known facts (trace/report.md)")
            if "layers" in self.cfg.editor:
                out["model.edit_layers"] = (json.dumps(layers).replace(" ", ""), why)
            elif "layer" in self.cfg.editor and "target" in self.cfg.editor:  # ROME
                out["model.single_layer"] = (str(trace["peak_layer"]), why)
        targets = self.load("targets.json")
        if targets and targets["choice"]["converged"]:
            c = targets["choice"]
            why = (f"targets: mean target NLL below {c['threshold']:g} after {c['converged_at']} "
                   f"steps over {targets['requests']} requests at layer {targets['z_layer']}")
            for key in ("lr", "clamp_norm_factor", "steps"):
                out[f"editor.target.{key}"] = (str(c[key]), why)
        samples = self.load("samples.json")
        if samples:
            why = (f"samples: {samples['rule']} ({samples['chosen']} of "
                   f"{samples['configured']}; samples.json)")
            out["model.anchor_samples"] = (str(samples["chosen"]), why)
        return out

    def job_overrides(self, values: dict, configured: bool = False) -> list[str]:
        s = self.settings
        stream = {"stream.offset": str(s.offset), "stream.num_edits": str(s.edits),
                  "stream.batch_size": str(s.batch)}
        mine = {} if configured else {k: v for k, (v, _) in self.chosen().items()}
        return jobs.merged(NO_TUNED, jobs.QUIET, jobs.as_dict(s.overrides), stream, mine, values)

    def run_jobs(self, prefix: str, values: list[dict]) -> list[dict]:
        """The jobs of ``values`` (one override dict each; {} with prefix "configured": the
        configured settings), their points in order."""
        self._handle = None  # each job loads its own copy: one model in memory at a time
        points = []
        for i, v in enumerate(values):
            name = prefix if prefix == "configured" else jobs.job_name(prefix, v)
            self.check_budget(f"job {name}")
            log.info("tune %s: job %d/%d of this step, %s", prefix, i + 1, len(values), name)
            summary = jobs.run_job(self.job_overrides(v, prefix == "configured"),
                                   self.out / "jobs" / name)
            points.append(jobs.point(name, v, summary))
        return points

    # the steps ---------------------------------------------------------------------------
    def run(self, steps: list[str]) -> None:
        from rlsedit_cli.tune import steps as step_fns

        self.claim()
        for name in STEPS:
            if name in steps:
                getattr(step_fns, name)(self)


def compose(overrides: list[str]):
    """The config a tune measures from: ``overrides`` without an earlier tune's settings."""
    from rlsedit_cli.config import composed

    return composed(jobs.merged(NO_TUNED, jobs.as_dict(overrides)))
