"""Statistics in MEMIT's format: import, export, ls and rm of the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rlsedit_cli.errors import DataError
from rlsedit_cli.models.loader import load_model
from rlsedit_cli.runner.run import run
from rlsedit_cli.stats.anchor import AnchorStats
from rlsedit_cli.stats.commands import entries, remove
from rlsedit_cli.stats.interop import corpus_name, export_memit, import_memit, model_folder

from .conftest import compose_cfg

SMALL = ["model.anchor_samples=300", "editor=memit", "eval=none", "stream.num_edits=4",
         "stream.batch_size=2", "measure.fluency=false", "measure.pre_edit=false",
         "measure.retention_edits=0"]


def _anchor(cfg):
    handle = load_model(cfg.model, torch.device("cpu"))
    return AnchorStats(handle, cfg.paths.cache, **OmegaConf.to_container(cfg.stats, resolve=True))


def _memit_file(root, cfg, module: str, total: np.ndarray, count: int, samples: int):
    """A statistics file as MEMIT's layer_stats.py writes it (runningstats.save_cached_state)."""
    folder = root / model_folder(cfg.model.name_or_path) / f"{corpus_name(cfg.stats.corpus)}_stats"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}_float32_mom2_{samples}.npz"
    np.savez(path, **{"mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                      "mom2.count": np.array(count), "mom2.mom2": total.astype(np.float32),
                      "sample_size": np.array(samples)})
    return path


def test_a_memit_file_of_known_tensors_is_imported_as_its_moment(tmp_path):
    cfg = compose_cfg(SMALL, tmp_path)
    anchor = _anchor(cfg)
    d_in = anchor.handle.weight_shape(1)[1]
    keys = np.random.default_rng(0).standard_normal((700, d_in))
    module = anchor.handle.spec.mlp_out_template.format(1)
    path = _memit_file(tmp_path / "memit", cfg, module, keys.T @ keys, 700, 300)
    import_memit(anchor, path, cfg.model.name_or_path)
    got = anchor.moments([1])[1]
    want = torch.from_numpy((keys.T @ keys).astype(np.float32).astype(np.float64) / 700)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    [row] = entries(cfg.paths.cache)
    assert row["layer"] == 1 and row["samples"] == 300 and row["tokens"] == 700
    assert row["imported_from"] == str(path.resolve())
    assert remove(cfg.paths.cache, "gpt2_tiny", 1) and entries(cfg.paths.cache) == []


@pytest.mark.parametrize(("change", "message"), [
    ("shape", "inputs: not statistics of this model"),
    ("module", "is not an edited map of gpt2_tiny"),
    ("model", "holds statistics of model gpt2-xl"),
    ("samples", "set stats.num_samples=100000"),
])
def test_a_file_of_another_model_layer_or_size_is_refused(change, message, tmp_path):
    cfg = compose_cfg(SMALL, tmp_path)
    anchor = _anchor(cfg)
    d_in = anchor.handle.weight_shape(0)[1] + (1 if change == "shape" else 0)
    module = ("transformer.h.0.attn.c_proj" if change == "module"
              else anchor.handle.spec.mlp_out_template.format(0))
    path = _memit_file(tmp_path / "memit", cfg, module, np.eye(d_in), 10,
                       100000 if change == "samples" else 300)
    if change == "model":
        moved = tmp_path / "memit" / "gpt2-xl" / path.parent.name / path.name
        moved.parent.mkdir(parents=True)
        path = path.rename(moved)
    with pytest.raises(DataError, match=message):
        import_memit(anchor, path, cfg.model.name_or_path)
    assert entries(cfg.paths.cache) == []


def test_an_imported_file_gives_memit_the_same_update_as_the_native_cache(tmp_path):
    """A MEMIT file written from known tensors (the native C, count 1, so that mom2 / count is
    C to the bit) imported into a fresh cache: the run reads it, computes nothing, and makes
    the same edits (every batch's Figure-2 terms and the figures equal)."""
    native = compose_cfg(SMALL, tmp_path / "native")
    summary = run(native)
    anchor = _anchor(native)
    other = compose_cfg(SMALL, tmp_path / "imported")
    fresh = _anchor(other)
    for layer in native.model.edit_layers:
        moment = anchor.moments([layer])[layer].float().numpy()
        path = _memit_file(tmp_path / "memit", native,
                           anchor.handle.spec.mlp_out_template.format(layer), moment, 1, 300)
        import_memit(fresh, path, other.model.name_or_path)
        assert torch.equal(fresh.moments([layer])[layer], anchor.moments([layer])[layer])
    again = run(other)
    assert len(entries(other.paths.cache)) == 2  # read, not computed
    assert all(row["imported_from"] for row in entries(other.paths.cache))

    def terms(cfg):
        lines = (Path(cfg.paths.run_dir) / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k.startswith("layer")}
                for line in lines]

    assert terms(other) == terms(native)
    assert [again[k] for k in ("efficacy", "generalization", "specificity")] == [
        summary[k] for k in ("efficacy", "generalization", "specificity")]


def test_our_statistics_exported_in_memits_format_round_trip(tmp_path):
    cfg = compose_cfg(SMALL, tmp_path / "a")
    anchor = _anchor(cfg)
    before = anchor.moments([0, 1])
    files = export_memit(anchor, [0, 1], tmp_path / "memit", cfg.model.name_or_path)
    assert [f.name for f in files] == [
        f"{anchor.handle.spec.mlp_out_template.format(i)}_float32_mom2_300.npz" for i in (0, 1)]
    assert files[0].parent.parent.name == model_folder(cfg.model.name_or_path)
    with np.load(files[0]) as data:  # the keys and normalisation MEMIT's get_cov reads
        assert str(data["mom2.constructor"]) == "util.runningstats.SecondMoment()"
        torch.testing.assert_close(torch.from_numpy(data["mom2.mom2"] / data["mom2.count"])
                                   .double(), before[0], rtol=1e-5, atol=1e-7)
    other = compose_cfg(SMALL, tmp_path / "b")
    fresh = _anchor(other)
    for f in files:
        import_memit(fresh, f, other.model.name_or_path)
    after = fresh.moments([0, 1])
    for layer in (0, 1):  # float32 files: equal to float32 rounding
        torch.testing.assert_close(after[layer], before[layer], rtol=1e-6, atol=1e-8)


def test_the_stats_command_imports_lists_and_removes(tmp_path, capsys, caplog):
    from rlsedit_cli.cli import main

    cfg = compose_cfg(SMALL, tmp_path)
    handle = load_model(cfg.model, torch.device("cpu"))
    d_in = handle.weight_shape(1)[1]
    module = handle.spec.mlp_out_template.format(1)
    good = _memit_file(tmp_path / "memit", cfg, module, np.eye(d_in), 4, 300)
    cache = f"paths.cache={cfg.paths.cache}"
    assert main(["stats", "import", str(good), cache, "model.anchor_samples=300"]) == 0
    assert main(["stats", "ls", "--cache", cfg.paths.cache]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["model"], row["layer"], row["samples"]) == ("gpt2_tiny", 1, 300)
    assert main(["stats", "import", str(good), cache]) == 2  # 10,000 samples configured
    assert "set stats.num_samples=300" in caplog.records[-1].getMessage()
    assert main(["stats", "rm", "--cache", cfg.paths.cache]) == 2  # says what it needs
    assert main(["stats", "rm", "--all", "--cache", cfg.paths.cache]) == 0
    assert entries(cfg.paths.cache) == []
