"""The interface every editor implements, and the key-value pipeline of MEMIT-style editors.

One batch of a :class:`KeyValueEditor` (RLSEdit, AlphaEdit, MEMIT), top-down:

1. context templates, sampled once (editing/templates.py);
2. the target hidden states z after the last edited layer, optimised for the whole batch at
   once (editing/targets.py; its loss is defined plainly in editing/reference.py, computed
   fast in accel/target_loss.py);
3. for each edited layer, lowest first: the keys K of its MLP output map and the current hidden
   states h after the last edited layer, re-read after the layers below were written
   (editing/keys.py); the residual R = (z - h) / (layers left); the editor's own rule
   :meth:`KeyValueEditor.update_layer` writes it (the mathematics is in ops/).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from omegaconf import OmegaConf

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editing.keys import LayerKeys
from rlsedit_cli.editing.targets import optimise_targets
from rlsedit_cli.editing.templates import ContextTemplates
from rlsedit_cli.errors import ConfigError
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.progress import PhaseClock
from rlsedit_cli.settings import TargetConfig


class MasterWeights:
    """Where the editors add their updates: a float32 master copy of each edited map when the
    model holds it in lower precision (bf16, fp16), so that many small updates do not each round
    to the model's precision; the model receives the master, rounded once per write. A float32
    (or float64) model is its own master. The references edit float32 models; this keeps a
    bf16 run's edits as close to theirs as the model's own precision allows.
    """

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle
        self.copies: dict[int, torch.Tensor] = {}  # layer -> (d_out, d_in) float32

    def add(self, layer: int, delta: torch.Tensor) -> None:
        """W_layer += delta (d_out, d_in)."""
        W = self.handle.weight(layer)
        if layer not in self.copies and W.dtype in (torch.float32, torch.float64):
            self.handle.set_weight(layer, W.to(torch.promote_types(W.dtype, delta.dtype)) + delta)
            return
        if layer not in self.copies:
            self.copies[layer] = W.detach().float()
        self.copies[layer] += delta.to(self.copies[layer])
        self.handle.set_weight(layer, self.copies[layer])

    def now(self, layer: int | str) -> torch.Tensor:
        """The map as the editor holds it: its float32 master, else the model's weight."""
        W = self.copies.get(layer)
        return W if W is not None else self.handle.weight(layer).detach().float()

    def state_dict(self) -> dict:
        return dict(self.copies)

    def load_state_dict(self, state: dict | None) -> None:
        self.copies = {layer: W.to(self.handle.weight(layer).device)
                       for layer, W in (state or {}).items()}


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

    def written(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per edited layer, the keys (d_in, n) and wanted outputs (d_out, n) of the last batch
        (the objective terms, runner/terms.py; docs/design.md section 8). None written: empty."""
        return {}

    def state_dict(self) -> dict:
        """Everything needed to continue the stream after a restart (tensors allowed)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        del state


def target_config(target: dict | TargetConfig | None) -> TargetConfig:
    """The editor's ``target`` section as a :class:`TargetConfig`; every value must be given
    (each value's range is checked with the composed config: rlsedit_cli/validate.py)."""
    if isinstance(target, TargetConfig):
        return target
    node = OmegaConf.merge(OmegaConf.structured(TargetConfig), target or {})
    missing = [key for key in node if OmegaConf.is_missing(node, key)]
    if missing:
        raise ConfigError(f"editor.target.{missing[0]} is not set: give it on the command line "
                          "or in conf/target/MODEL.yaml")
    return OmegaConf.to_object(node)


def target_stats(result) -> dict[str, float]:
    """What the target optimisation reports per batch (means over the requests)."""
    return {"target_nll_before": float(result.init_loss.mean()),
            "target_nll_after": float(result.final_loss.mean()),
            "target_kl_after": float(result.final_kl.mean()),
            "target_steps": float(result.steps.float().mean())}


class TargetEditor(Editor):
    """An editor that optimises target values (MEMIT's, AlphaEdit's, RLSEdit's and ROME's): its
    target settings, its context templates and the float32 masters of the maps it writes."""

    def __init__(self, handle: ModelHandle, target: dict | None, seed: int,
                 style: str = "memit") -> None:
        self.handle = handle
        self.target = target_config(target)
        self.templates = ContextTemplates(handle, self.target.context_templates, int(seed),
                                          style)
        self.master = MasterWeights(handle)
        self._written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def written(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return self._written

    def map_now(self, layer: int) -> torch.Tensor:
        """The edited map as the editor holds it before its update: its float32 master."""
        return self.master.now(layer)

    def state_dict(self) -> dict:
        return {"templates": self.templates.texts, "master": self.master.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.templates.texts = state.get("templates")
        self.master.load_state_dict(state.get("master"))


class KeyValueEditor(TargetEditor):
    """An editor that writes (keys -> target values) into the MLP output maps of ``layers``."""

    def __init__(self, handle: ModelHandle, layers: list[int], target: dict | None, seed: int,
                 name: str) -> None:
        if not layers:
            raise ConfigError(f"editor.layers is empty: give {name} at least one layer")
        handle.check_layers(layers, "editor.layers")
        super().__init__(handle, target, seed)
        self.name = name
        self.layers = sorted(int(layer) for layer in layers)
        self.z_layer = self.layers[-1]

    @property
    def edited_layers(self) -> list[int]:
        return self.layers

    def edit(self, batch: list[Record]) -> dict[str, float]:
        clock = PhaseClock(self.handle.device)
        with clock("templates"):
            templates = self.templates.get()
        with clock("targets"):
            result = optimise_targets(self.handle, batch, templates, self.z_layer, self.target)
        stats = target_stats(result)
        keys = LayerKeys(self.handle, batch, templates, self.z_layer, self.target.keys_dtype)
        self._written = {}
        for i, layer in enumerate(self.layers):
            with clock("keys"):  # h is read again: the layers below have just been written
                K, h = keys.read(layer, self.templates.weights)
            R = (result.z.to(h.device) - h).T / (len(self.layers) - i)  # (d_model, n)
            R = R.to(self.handle.weight(layer).device)
            K = K.to(R.device)
            W = self.map_now(layer)  # the wanted outputs: the map's now plus its share of z - h
            self._written[layer] = (K, (W @ K.to(W) + R.to(W)).float())  # (d_in, n), (d_out, n)
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
