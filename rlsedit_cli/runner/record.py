"""Everything a run writes, in one place: its folder's files and the tracker (W&B or none).

| file            | written                                                    |
|-----------------|------------------------------------------------------------|
| config.yaml     | at the start: the resolved config                          |
| run.log         | all along (:meth:`RunFolder.log_file`)                     |
| metrics.jsonl   | one line per batch (:meth:`RunRecord.batch`)               |
| retention.csv   | one line per retention measurement                         |
| general.csv     | one line per general-ability task and measurement          |
| checkpoint.pt   | every ``checkpoint.every`` batches (runner/checkpoint.py)  |
| summary.json    | at the end (:meth:`RunRecord.summary`)                     |
| plots/          | at the end (:meth:`RunRecord.plots`)                       |
| documents/      | per general-ability point: each document's results; at the |
|                 | end each edited record's final values (final_records.jsonl)|

The tracker receives the same rows, the summary and the plots.
"""

from __future__ import annotations

import json
import math

from rlsedit_cli.runner import checkpoint
from rlsedit_cli.runner.folder import RunFolder, disk_errors, write_atomic


class RunRecord:
    """The run folder's files and the tracker of one run."""

    def __init__(self, folder: RunFolder, tracker) -> None:
        self.folder, self.tracker = folder, tracker

    def general(self, edits: int, scores: dict[str, float], metrics: dict[str, str]) -> None:
        """General ability measured after ``edits`` edits (0: before the stream); ``metrics``
        names each task's figure."""
        for task, score in scores.items():
            self.folder.append_csv("general.csv", {"edits": edits, "task": task,
                                                   "metric": metrics[task], "score": score})
        if edits == 0:
            self.tracker.log({"general": {f"{t}/{metrics[t]}": v for t, v in scores.items()}},
                             step=0)

    def documents(self, edits: int, per_task: dict[str, list[dict]]) -> None:
        """Each scored document of a general-ability point (``documents/general_EDITS.jsonl``:
        task, doc_id and the document's metric values), for paired comparisons."""
        if not per_task:
            return
        self._document(f"documents/general_{edits:07d}.jsonl",
                       [json.dumps({"task": task, **row}) for task, rows in per_task.items()
                        for row in rows])

    def final_records(self, case_ids: list, values: dict) -> None:
        """Each edited record's final values (``documents/final_records.jsonl``: case_id and
        one value per metric, null where not measured), for figures over any subset."""
        if not case_ids:
            return
        self._document("documents/final_records.jsonl", [json.dumps({"case_id": case_id, **{
            metric: None if math.isnan(float(column[i])) else round(float(column[i]), 6)
            for metric, column in values.items()}}) for i, case_id in enumerate(case_ids)])

    def _document(self, name: str, lines: list[str]) -> None:
        """``lines`` as the run's file ``name`` under documents/, written whole."""
        self.folder.claim(name)
        with disk_errors(self.folder.path, name):
            (self.folder.path / "documents").mkdir(exist_ok=True)
            write_atomic(self.folder.path / name, "\n".join(lines) + "\n")

    def retention(self, batch: int, edits: int, measured: int, metrics: dict) -> None:
        """The first edits of the stream, measured again after batch ``batch``."""
        self.folder.append_csv("retention.csv", {"batch": batch, "edits": edits,
                                                 "measured": measured, **metrics})

    def batch(self, row: dict) -> None:
        """One batch's line: its edit, its measurements and the editor's statistics."""
        self.folder.append_jsonl("metrics.jsonl", row)
        self.tracker.log(row, step=row["edits"])

    def lines(self) -> dict[str, int]:
        """Line counts of the line files (saved in checkpoints)."""
        return {name: checkpoint.count_lines(self.folder.path / name)
                for name in RunFolder.LINE_FILES}

    def rewind(self, lines: dict[str, int]) -> None:
        """Back to the line counts of a checkpoint: lines written after it are dropped."""
        for name, keep in lines.items():
            checkpoint.truncate_lines(self.folder.path / name, keep)

    def summary(self, summary: dict) -> None:
        self.folder.write_json("summary.json", summary)
        self.tracker.log_summary(summary)

    def plots(self) -> None:
        """The run's own curves, in plots/ and on the tracker."""
        from rlsedit_cli.report.plots import all_plots
        from rlsedit_cli.report.runs import read_run

        done = read_run(self.folder.path)
        with disk_errors(self.folder.path, "the plots"):
            paths = all_plots([done], self.folder.path / "plots")
        for path in paths:
            self.folder.claim(str(path.relative_to(self.folder.path)))
        for path in paths:
            self.tracker.log_image(f"plots/{path.stem}", path)
        if done.retention:
            columns = list(done.retention[0])
            self.tracker.log_table("retention", columns,
                                   [[row[c] for c in columns] for row in done.retention])

    def finish(self, ok: bool) -> None:
        self.tracker.finish(ok)
