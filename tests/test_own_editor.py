"""An editor defined here, in this file only: its class, its typed settings, its registration.
Nothing in rlsedit_cli/ or conf/ names it, yet `editor=shrink` composes, runs, checkpoints,
resumes and reports through the same harness as the package's editors (docs/extending.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import MISSING
from safetensors.torch import load_file

from rlsedit_cli import config
from rlsedit_cli.editors.base import Editor, MasterWeights
from rlsedit_cli.errors import ConfigError
from rlsedit_cli.runner import checkpoint
from rlsedit_cli.runner.run import run
from rlsedit_cli.settings import EditorConfig

from .conftest import TINY_BUNDLE, compose_cfg, interrupt_after_row


@dataclass
class ShrinkConfig(EditorConfig):
    layer: int = MISSING  # the layer whose MLP output map shrinks
    factor: float = MISSING  # each batch multiplies the map by it


class Shrink(Editor):
    """Multiplies one MLP output map by ``factor`` per batch: no fact is learnt, but the model
    changes, the stream has state (batches seen) and the map is written as editors write."""

    def __init__(self, handle, anchor=None, *, name: str, layer: int, factor: float) -> None:
        handle.check_layers([layer], "editor.layer")
        if not 0 < factor <= 1:
            raise ConfigError(f"editor.factor={factor} must be in (0, 1]")
        self.handle, self.layer, self.factor = handle, layer, factor
        self.name, self.batches = name, 0
        self.master = MasterWeights(handle)

    @property
    def edited_layers(self) -> list[int]:
        return [self.layer]

    def edit(self, batch) -> dict[str, float]:
        W = self.master.now(self.layer)  # (d_out, d_in)
        self.master.add(self.layer, (self.factor - 1) * W)
        self.batches += 1
        return {"batches": float(self.batches)}

    def state_dict(self) -> dict:
        return {"batches": self.batches, "master": self.master.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])
        self.master.load_state_dict(state["master"])


@pytest.fixture(autouse=True)
def shrink_editor():
    config.register_editor("shrink", ShrinkConfig, _target_=f"{__name__}.Shrink", layer=1,
                           factor=0.5)


RUN = ["editor=shrink", "eval=none", "measure.fluency=false", "stream.num_edits=20",
       "stream.batch_size=10", "measure.retention_every=0"]


def _shipped_map(layer: int) -> torch.Tensor:
    return load_file(TINY_BUNDLE / "model.safetensors")[f"transformer.h.{layer}.mlp.c_proj.weight"]


def test_an_editor_defined_in_a_test_runs_through_the_harness(tmp_path):
    summary = run(compose_cfg(RUN, tmp_path / "run"))
    assert summary["editor"] == "shrink" and summary["num_edits"] == 20
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [row["batches"] for row in rows] == [1.0, 2.0]
    final = load_file(tmp_path / "run" / "final_maps.safetensors")
    W0 = _shipped_map(1)
    W = final["1"] if final["1"].shape == W0.shape else final["1"].T
    assert torch.allclose(W, 0.25 * W0, atol=1e-6)


LONGER = ["stream.num_edits=30", "checkpoint.every=1"]


def test_it_resumes_from_its_checkpoint_without_repeating_a_batch(tmp_path, monkeypatch):
    interrupt_after_row(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg([*RUN, *LONGER], tmp_path / "run"))
    monkeypatch.undo()
    folder = tmp_path / "run"
    run(compose_cfg([*RUN, *LONGER, f"resume={folder}"], folder))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    assert [row["batches"] for row in rows] == [1.0, 2.0, 3.0]  # state restored, none repeated
    final = checkpoint.load(folder)["weights"][1]  # a run that keeps checkpoints keeps its maps
    W0 = _shipped_map(1)
    assert torch.allclose(final if final.shape == W0.shape else final.T, 0.125 * W0, atol=1e-6)


def test_its_settings_are_typed_and_checked(tmp_path):
    with pytest.raises(ConfigCompositionException, match="editor.factor"):
        compose_cfg(["editor=shrink", "editor.factor=half"])
    with pytest.raises(ConfigCompositionException, match="editor.layers"):
        compose_cfg(["editor=shrink", "editor.layers=[1]"])
    with pytest.raises(ConfigError, match="editor.factor=2.0 must be in"):
        run(compose_cfg([*RUN, "editor.factor=2"], tmp_path / "bad"))
    with pytest.raises(ConfigError, match="editor.layer"):
        run(compose_cfg([*RUN, "editor.layer=7"], tmp_path / "bad2"))
