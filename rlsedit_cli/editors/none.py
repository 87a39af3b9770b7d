"""No edit: the stream runs and the unedited model is measured (a reference row)."""

from __future__ import annotations

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editors.base import Editor


class NoEdit(Editor):
    name = "none"

    def __init__(self, handle, anchor=None, name: str = "none") -> None:
        self.handle = handle

    def edit(self, batch: list[Record]) -> dict[str, float]:
        return {}
