"""Dataset loaders (toy, ROME and EasyEdit CounterFact, zsRE), validation and the edit stream."""

from __future__ import annotations

import json

import pytest
import torch

from rlsedit_cli.datasets import counterfact, counterfact_easyedit, zsre
from rlsedit_cli.datasets.stream import make_stream
from rlsedit_cli.datasets.toy import load as load_toy
from rlsedit_cli.errors import ConfigError, DataError
from rlsedit_cli.runner.run import run
from rlsedit_cli.validate import check

from .conftest import TINY_BUNDLE, compose_cfg, shared


def test_all_easyedit_counterfact_records_load_and_validate():
    path = shared("counterfact/counterfact-train.json")
    ds = counterfact_easyedit.load(str(path))
    raw = json.loads(path.read_text())
    assert len(ds.records) == len(raw) == 10000 and not ds.skipped
    for r, x in zip(ds.records, raw):
        assert r.rewrite_prompt == x["prompt"] and r.target_true == x["ground_truth"]
        assert r.prompt.count("{}") == 1 and len(r.paraphrase_prompts) == 1
    assert sum(1 for r in ds.records if r.neighborhood_prompts) == 10000


def test_rome_sample_loads_with_every_prompt_family():
    ds = counterfact.load(path=str(shared("counterfact/rome-format-sample.json")), snippets="none")
    assert len(ds.records) == 20 and ds.references is None
    for r in ds.records:
        assert r.paraphrase_prompts and r.neighborhood_prompts and r.attribute_prompts
        assert r.generation_prompts and r.relation_id and r.target_new_id


def test_zsre_loads_as_the_literature_reads_it():
    """memit/dsets/zsre.py: the edit makes answers[0] the answer (not `alt`); the locality
    prompt is the NQ question with "?" and its own answer; scored by token accuracy."""
    ds = zsre.load(str(shared("zsre/zsre_mend_train-1k.json")))
    assert len(ds.records) == 1000 and ds.protocol == "accuracy"
    first = ds.records[0]
    assert (first.rewrite_prompt, first.target_new) == ("What is the product made by UniFirst?",
                                                        "uniform")
    assert first.paraphrase_prompts == ("What will be the product of UniFirst?",)
    assert first.neighborhood_prompts == (
        "nq question: john goodman's character in the big lebowski?",)
    assert first.neighborhood_answers == ("Walter Sobchak",)
    assert all(r.subject in r.rewrite_prompt for r in ds.records)


def test_zsre_metrics_are_token_top1_accuracies(shipped_handle):
    from omegaconf import OmegaConf

    from rlsedit_cli.eval.counterfact import evaluate
    from rlsedit_cli.models.tokens import encode_prompt, encode_target

    records = zsre.load(str(shared("zsre/zsre_mend_train-1k.json"))).records[:6]
    cfg = OmegaConf.create({"batch_size": 4, "fluency": False})
    got = evaluate(shipped_handle, records, None, cfg, protocol="accuracy")
    tok, model = shipped_handle.tok, shipped_handle.model

    def accuracy(prompt, answer):  # one prefix at a time, as eval_utils_zsre.py asks
        target = encode_target(tok, answer)
        hits = []
        for i, t in enumerate(target):
            ids = torch.tensor([encode_prompt(tok, prompt) + target[:i]])
            with torch.no_grad():
                hits.append(int(model(input_ids=ids).logits[0, -1].argmax()) == t)
        return sum(hits) / len(hits)

    expected = {
        "efficacy": [accuracy(r.rewrite_prompt, r.target_new) for r in records],
        "specificity": [accuracy(r.neighborhood_prompts[0], r.neighborhood_answers[0])
                        for r in records]}
    for metric, values in expected.items():
        assert got[metric] == pytest.approx(100 * sum(values) / len(values), abs=1e-3)
    assert "efficacy_magnitude" not in got
    assert got["specificity"] > 0 or got["efficacy"] > 0, got  # not all-zero by accident


