"""Context templates given instead of sampled: a run's own, fed back, reproduce it exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlsedit_cli.editing.templates import ContextTemplates, given_templates
from rlsedit_cli.errors import ConfigError, DataError
from rlsedit_cli.runner.run import run

from .conftest import compose_cfg

RUN = ["editor=rlsedit", "eval=none", "measure.fluency=false", "stream.num_edits=20",
       "stream.batch_size=10", "measure.retention_every=0"]
FIGURES = ("efficacy", "generalization", "specificity", "efficacy_magnitude")


def test_a_runs_templates_fed_back_reproduce_it_exactly(tmp_path):
    sampled = run(compose_cfg(RUN, tmp_path / "a"))
    written = tmp_path / "a" / "context_templates.json"
    groups = json.loads(written.read_text())
    assert groups[0] == ["{}"] and len(groups[1]) == 5  # the references' nested form
    given = run(compose_cfg([*RUN, f"editor.target.context_templates={written}"],
                            tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "context_templates.json").read_text()) == groups
    for key in FIGURES:
        assert given[key] == sampled[key], key
    maps_a = load_file(tmp_path / "a" / "final_maps.safetensors")
    maps_b = load_file(tmp_path / "b" / "final_maps.safetensors")
    for name, weight in maps_a.items():
        assert torch.equal(maps_b[name], weight), name


def test_templates_on_the_command_line_and_their_weights(shipped_handle):
    cfg = compose_cfg(['editor.target.context_templates=[["{}"],["A fact. {}","So. {}"]]'])
    templates = ContextTemplates(shipped_handle, cfg.editor.target.context_templates, 0)
    assert templates.get() == ["{}", "A fact. {}", "So. {}"]
    assert templates.weights == pytest.approx([1 / 2, 1 / 4, 1 / 4])  # MEMIT: per group
    assert ContextTemplates(shipped_handle, [], 0).get() == ["{}"]  # the plain prompt alone
    rome = ContextTemplates(shipped_handle, [["{}"], ["A fact. {}", "So. {}"]], 0, "rome")
    assert rome.weights == pytest.approx([1 / 3] * 3)


def test_bad_templates_are_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("[[")
    for value, error, said in (
            ([["{}"], ["No slot."]], ConfigError, "exactly one {}"),
            ([["{} and {}"]], ConfigError, "exactly one {}"),
            ([[10]], ConfigError, "neither a sampling spec"),
            ([10, 5], ConfigError, "neither a sampling spec"),
            (str(tmp_path / "bad.json"), DataError, "is not JSON"),
            (str(tmp_path / "absent.json"), DataError, "cannot read it")):
        with pytest.raises(error, match=said):
            given_templates(value)
