"""No edit: the stream runs and the unedited model is measured (a reference row)."""

from __future__ import annotations

from dataclasses import dataclass

from rlsedit_cli.config import EditorConfig
from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editors.base import Editor


@dataclass
class NoEditConfig(EditorConfig):
    _target_: str = "rlsedit_cli.editors.none.NoEdit"
    name: str = "none"


class NoEdit(Editor):
    name = "none"

    def __init__(self, handle, stats=None, name: str = "none") -> None:
        self.handle = handle

    def edit(self, batch: list[Record]) -> dict[str, float]:
        return {}
