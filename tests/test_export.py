"""``rlsedit export``: a run's edited model outside rlsedit, in both forms, reproduces the run."""

from __future__ import annotations

import pytest
from omegaconf import open_dict

from rlsedit_cli.cli import main
from rlsedit_cli.datasets.stream import stream_of
from rlsedit_cli.errors import DataError
from rlsedit_cli.eval.counterfact import evaluate
from rlsedit_cli.models.loader import load_model
from rlsedit_cli.runner.export import MAPS, apply_edited_maps, export_run
from rlsedit_cli.runner.run import build, run

RUN = ["editor=rlsedit", "eval=none", "stream.num_edits=6", "stream.batch_size=3",
       "measure.fluency=false", "measure.pre_edit=false", "measure.retention_edits=0",
       "checkpoint.every=1"]


def _efficacy(cfg, handle) -> float:
    records = [r for b in stream_of(build(cfg.dataset).records, cfg.stream) for r in b]
    return evaluate(handle, records, None, cfg.measure, texts=False)["efficacy"]


def test_both_forms_load_and_reproduce_the_runs_efficacy(make_cfg, tmp_path):
    cfg = make_cfg(*RUN)
    summary = run(cfg)
    folder, out = tmp_path / "run", tmp_path / "export"
    written = export_run(folder, out, full=True)
    assert written["num_edits"] == "6" and written["layers"] == "0,1"
    assert (out / MAPS).stat().st_size < 0.2 * sum(
        p.stat().st_size for p in (out / "model").glob("*.safetensors"))

    with open_dict(cfg):  # (b) the whole model, as transformers' from_pretrained loads it
        cfg.model.name_or_path = str(out / "model")
    full = load_model(cfg.model, "cpu")
    assert _efficacy(cfg, full) == summary["efficacy"]

    base = make_cfg(*RUN)  # (a) the edited maps, written into the unedited base model
    handle = load_model(base.model, "cpu")
    before = _efficacy(base, handle)
    info = apply_edited_maps(handle.model, out / MAPS)
    assert info["editor"] == "rlsedit" and info["model_config"] == "gpt2_tiny"
    assert _efficacy(base, handle) == summary["efficacy"] != before
    with pytest.raises(DataError, match="other weights"):  # not its base any more
        apply_edited_maps(handle.model, out / MAPS)


def test_a_finished_run_without_checkpoints_exports(make_cfg, tmp_path, caplog):
    """A finished run keeps its final edited maps (small next to the model), so it exports
    without checkpoint.every; a run stopped before any checkpoint is one line."""
    summary = run(make_cfg(*RUN[:-1]))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    base = make_cfg(*RUN[:-1])
    handle = load_model(base.model, "cpu")
    apply_edited_maps(handle.model, out / MAPS)
    assert _efficacy(base, handle) == summary["efficacy"]
    (tmp_path / "run" / "final_maps.safetensors").unlink()  # as if killed before the end
    caplog.clear()
    code = main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export2")])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2 and len(errors) == 1 and "neither a checkpoint" in errors[0]
    assert not (tmp_path / "export2").exists()
