"""Read finished run folders (single runs or multirun sweeps) for reports."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlsedit_cli.errors import DataError
from rlsedit_cli.files import flatten, parse_override

ASSET_DIR = "/rlsedit_cli/assets/"  # where the package ships its assets, in any checkout

OWN_COLUMNS = ("editor", "model", "dataset")  # named in columns of their own: their keys are
# what the choice of model or dataset brings (hundreds), not settings a reader compares
DISTINGUISHING = ("dataset.path", "model.name_or_path", "model.gguf_file")  # data and weights:
# they tell runs of one model or dataset choice apart
IGNORED_OVERRIDES = ("paths.", "logger", "device", "hydra.", "resume", "overwrite", "checkpoint.")

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One finished run: its folder, summary, per-batch rows, retention and general-ability rows."""

    path: Path
    summary: dict
    config: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    retention: list[dict] = field(default_factory=list)
    general: list[dict] = field(default_factory=list)

    setting: str = ""  # what distinguishes the run among those reported (set by mark_settings)

    @property
    def label(self) -> str:
        base = f"{self.summary.get('editor', '?')} / {self.summary.get('model', '?')}"
        return f"{base} ({self.setting})" if self.setting else base

    def _override_values(self) -> dict[str, str]:
        """key -> value of every override (the first one where a key repeats)."""
        values: dict[str, str] = {}
        for o in self.overrides:
            key, value = parse_override(o)
            values.setdefault(key, value)
        return values

    def override_items(self) -> dict[str, str]:
        """Settings that can tell runs apart: every key of the run's resolved config (its
        overrides where no config.yaml was kept), not paths, tracker, device, checkpoints or the
        editor/model/dataset choices (columns of their own)."""
        values = {k: _portable(str(v)) for k, v in flatten(self.config).items()}
        values |= self._override_values()  # as the user wrote them: lam=2, not 2.0
        return {k: v for k, v in values.items()
                if not k.startswith(IGNORED_OVERRIDES) and k not in OWN_COLUMNS
                and (k.split(".")[0] not in OWN_COLUMNS[1:] or k in DISTINGUISHING)
                and not k.endswith((".name", "._target_"))}

    def override(self, key: str) -> str | None:
        """The value a run's override gave ``key`` (e.g. ``editor.lam``), else None."""
        return self._override_values().get(key)


def _csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None if value in ("", None) else value


def _parsed(file: Path, parse):
    """``parse`` of a file's text; a truncated or foreign file is named in a DataError."""
    try:
        return parse(file.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError, OSError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"{file} cannot be read ({str(e).splitlines()[0][:100]})") from e


def read_run(path: Path) -> Run:
    summary = _parsed(path / "summary.json", json.loads)
    config_file = path / "config.yaml"
    config = _parsed(config_file, yaml.safe_load) if config_file.is_file() else {}
    overrides = summary.get("overrides")
    overrides_file = path / ".hydra" / "overrides.yaml"
    if overrides is None and overrides_file.is_file():
        overrides = yaml.safe_load(overrides_file.read_text())
    metrics = []
    if (path / "metrics.jsonl").is_file():
        metrics = _parsed(path / "metrics.jsonl",
                          lambda text: [json.loads(line) for line in text.splitlines()
                                        if line.strip()])
    return Run(path=path, summary=summary, config=config or {}, overrides=overrides or [],
               metrics=metrics, retention=_csv(path / "retention.csv"),
               general=_csv(path / "general.csv"))


def _portable(value: str) -> str:
    """A shipped asset is the same file in every checkout (a worktree, a clone): asset:NAME,
    not the checkout's absolute path."""
    _, sep, tail = value.partition(ASSET_DIR)
    return f"asset:{tail}" if sep else value


def mark_settings(runs: list[Run]) -> None:
    """Give each run the settings that differ between the runs, eval.* and measure.* included.

    An editor's own settings (editor.*) are compared among the runs of that editor and model
    only (MEMIT has no lam to differ in); a run alone shows its editor's overrides.
    """
    items = [r.override_items() for r in runs]
    if len(runs) == 1:
        only = runs[0]._override_values()
        runs[0].setting = ", ".join(f"{k.removeprefix('editor.')}={v}" for k, v in only.items()
                                    if k.startswith("editor."))
        return
    for run, it in zip(runs, items):
        shown = [k for k in sorted(it)
                 if len({items[j].get(k) for j in _compared(k, run, runs, items)}) > 1]
        run.setting = ", ".join(f"{k.removeprefix('editor.')}={it[k]}" for k in shown)


def _compared(key: str, run: Run, runs: list[Run], items: list[dict]) -> list[int]:
    """The runs (their indices) ``key`` is compared among: an editor's own among its runs on
    the same model; a data or weights path among the runs of the same dataset or model choice;
    and never a run whose kept config lacks the key (a setting its code did not have yet, a run
    of an older commit: not a difference)."""
    if key.startswith("editor."):
        among = [j for j, r in enumerate(runs) if _kind(r) == _kind(run)]
    elif key in DISTINGUISHING:
        group = key.split(".")[0]
        name = (run.config.get(group) or {}).get("name")
        among = [j for j, r in enumerate(runs) if (r.config.get(group) or {}).get("name") == name]
    else:
        among = list(range(len(runs)))
    return [j for j in among if not runs[j].config or key in items[j]]


def _kind(run: Run) -> tuple:
    return run.summary.get("editor"), run.summary.get("model")


def _name_unfinished(root: Path) -> None:
    """Warn of each run under ``root`` that has no summary (killed, or still running)."""
    marks = {m.parent for name in ("metrics.jsonl", "checkpoint.pt") for m in root.rglob(name)}
    for folder in sorted(f for f in marks if not (f / "summary.json").is_file()):
        edits = 0
        if (folder / "metrics.jsonl").is_file():
            lines = folder.joinpath("metrics.jsonl").read_text(encoding="utf-8").splitlines()
            edits = json.loads(lines[-1]).get("edits", 0) if lines else 0
        how = (f"continue it with `rlsedit run resume={folder}`"
               if (folder / "checkpoint.pt").is_file() else "it has no checkpoint to resume")
        log.warning("not in the report: the run in %s is unfinished (no summary.json; %d edits "
                    "recorded): %s", folder, edits, how)


def failed_jobs(paths: list[str | Path]) -> list[tuple[Path, str]]:
    """Sweep jobs that failed (their error.txt, no summary.json): folder and first line."""
    failed = []
    for p in map(Path, paths):
        for error in sorted(p.rglob("error.txt")) if p.is_dir() else []:
            if not (error.parent / "summary.json").exists():
                text = error.read_text(encoding="utf-8", errors="replace").strip()
                failed.append((error.parent, text.splitlines()[0] if text else "no reason kept"))
    return failed


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every finished run (a folder with summary.json) under the given folders, in path order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise DataError(f"{p} is not a folder: give run folders or multirun sweep folders")
        found += sorted(s.parent for s in p.rglob("summary.json"))
        _name_unfinished(p)
    if not found:
        raise DataError(f"no finished run (summary.json) under {', '.join(map(str, paths))}")
    runs = []
    for folder in dict.fromkeys(found):
        try:
            runs.append(read_run(folder))
        except DataError as e:
            log.warning("skipping the run in %s: %s", folder, e)
    if not runs:
        raise DataError(f"no readable run under {', '.join(map(str, paths))} (see the warnings)")
    mark_settings(runs)
    return runs