def test_toy_dataset_has_references():
    ds = load_toy(str(TINY_BUNDLE))
    assert len(ds.records) >= 1000 and ds.references is not None
    assert ds.references.texts(ds.records[0])


def write(tmp_path, records):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    return str(path)


GOOD = {"case_id": 7, "prompt": "Paris is the capital of", "subject": "Paris",
        "target_new": "Italy", "ground_truth": "France", "rephrase_prompt": "Paris lies in",
        "locality_prompt": "Lyon is in", "locality_ground_truth": "France"}


@pytest.mark.parametrize("field,value,message", [
    ("subject", "Rome", "case_id=7: subject 'Rome' does not occur"),
    ("target_new", "", "case_id=7: target_new is missing or empty"),
    ("target_new", "France", "case_id=7: target_new equals target_true"),
])
def test_bad_record_names_case_id_and_field(tmp_path, field, value, message):
    path = write(tmp_path, [{**GOOD, field: value}])
    with pytest.raises(DataError, match=message):
        counterfact_easyedit.load(path)


def test_skip_invalid_counts_in_summary(tmp_path, make_cfg, caplog):
    recs = load_toy(str(TINY_BUNDLE))
    raw = json.loads(json.dumps([_rome(r) for r in recs.records[:12]]))
    raw[3]["requested_rewrite"]["prompt"] = "no subject slot"
    path = write(tmp_path, raw)
    summary = run(make_cfg("editor=none", "dataset=counterfact", f"dataset.path={path}",
                           "dataset.snippets=none", "dataset.skip_invalid=true",
                           "stream.num_edits=11", "stream.batch_size=11", "measure.fluency=false"))
    assert summary["skipped_records"] == 1 and summary["num_edits"] == 11
    warning = next(r.getMessage() for r in caplog.records if "skipped 1 invalid" in r.getMessage())
    assert "case_id=3" in warning and "skip_invalid" not in warning  # it is on already
    with pytest.raises(DataError, match="case_id=3: prompt"):
        run(make_cfg("editor=none", "dataset=counterfact", f"dataset.path={path}",
                     "dataset.snippets=none", "stream.num_edits=11", "overwrite=true"))


def _rome(r):
    return {"case_id": r.case_id, "requested_rewrite": {
        "prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target_new, "id": "a"},
        "target_true": {"str": r.target_true, "id": "b"}},
        "paraphrase_prompts": list(r.paraphrase_prompts),
        "neighborhood_prompts": list(r.neighborhood_prompts)}


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json is not valid JSON"):
        counterfact_easyedit.load(str(bad))
    with pytest.raises(DataError, match="does not exist: set dataset.path"):
        counterfact_easyedit.load(str(tmp_path / "missing.json"))


def test_counterfact_without_path_offline_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="dataset.path=/path/to/counterfact.json"):
        counterfact.load(path=None, url=f"{counterfact.ROME_DATA}/counterfact.json",
                         cache=str(tmp_path))


def test_stream_is_deterministic_and_checked():
    recs = load_toy(str(TINY_BUNDLE)).records
    a = make_stream(recs, 30, 7, seed=1)
    assert [len(b) for b in a] == [7, 7, 7, 7, 2]
    assert a == make_stream(recs, 30, 7, seed=1) and a != make_stream(recs, 30, 7, seed=2)
    kept = make_stream(recs, 10, 5, seed=0, shuffle=False, offset=4)
    assert [r.case_id for b in kept for r in b] == [r.case_id for r in recs[4:14]]
    with pytest.raises(ConfigError, match="stream.offset=-1 must not be negative"):
        check(compose_cfg(["stream.offset=-1"]))


def test_a_file_in_another_layout_names_the_dataset_config_that_reads_it(tmp_path):
    from rlsedit_cli.datasets import zsre

    path = shared("counterfact/rome-format-sample.json")
    with pytest.raises(DataError, match="holds rome-layout records, not zsre: use "
                                        "dataset=counterfact"):
        zsre.load(str(path))
