"""Reference texts about each (relation, object), and the tf-idf statistics over them that
CounterFact's consistency metric uses (ROME's attribute_snippets.json, idf.npy,
tfidf_vocab.json; or a toy bundle's)."""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlsedit_cli.datasets.records import Record

WORD_RE = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern (ROME's tf-idf)


@dataclass
class References:
    """Reference texts about each (relation, object) and tf-idf statistics (consistency)."""

    snippets: dict  # relation id -> object id -> [{"text": ...}]
    vocab: dict[str, int]
    idf: np.ndarray

    def texts(self, record: Record) -> list[str] | None:
        by_obj = self.snippets.get(record.relation_id or "", {})
        found = by_obj.get(record.target_new_id or "")
        return [s["text"] for s in found] if found else None

    @classmethod
    def load(cls, snippets: str | Path, idf: str | Path, vocab: str | Path | None = None,
             ) -> References:
        """Read references in ROME's files (attribute_snippets.json, idf.npy, tfidf_vocab.json)
        or a toy bundle's (nested snippets; idf and vocab together in one JSON)."""

        def read(path):
            path = Path(path)
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8-sig") as f:  # with or without a BOM
                return json.load(f)

        raw = read(snippets)
        if isinstance(raw, list):  # ROME: [{relation_id, target_id, samples: [{text}]}]
            nested: dict = {}
            for el in raw:
                nested.setdefault(el["relation_id"], {}).setdefault(el["target_id"], []).extend(
                    el["samples"])
            raw = nested
        if vocab is None:
            stats = read(idf)
            return cls(raw, stats["vocab"], np.asarray(stats["idf"], dtype=np.float64))
        idf_values = np.load(idf) if str(idf).endswith(".npy") else np.asarray(read(idf))
        return cls(raw, read(vocab), np.asarray(idf_values, dtype=np.float64))


def tfidf_statistics(documents: list[str]) -> tuple[dict[str, int], list[float]]:
    """Vocabulary and smoothed idf over ``documents`` (scikit-learn's TfidfVectorizer defaults).

    idf(w) = ln((1 + n) / (1 + df(w))) + 1.
    """
    df: Counter[str] = Counter()
    for doc in documents:
        df.update(set(WORD_RE.findall(doc.lower())))
    words = sorted(df)
    n = len(documents)
    return {w: i for i, w in enumerate(words)}, [math.log((1 + n) / (1 + df[w])) + 1 for w in words]
