"""The shipped tiny GPT-2 and the `rlsedit toy build` pipeline."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from rlsedit_cli.config import ASSETS_DIR
from rlsedit_cli.datasets.records import parse_all, parse_rome, read_json_records
from rlsedit_cli.toy.build import BuildConfig, build_bundle, check_bundle, knowledge

from .conftest import shared

BUNDLE = ASSETS_DIR / "gpt2_tiny"


def test_shipped_model_knows_the_toy_facts(shipped_handle):
    records, _ = parse_all(read_json_records(BUNDLE / "world" / "records.json.gz"), parse_rome,
                           skip_invalid=False)
    assert len(records) >= 1000
    scores = knowledge(shipped_handle.model, shipped_handle.tok, records)
    assert scores["rewrite"] >= 0.95
    assert scores["paraphrase"] >= 0.85


def test_shipped_bundle_is_small_and_complete():
    size = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    assert size <= 10 * 2**20
    for name in ("model.safetensors", "tokenizer.json", "corpus.txt.gz", "build.json",
                 "world/records.json.gz", "world/snippets.json.gz", "world/tfidf.json.gz"):
        assert (BUNDLE / name).is_file(), name
    info = json.loads((BUNDLE / "build.json").read_text())
    assert info["knowledge"]["rewrite"] >= 0.95


TINY = BuildConfig(num_subjects=1100, epochs=0.3, n_embd=32, n_layer=1, vocab_size=600)


def test_build_is_reproducible(tmp_path):
    build_bundle(tmp_path / "a", TINY)
    build_bundle(tmp_path / "b", TINY)
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    for name in ("tokenizer.json", "world/records.json.gz", "corpus.txt.gz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("name", ["counterfact/rome-format-sample.json",
                                  "counterfact/counterfact-train.json"])
def test_build_from_a_counterfact_file(tmp_path, name):
    info = build_bundle(tmp_path / "cf", TINY, facts=str(shared(name)), limit=50)
    assert info["records"] == min(50, 20 if "sample" in name else 50)
    assert set(check_bundle(tmp_path / "cf")) >= {"rewrite"}
    assert not (tmp_path / "cf.tmp").exists()


def test_toy_build_names_a_missing_facts_file(tmp_path, caplog):
    from rlsedit_cli.cli import main

    assert main(["toy", "build", "--out", str(tmp_path / "b"), "--facts",
                 str(tmp_path / "none.json")]) == 2
    assert "toy build --facts" in caplog.text and "dataset.path" not in caplog.text
