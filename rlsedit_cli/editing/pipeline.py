"""The shared key-value editing pipeline (DESIGN.md section 4) behind RLSEdit, AlphaEdit, MEMIT.

Per batch: optimise the target hidden states z at the last edited layer (batched), then for each
edited layer, lowest first: fresh keys K and current hidden states h, the residual spread over
the layers not yet updated, R = (z - h) / (layers left), and the editor's rule for that layer.
Subclasses implement :meth:`KeyValueEditor.update_layer` (and optionally :meth:`after_batch`).
"""

from __future__ import annotations

import logging
from abc import abstractmethod

import torch

from rlsedit_cli.config import TargetConfig
from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editing.keys import keys_and_hidden
from rlsedit_cli.editing.targets import optimise_targets
from rlsedit_cli.editing.templates import context_templates
from rlsedit_cli.editors.base import Editor
from rlsedit_cli.errors import ConfigError
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.progress import PhaseClock

log = logging.getLogger(__name__)


class KeyValueEditor(Editor):
    """An editor that writes (keys -> target values) into the MLP output maps of ``layers``."""

    def __init__(self, handle: ModelHandle, layers: list[int], target: dict, seed: int,
                 name: str) -> None:
        if not layers:
            raise ConfigError(f"editor.layers is empty: give {name} at least one layer")
        handle.check_layers(layers, "editor.layers")
        self.handle = handle
        self.name = name
        self.layers = sorted(int(layer) for layer in layers)
        self.z_layer = self.layers[-1]
        self.target = TargetConfig(**target) if isinstance(target, dict) else target
        self.seed = int(seed)
        self.templates: list[str] | None = None

    @property
    def edited_layers(self) -> list[int]:
        return self.layers

    def context(self) -> list[str]:
        """The context templates, sampled once from the (unedited) model."""
        if self.templates is None:
            self.templates = context_templates(self.handle, self.target.context_templates,
                                               self.seed)
            log.info("%d context templates, e.g. %r", len(self.templates), self.templates[-1])
        return self.templates

    def edit(self, batch: list[Record]) -> dict[str, float]:
        clock = PhaseClock(self.handle.device)
        with clock("templates"):
            templates = self.context()
        with clock("targets"):
            result = optimise_targets(self.handle, batch, templates, self.z_layer, self.target)
        stats = {"target_nll_before": float(result.init_loss.mean()),
                 "target_nll_after": float(result.final_loss.mean()),
                 "target_kl_after": float(result.final_kl.mean()),
                 "target_steps": float(result.steps.float().mean())}
        for i, layer in enumerate(self.layers):
            with clock("keys"):
                K, h = keys_and_hidden(self.handle, batch, templates, layer, self.z_layer)
            R = (result.z.to(h.device) - h).T / (len(self.layers) - i)  # (d_model, n)
            R = R.to(self.handle.weight(layer).device)
            with clock("update"):
                stats |= self.update_layer(layer, K, R)
        with clock("update"):
            stats |= self.after_batch(batch)
        return stats | clock.seconds()

    @abstractmethod
    def update_layer(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> dict[str, float]:
        """Write the batch into ``layer``: K (d_in, n) keys, R (d_out, n) wanted output change."""

    def after_batch(self, batch: list[Record]) -> dict[str, float]:
        """Hook after all layers are written (e.g. AlphaEdit accumulates the edited keys)."""
        return {}

    def state_dict(self) -> dict:
        return {"templates": self.templates}

    def load_state_dict(self, state: dict) -> None:
        self.templates = state.get("templates")
