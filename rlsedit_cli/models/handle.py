"""A loaded model with its tokenizer and the architecture facts of conf/model.

Editors see edited weights through :meth:`ModelHandle.weight` in the (d_out, d_in) layout of the
mathematics whatever the storage (GPT-2's Conv1D stores W transposed); the layout is adapted here,
at the edge, and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlsedit_cli.accel import Accelerations
from rlsedit_cli.errors import ConfigError


class StopForwardError(Exception):
    """Raised by a forward hook once everything needed from a forward pass was captured."""


def block_hidden(output) -> torch.Tensor:
    """The hidden states of a block's output (a tensor, or a tuple starting with one)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: torch.Tensor):
    """A block's output with its hidden states replaced."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@dataclass
class ModelHandle:
    """A model, its tokenizer and its architecture spec (a conf/model node)."""

    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    spec: object  # ModelConfig (DictConfig)
    accel: Accelerations = field(default_factory=Accelerations)  # speed.accelerations

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where input ids go)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def num_layers(self) -> int:
        return int(self.spec.num_layers)

    @property
    def context_length(self) -> int | None:
        """The most positions the model takes (None where its config does not say)."""
        config = self.model.config
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            if isinstance(getattr(config, key, None), int):
                return int(getattr(config, key))
        return None

    def check_layers(self, layers: list[int], what: str) -> None:
        """Raise a clear error if a layer index is out of range."""
        for layer in layers:
            if not 0 <= int(layer) < self.num_layers:
                raise ConfigError(
                    f"{what}={list(layers)} has layer {layer} out of range: "
                    f"{self.spec.name} has layers 0..{self.num_layers - 1}"
                )

    def module(self, template: str, layer: int | None = None) -> nn.Module:
        name = template.format(layer) if layer is not None else template
        return self.model.get_submodule(name)

    def layer_module(self, layer: int) -> nn.Module:
        """The transformer block whose output is the residual stream after ``layer``."""
        return self.module(self.spec.layer_template, layer)

    def edited_module(self, key: int | str) -> nn.Module:
        """An edited linear map: the MLP down projection of layer ``key`` (an int), or the
        module named ``key`` (a str: another MLP map, :meth:`mlp_map`)."""
        return self.model.get_submodule(self.map_name(key))

    def map_name(self, key: int | str) -> str:
        """The module name of an edited map (an int: the MLP output map of that layer)."""
        return key if isinstance(key, str) else self.spec.mlp_out_template.format(key)

    def mlp_map(self, kind: str, layer: int) -> str:
        """The module name of the MLP map ``kind`` (gate, up, down: conf/model's mlp_maps) of
        ``layer``."""
        maps = dict(self.spec.get("mlp_maps") or {})
        if kind not in maps:
            raise ConfigError(f"{self.spec.name} has no MLP map {kind!r} (its model.mlp_maps: "
                              f"{sorted(maps) or 'none'}): use one of them, or add it to "
                              f"conf/model/{self.spec.name}.yaml")
        self.check_layers([layer], f"the layers of the {kind} maps")
        return maps[kind].format(int(layer))

    def _mlp_kind(self, name: str) -> tuple[str, int] | None:
        """(kind, layer) of a module name that one of model.mlp_maps' templates makes."""
        for kind, template in dict(self.spec.get("mlp_maps") or {}).items():
            head, _, tail = template.partition("{}")
            middle = name[len(head):len(name) - len(tail)]
            if name.startswith(head) and name.endswith(tail) and middle.isdigit():
                return kind, int(middle)
        return None

    def map_layer(self, key: int | str) -> int:
        """The layer of an edited map (its block's index)."""
        if not isinstance(key, str):
            return int(key)
        found = self._mlp_kind(key)
        if found is None:
            raise ConfigError(f"{key} is none of {self.spec.name}'s MLP maps (model.mlp_maps)")
        return found[1]

    def map_label(self, key: int | str) -> str:
        """A short name for logs and cache files: layer5 (the MLP output map of layer 5, as the
        key-value editors name it, by number or by module name), gate11 (another MLP map), or
        the module name."""
        if not isinstance(key, str):
            return f"layer{key}"
        found = self._mlp_kind(key)
        if found is None:
            return key
        kind, layer = found
        same = self.spec.mlp_maps[kind] == self.spec.mlp_out_template  # the key-value editors'
        return f"layer{layer}" if same else f"{kind}{layer}"

    def mlp_module(self, layer: int) -> nn.Module:
        """The MLP of ``layer``: the edited map's parent, position-wise in every supported arch."""
        return self.module(self.spec.mlp_out_template.rsplit(".", 1)[0], layer)

    def weight(self, layer: int | str) -> torch.Tensor:
        """W of an edited map (:meth:`edited_module`) in (d_out, d_in) layout (a view)."""
        w = self.edited_module(layer).weight
        return w.T if self.spec.weight_transposed else w

    @torch.no_grad()
    def set_weight(self, layer: int | str, W: torch.Tensor) -> None:
        """Write W (d_out, d_in), any dtype/device, into the edited map's storage."""
        param = self.edited_module(layer).weight
        param.copy_((W.T if self.spec.weight_transposed else W).to(param.dtype))

    def weight_shape(self, layer: int | str) -> tuple[int, int]:
        """(d_out, d_in) of the edited map."""
        d_out, d_in = self.weight(layer).shape
        return int(d_out), int(d_in)
