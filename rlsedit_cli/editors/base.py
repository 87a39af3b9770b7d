"""The interface every editor implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

from rlsedit_cli.datasets.records import Record


class Editor(ABC):
    """Edits a model in place, one batch of requests at a time.

    Sequential state (RLSEdit's P matrices, AlphaEdit's accumulated keys, ...) lives in the
    editor and round-trips through :meth:`state_dict` / :meth:`load_state_dict` for checkpoints.
    """

    name: str = "editor"

    @property
    def edited_layers(self) -> list[int]:
        """Layers whose edited map this editor changes (saved in checkpoints)."""
        return []

    @abstractmethod
    def edit(self, batch: list[Record]) -> dict[str, float]:
        """Apply one batch of edits to the model; return per-batch statistics to log."""

    def state_dict(self) -> dict:
        """Everything needed to continue the stream after a restart (tensors allowed)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        del state
