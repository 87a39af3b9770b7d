"""Pure metric functions (no model, no I/O): CounterFact's success rates, fluency, consistency.

Definitions follow ROME/MEMIT's evaluation code (docs/design.md section 6); where the original
needs network data (nltk's punkt), a regex word splitter with the same intent is used instead.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
from nltk.tokenize import word_tokenize

from rlsedit_cli.datasets.references import WORD_RE


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal-approximation interval (1.96 sd / sqrt(n))."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    if arr.size == 1:
        return float(arr[0]), 0.0
    return float(arr.mean()), float(1.96 * arr.std(ddof=1) / math.sqrt(arr.size))


def prefers(nll_a: np.ndarray, nll_b: np.ndarray) -> np.ndarray:
    """1.0 where completion a is more likely than b (lower mean token NLL), else 0.0."""
    return (np.asarray(nll_a) < np.asarray(nll_b)).astype(np.float64)


def prob_gap(nll_a: np.ndarray, nll_b: np.ndarray) -> np.ndarray:
    """Magnitude: exp(-nll_a) - exp(-nll_b), ROME's probability difference."""
    return np.exp(-np.asarray(nll_a)) - np.exp(-np.asarray(nll_b))


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3),
                  weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency: mean over n of weight_n * entropy (bits) of the text's n-gram frequencies,
    the words cut by nltk's word_tokenize (its line-preserving form needs no downloaded data)."""
    tokens = word_tokenize(text, preserve_line=True)
    terms = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        if total == 0:
            terms.append(0.0)
            continue
        p = np.array(list(counts.values()), dtype=np.float64) / total
        terms.append(w * float(-(p * np.log2(p)).sum()))
    return float(np.mean(terms))


def tfidf_vector(text: str, vocab: Mapping[str, int], idf: np.ndarray) -> np.ndarray:
    """L2-normalised tf-idf vector (scikit-learn's defaults: lowercase, raw counts)."""
    vec = np.zeros(len(idf), dtype=np.float64)
    for word, count in Counter(WORD_RE.findall(text.lower())).items():
        j = vocab.get(word)
        if j is not None:
            vec[j] = count * idf[j]
    norm = np.linalg.norm(vec)
    return vec / norm if norm > 0 else vec


def tfidf_similarity(a: str, b: str, vocab: Mapping[str, int], idf: np.ndarray) -> float:
    """Cosine similarity of the tf-idf vectors of two texts (ROME's consistency score)."""
    return float(tfidf_vector(a, vocab, idf) @ tfidf_vector(b, vocab, idf))
