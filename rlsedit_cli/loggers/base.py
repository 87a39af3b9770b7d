"""The tracker interface and the no-op tracker (``logger=none``)."""

from __future__ import annotations

from pathlib import Path


class Tracker:
    """The base of every tracker; itself it tracks nothing (every method is a no-op)."""

    def __init__(self, name: str = "none", **_: object) -> None:
        self.name = name

    def log(self, metrics: dict, step: int) -> None:
        """Scalars at a step (edits made so far)."""

    def log_summary(self, summary: dict) -> None:
        """Final figures of the run."""

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """A table (e.g. the retention curve)."""

    def log_image(self, key: str, path: Path) -> None:
        """A plot written to disk."""

    def finish(self, ok: bool = True) -> None:
        """Close the tracker."""
