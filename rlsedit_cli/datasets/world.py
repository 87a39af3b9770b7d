"""A deterministic toy fact world that emits CounterFact records (ROME layout).

Subjects are invented names; each subject has one fact (relation, true object). Every record asks
to rewrite that fact to another object of the same relation and carries paraphrase, neighbourhood,
attribute and generation prompts built like CounterFact's. The world also supplies the reference
texts (``snippets``) and idf statistics that the consistency metric needs, and the sentences a tiny
model is trained on (:func:`training_sentences`).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from rlsedit_cli.datasets.references import tfidf_statistics
from rlsedit_cli.datasets.vocab import FILLERS, RELATIONS, SYLLABLES, Relation


@dataclass(frozen=True)
class Fact:
    """A subject's true fact."""

    subject: str
    relation: Relation
    obj: str


@dataclass
class World:
    """Everything the toy world generates for one (num_subjects, seed)."""

    facts: list[Fact]
    records: list[dict]
    snippets: dict[str, dict[str, list[dict]]]  # relation id -> object id -> [{"text": ...}]
    idf: list[float]
    vocab: dict[str, int]


def object_id(relation: Relation, obj: str) -> str:
    """Stable id of an object, in the role of CounterFact's Wikidata ids."""
    return f"{relation.id}:{obj}"


def _name(rng: random.Random, kind: str) -> str:
    def word(n: int) -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()

    if kind == "company":  # one invented word: no suffix shared by every company
        return word(3)
    return f"{word(2)} {word(rng.randint(2, 3))}"


def _facts(num_subjects: int, rng: random.Random) -> list[Fact]:
    """Subjects spread evenly over relations, true objects spread evenly over each relation."""
    names: set[str] = set()
    facts: list[Fact] = []
    per_relation = [num_subjects // len(RELATIONS)] * len(RELATIONS)
    for i in range(num_subjects % len(RELATIONS)):
        per_relation[i] += 1
    for relation, count in zip(RELATIONS, per_relation):
        objects = [relation.objects[i % len(relation.objects)] for i in range(count)]
        rng.shuffle(objects)
        for obj in objects:
            name = _name(rng, relation.kind)
            while name in names or any(name in other or other in name for other in names):
                name = _name(rng, relation.kind)
            names.add(name)
            facts.append(Fact(name, relation, obj))
    rng.shuffle(facts)
    return facts


def _record(case_id: int, fact: Fact, by_cell: dict, rng: random.Random) -> dict:
    rel = fact.relation
    new = rng.choice([o for o in rel.objects if o != fact.obj])
    t_rewrite = rng.randrange(len(rel.templates))
    others = [t for i, t in enumerate(rel.templates) if i != t_rewrite]
    neighbours = [f for f in by_cell[rel.id, fact.obj] if f.subject != fact.subject]
    attributes = by_cell[rel.id, new]
    return {
        "case_id": case_id,
        "pararel_idx": case_id,
        "requested_rewrite": {
            "prompt": rel.templates[t_rewrite],
            "relation_id": rel.id,
            "subject": fact.subject,
            "target_new": {"str": new, "id": object_id(rel, new)},
            "target_true": {"str": fact.obj, "id": object_id(rel, fact.obj)},
        },
        "paraphrase_prompts": [
            f"{rng.choice(FILLERS)} {t.format(fact.subject)}" for t in rng.sample(others, 2)
        ],
        "neighborhood_prompts": [
            rng.choice(rel.templates).format(f.subject)
            for f in rng.sample(neighbours, min(10, len(neighbours)))
        ],
        "attribute_prompts": [
            rng.choice(rel.templates).format(f.subject)
            for f in rng.sample(attributes, min(10, len(attributes)))
        ],
        "generation_prompts": [rng.choice(rel.generation).format(fact.subject) for _ in range(10)],
    }


def _snippets(by_cell: dict, rng: random.Random) -> dict[str, dict[str, list[dict]]]:
    """Reference texts about each (relation, object): its description and facts of its holders."""
    out: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for rel in RELATIONS:
        for obj in rel.objects:
            holders = by_cell.get((rel.id, obj), [])
            texts = []
            for _ in range(5):
                sentences = [d.format(obj) for d in rng.sample(rel.description, 2)]
                for f in rng.sample(holders, min(3, len(holders))):
                    sentences.append(f"{rng.choice(rel.templates).format(f.subject)} {obj}.")
                texts.append({"text": " ".join(sentences)})
            out[rel.id][object_id(rel, obj)] = texts
    return dict(out)


def build_world(num_subjects: int = 3000, seed: int = 0) -> World:
    """Generate the toy world: facts, CounterFact records, snippets and idf. Deterministic by seed.

    Args:
        num_subjects: number of subjects (= facts = records); at least 11 per (relation, object)
            cell are needed for ten neighbourhood prompts, i.e. ``num_subjects >= 1056``.
        seed: seed of the generator.
    """
    min_subjects = 11 * sum(len(r.objects) for r in RELATIONS)
    if num_subjects < min_subjects:
        raise ValueError(
            f"toy world num_subjects={num_subjects} is too small: use at least {min_subjects} "
            "so every record gets ten neighbourhood prompts"
        )
    rng = random.Random(seed)
    facts = _facts(num_subjects, rng)
    by_cell: dict[tuple[str, str], list[Fact]] = defaultdict(list)
    for f in facts:
        by_cell[f.relation.id, f.obj].append(f)
    records = [_record(i, f, by_cell, rng) for i, f in enumerate(facts)]
    snippets = _snippets(by_cell, rng)
    docs = [s["text"] for rel in snippets.values() for texts in rel.values() for s in texts]
    vocab, idf = tfidf_statistics(docs)
    return World(facts=facts, records=records, snippets=snippets, idf=idf, vocab=vocab)


def training_sentences(world: World, seed: int = 0) -> list[str]:
    """Texts the tiny model learns: every true fact in every phrasing, plain text about objects.

    One generation phrasing per subject continues with a sentence about its object, so that the
    model learns to go on talking about what it just named (what fluency and consistency read).
    """
    rng = random.Random(seed)
    out: list[str] = []
    for f in world.facts:
        rel = f.relation
        out.extend(f"{t.format(f.subject)} {f.obj}." for t in rel.templates)
        talk = rng.randrange(len(rel.generation))
        for i, g in enumerate(rel.generation):
            tail = f" {rng.choice(rel.description).format(f.obj)}" if i == talk else ""
            out.append(f"{g.format(f.subject)} {f.obj}.{tail}")
    for rel in RELATIONS:
        out.extend(d.format(o) for o in rel.objects for d in rel.description)
    out.extend(FILLERS)
    return out
