"""Metric functions against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlsedit_cli.datasets.references import tfidf_statistics
from rlsedit_cli.eval.counterfact import summarize
from rlsedit_cli.eval.metrics import (
    mean_ci,
    ngram_entropy,
    prefers,
    prob_gap,
    tfidf_similarity,
)


def test_prefers_and_gap():
    a, b = np.array([0.1, 2.0, 1.0]), np.array([0.5, 1.0, 1.0])
    assert prefers(a, b).tolist() == [1.0, 0.0, 0.0]  # ties are not successes
    assert prob_gap(a, b)[0] == pytest.approx(math.exp(-0.1) - math.exp(-0.5))


def test_mean_ci_is_normal_approximation():
    mean, half = mean_ci([0.0, 1.0, 1.0, 1.0])
    assert mean == 0.75
    assert half == pytest.approx(1.96 * np.std([0, 1, 1, 1], ddof=1) / 2)
    assert mean_ci([3.0]) == (3.0, 0.0)


def test_ngram_entropy_by_hand():
    # tokens a b a b: bigrams ab, ba, ab -> p = (2/3, 1/3); trigrams aba, bab -> p = (1/2, 1/2)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("one") == 0.0
    repetitive, varied = "the cat " * 20, "the quick brown fox jumps over the lazy dog again"
    assert ngram_entropy(varied) > ngram_entropy(repetitive)


def test_tfidf_matches_hand_computation():
    docs = ["paris is big", "paris paris rome", "rome is old"]
    vocab, idf = tfidf_statistics(docs)
    assert sorted(vocab) == ["big", "is", "old", "paris", "rome"]
    assert idf[vocab["big"]] == pytest.approx(math.log(4 / 2) + 1)
    assert idf[vocab["paris"]] == pytest.approx(math.log(4 / 3) + 1)
    idf = np.array(idf)
    a = np.array([0, 0, 0, 2 * idf[vocab["paris"]], 0])
    b = np.array([idf[vocab["big"]], idf[vocab["is"]], 0, idf[vocab["paris"]], 0])
    expected = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert tfidf_similarity("Paris, Paris!", "paris is big", vocab, idf) == pytest.approx(expected)
    assert tfidf_similarity("unknown words", "paris", vocab, idf) == 0.0


def test_summarize_reports_absent_not_zero():
    out = summarize({"efficacy": np.array([1.0, 0.0, 1.0, 1.0]),
                     "consistency": np.array([np.nan, np.nan])})
    assert out["efficacy"] == 75.0 and out["efficacy_ci95"] > 0
    assert out["consistency"] is None


def test_records_without_generation_prompts_get_fluency_from_their_rewrites(shipped_handle):
    """EasyEdit-layout records have no generation prompts: their texts are generated from the
    rewrite and paraphrase prompts, and the figures say so."""
    from dataclasses import replace

    from omegaconf import OmegaConf

    from rlsedit_cli.datasets.toy import load as load_toy
    from rlsedit_cli.eval.counterfact import evaluate, fluency_prompts

    from .conftest import TINY_BUNDLE

    rome = load_toy(str(TINY_BUNDLE)).records[:3]
    easyedit = [replace(r, generation_prompts=()) for r in rome]
    assert fluency_prompts(rome[0]) == (rome[0].generation_prompts, "generation")
    assert fluency_prompts(easyedit[0]) == ((easyedit[0].rewrite_prompt,
                                             *easyedit[0].paraphrase_prompts), "rewrite")
    cfg = OmegaConf.create({"batch_size": 8, "fluency": True, "generation_prompts": 2,
                            "max_length": 20, "generation": "greedy"})
    got = evaluate(shipped_handle, easyedit, None, cfg)
    assert got["fluency"] > 0 and got["fluency_prompts"] == "rewrite"
    assert evaluate(shipped_handle, rome, None, cfg)["fluency_prompts"] == "generation"
    mixed = evaluate(shipped_handle, [rome[0], easyedit[1]], None, cfg)
    assert mixed["fluency_prompts"] == "generation+rewrite"


def test_each_record_averages_its_prompts(shipped_handle):
    """A record whose two paraphrases disagree scores 50 on generalization (the mean over its
    prompts, as ROME's code computes it), not 100 ("any prompt") nor 0 ("every prompt")."""
    from dataclasses import replace

    from rlsedit_cli.datasets.toy import load as load_toy
    from rlsedit_cli.eval.counterfact import probability_metrics

    from .conftest import TINY_BUNDLE

    records = load_toy(str(TINY_BUNDLE)).records
    a = records[0]
    b = next(r for r in records if r.target_true != a.target_true)
    # the model knows both facts: a's prompt prefers a's true object, b's prompt prefers b's
    mixed = replace(a, target_new=b.target_true,
                    paraphrase_prompts=(a.rewrite_prompt, b.rewrite_prompt))
    got = probability_metrics(shipped_handle, [mixed], batch_size=8)
    assert got["efficacy"][0] == 0.0  # the rewrite prompt is a's: the true object wins
    assert got["generalization"][0] == 0.5


def test_fluency_texts_follow_romes_generator(shipped_handle):
    """ROME's generate_fast: top-5 sampling (seeded here, so a run repeats itself), 100 tokens
    in all with the prompt included, NFKD text; greedy stays an option."""
    import unicodedata

    from rlsedit_cli.eval.counterfact import generate
    from rlsedit_cli.models.tokens import encode_prompt

    prompts = ["The capital of France is", "The capital of France is", "Paris is"]
    sampled = generate(shipped_handle, prompts, 30, 8, sample=True, seed=0)
    assert sampled == generate(shipped_handle, prompts, 30, 8, sample=True, seed=0)
    assert sampled[0] != sampled[1]  # repeated prompts get their own samples, not one text
    greedy = generate(shipped_handle, prompts, 30, 8, sample=False)
    assert greedy[0] == greedy[1] and greedy[0] != sampled[0]
    for text, prompt in zip(sampled, prompts):
        assert text.startswith(prompt) and text == unicodedata.normalize("NFKD", text)
        assert len(encode_prompt(shipped_handle.tok, text)) <= 32  # 30 in all (re-tokenised)


def test_top_k_draw_samples_romes_distribution():
    """TopKDraw leaves one token per row, drawn among the 5 most likely with their renormalised
    probabilities (ROME's generate_fast), never outside them."""
    from rlsedit_cli.models.generation import TopKDraw

    torch.manual_seed(0)
    probs = torch.tensor([0.30, 0.25, 0.15, 0.10, 0.05, 0.04, 0.04, 0.04, 0.03])
    scores = probs.log().repeat(20000, 1)  # (20000, 9)
    out = TopKDraw(5)(None, scores)
    assert ((out == 0).sum(1) == 1).all() and torch.isinf(out).sum() == 20000 * 8
    counts = torch.bincount(out.argmax(1), minlength=9).float() / 20000
    assert counts[5:].sum() == 0
    expected = probs[:5] / probs[:5].sum()
    assert torch.allclose(counts[:5], expected, atol=0.015)
