"""The toy fact world: deterministic, well-formed CounterFact records, consistent families."""

from __future__ import annotations

import pytest

from rlsedit_cli.datasets.records import parse_rome
from rlsedit_cli.datasets.world import build_world, training_sentences
from rlsedit_cli.errors import DataError


@pytest.fixture(scope="module")
def world():
    return build_world(1200, seed=3)


def test_same_seed_same_world_other_seed_other_world(world):
    assert build_world(1200, seed=3).records == world.records
    assert build_world(1200, seed=4).records != world.records


def test_records_parse_in_rome_layout_with_every_family(world):
    for raw in world.records:
        r = parse_rome(raw)
        assert r.prompt.count("{}") == 1 and r.target_new != r.target_true
        assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 10
        assert len(r.attribute_prompts) == 10 and len(r.generation_prompts) == 10
        assert all(r.subject in p for p in r.paraphrase_prompts + r.generation_prompts)


def test_prompt_families_hold_the_right_facts(world):
    truth = {(f.subject, f.relation.id): f.obj for f in world.facts}
    subjects = sorted({f.subject for f in world.facts}, key=len, reverse=True)

    def subject_of(prompt):
        return next(s for s in subjects if s in prompt)

    for raw in world.records[:200]:
        rw = raw["requested_rewrite"]
        rel, true, new = rw["relation_id"], rw["target_true"]["str"], rw["target_new"]["str"]
        assert truth[rw["subject"], rel] == true
        assert all(truth[subject_of(p), rel] == true for p in raw["neighborhood_prompts"])
        assert all(truth[subject_of(p), rel] == new for p in raw["attribute_prompts"])
        assert rw["subject"] not in " ".join(raw["neighborhood_prompts"])


def test_references_and_idf_cover_every_target(world):
    for raw in world.records:
        rw = raw["requested_rewrite"]
        snippets = world.snippets[rw["relation_id"]][rw["target_new"]["id"]]
        assert snippets and all(rw["target_new"]["str"] in s["text"] for s in snippets)
    assert len(world.idf) == len(world.vocab) and min(world.idf) >= 1.0


def test_training_sentences_state_every_fact(world):
    text = "\n".join(training_sentences(world))
    for f in world.facts[:100]:
        assert f"{f.relation.templates[0].format(f.subject)} {f.obj}." in text


def test_too_small_world_is_refused():
    with pytest.raises(ValueError, match="num_subjects=50"):
        build_world(50)


def test_bad_record_names_case_id_and_field():
    raw = build_world(1200).records[0]
    bad = {**raw, "requested_rewrite": {**raw["requested_rewrite"], "prompt": "no slot"}}
    with pytest.raises(DataError, match=r"case_id=0: prompt .*skip_invalid"):
        parse_rome(bad)
