"""CounterFact evaluation of a (possibly edited) model over a set of records.

Per record: efficacy (rewrite prompt), generalization (paraphrases), specificity (neighbourhood
prompts), each as a success rate and as a probability magnitude; fluency and consistency from
greedy generations. :func:`summarize` turns per-record values into percentages with 95% intervals.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import torch
from transformers import LogitsProcessorList

from rlsedit_cli.accel.precision import LoweredLinears, compute_dtype
from rlsedit_cli.datasets.records import Record
from rlsedit_cli.datasets.references import References
from rlsedit_cli.eval.answers import said
from rlsedit_cli.eval.metrics import mean_ci, ngram_entropy, prefers, prob_gap, tfidf_similarity
from rlsedit_cli.eval.scoring import completion_nll, completion_top1
from rlsedit_cli.models.generation import TopKDraw, fixed_length, seeded
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.models.tokens import encode_prompt, pad
from rlsedit_cli.progress import progress

FAMILIES = {  # metric -> (record field, which target should win)
    "efficacy": ("rewrite", "new"),
    "generalization": ("paraphrase_prompts", "new"),
    "specificity": ("neighborhood_prompts", "true"),
}


def _shared(handle) -> bool:
    """Whether pairs that share a prompt run it once (the ``shared_prompts`` acceleration)."""
    return handle.accel.on("shared_prompts", handle.device)


def _prompts(record: Record, field: str) -> tuple[str, ...]:
    return (record.rewrite_prompt,) if field == "rewrite" else getattr(record, field)


def _per_record(owner: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``values`` over each record's prompts (``owner``: the record of each value),
    NaN for a record with none: every record counts once, however many prompts it has."""
    sums = np.bincount(owner, weights=values, minlength=n)
    counts = np.bincount(owner, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def accuracy_metrics(handle: ModelHandle, records: list[Record], batch_size: int,
                     families: tuple[str, ...] = tuple(FAMILIES)) -> dict[str, np.ndarray]:
    """zsRE as the literature scores it (memit/eval_utils_zsre.py), per record: the share of
    target_new's tokens predicted top-1 after the rewrite (efficacy) and paraphrase
    (generalization) prompts, and of each neighborhood prompt's own answer (specificity: the
    unedited model's answer should stay). NaN where a record has no prompt of a family."""
    pairs, owners = [], []
    for metric in families:
        field = FAMILIES[metric][0]
        for i, r in enumerate(records):
            prompts = _prompts(r, field)
            answers = r.neighborhood_answers if metric == "specificity" else (r.target_new,) * len(
                prompts)
            for prompt, answer in zip(prompts, answers):
                pairs.append((prompt, answer))
                owners.append((metric, i))
    acc = completion_top1(handle.model, handle.tok, pairs, batch_size, _shared(handle)).numpy()
    out: dict[str, np.ndarray] = {}
    for metric in families:
        rows = [k for k, (m, _) in enumerate(owners) if m == metric]
        owner = np.array([owners[k][1] for k in rows], dtype=np.int64)
        out[metric] = _per_record(owner, acc[rows], len(records))
    return out


GENERATED = ("efficacy", "generalization")  # also measured without teacher forcing (WILD)


def generated_metrics(handle: ModelHandle, records: list[Record], batch_size: int,
                      families: tuple[str, ...] = tuple(FAMILIES)) -> dict[str, np.ndarray]:
    """Per record, the share of its rewrite prompt (``efficacy_generated``) and paraphrases
    (``generalization_generated``) whose greedy continuation starts with target_new
    (eval/answers.py: the WILD protocol); NaN where a record has no such prompt."""
    pairs, owners = [], []
    for metric in (m for m in GENERATED if m in families):
        for i, r in enumerate(records):
            for p in _prompts(r, FAMILIES[metric][0]):
                pairs.append((p, r.target_new))
                owners.append((metric, i))
    hits = said(handle, pairs, batch_size)
    out = {}
    for metric in dict.fromkeys(m for m, _ in owners):
        rows = [k for k, (m, _) in enumerate(owners) if m == metric]
        owner = np.array([owners[k][1] for k in rows], dtype=np.int64)
        out[f"{metric}_generated"] = _per_record(owner, hits[rows], len(records))
    return out


def probability_metrics(handle: ModelHandle, records: list[Record], batch_size: int,
                        families: tuple[str, ...] = tuple(FAMILIES)) -> dict[str, np.ndarray]:
    """Per-record success rates and magnitudes; NaN where a record has no prompt of a family."""
    pairs, owners = [], []
    for metric in families:
        field = FAMILIES[metric][0]
        for i, r in enumerate(records):
            for p in _prompts(r, field):
                pairs += [(p, r.target_new), (p, r.target_true)]
                owners.append((metric, i))
    nll = completion_nll(handle.model, handle.tok, pairs, batch_size,
                         _shared(handle)).numpy().reshape(-1, 2)
    out: dict[str, np.ndarray] = {}
    for metric in families:
        winner = FAMILIES[metric][1]
        rows = [k for k, (m, _) in enumerate(owners) if m == metric]
        new, true = nll[rows, 0], nll[rows, 1]
        ok = prefers(new, true) if winner == "new" else prefers(true, new)
        gap = prob_gap(new, true) if winner == "new" else prob_gap(true, new)
        owner = np.array([owners[k][1] for k in rows], dtype=np.int64)
        out[metric] = _per_record(owner, ok, len(records))
        out[f"{metric}_magnitude"] = _per_record(owner, gap, len(records))
    return out


@torch.no_grad()
def generate(handle: ModelHandle, prompts: list[str], max_length: int, batch_size: int,
             sample: bool = True, seed: int = 0) -> list[str]:
    """Texts of ``max_length`` tokens in all, each prompt included (ROME's generate_fast).

    ``sample``: top-5 sampling at temperature 1, seeded, drawn as ROME's generate_fast draws
    (:class:`TopKDraw`: the references' protocol); otherwise greedy. Texts are NFKD-normalised
    with blank lines folded, as ROME's are.
    """
    tok, model = handle.tok, handle.model
    limit = handle.context_length or 2048
    texts: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with seeded(seed):
        starts = range(0, len(order), batch_size)
        for start in progress(starts, desc="generating texts", unit="batch", leave=False,
                              disable=len(starts) < 2):
            idx = order[start : start + batch_size]
            ids, mask = pad([encode_prompt(tok, prompts[i]) for i in idx], tok.pad_token_id,
                            left=True)  # left padding for generation
            width = ids.shape[1]
            new = max(1, min(max_length, limit) - width)  # ROME: max_out_len tokens in all
            out = model.generate(input_ids=ids.to(handle.device),
                                 attention_mask=mask.to(handle.device),
                                 generation_config=fixed_length(tok, new, sample=False),
                                 logits_processor=LogitsProcessorList(
                                     [TopKDraw(5)] if sample else []))
            for row, i in enumerate(idx):
                text = prompts[i] + tok.decode(out[row, width:], skip_special_tokens=True)
                texts[i] = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    return texts


def fluency_prompts(record: Record) -> tuple[tuple[str, ...], str]:
    """The prompts a record's texts are generated from, and which kind they are.

    CounterFact's own generation prompts when the record has them ("generation"); otherwise
    (the EasyEdit and zsRE layouts) its rewrite and paraphrase prompts ("rewrite").
    """
    if record.generation_prompts:
        return record.generation_prompts, "generation"
    return (record.rewrite_prompt, *record.paraphrase_prompts), "rewrite"


def generation_metrics(handle: ModelHandle, records: list[Record], refs: References | None,
                       cfg, seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """Fluency (n-gram entropy x100) and consistency (tf-idf cosine x100) per record, and the
    kind of prompts the texts came from ("generation", "rewrite" or "generation+rewrite").

    ``cfg``: the ``measure`` section (generation_prompts per record, None for all of them;
    max_length; generation: sample | greedy; batch_size; fluency_records: None for every record,
    or N: only a seeded subset of N records get texts, the others NaN, left out of the means).
    """
    prompts, owner, kinds = [], [], set()
    chosen_records = range(len(records))
    limit = getattr(cfg, "fluency_records", None)
    if limit is not None and limit < len(records):
        chosen_records = sorted(np.random.default_rng(seed).choice(len(records), limit,
                                                                    replace=False).tolist())
    for i in chosen_records:
        r = records[i]
        chosen, kind = fluency_prompts(r)
        kinds.add(kind)
        for p in chosen[: cfg.generation_prompts]:
            prompts.append(p)
            owner.append(i)
    texts = (generate(handle, prompts, cfg.max_length, cfg.batch_size,
                      cfg.generation == "sample", seed) if prompts else [])
    by_record: list[list[str]] = [[] for _ in records]
    for i, t in zip(owner, texts):
        by_record[i].append(t)
    fluency = np.array([np.mean([ngram_entropy(t) for t in ts]) * 100 if ts else np.nan
                        for ts in by_record])
    consistency = np.full(len(records), np.nan)
    if refs is not None:
        for i, (r, ts) in enumerate(zip(records, by_record)):
            ref = refs.texts(r)
            if ts and ref:
                consistency[i] = 100 * tfidf_similarity(" ".join(ts), " ".join(ref),
                                                        refs.vocab, refs.idf)
    return {"fluency": fluency, "consistency": consistency}, "+".join(sorted(kinds))


def summarize(per_record: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Mean over records (percent for rates and magnitudes) with 95% half-widths.

    A metric no record could measure is reported as None (absent), never as 0.
    """
    out: dict[str, float | None] = {}
    for name, values in per_record.items():
        values = values[~np.isnan(values)]
        scale = 1.0 if name in ("fluency", "consistency") else 100.0
        if values.size == 0:
            out[name], out[f"{name}_ci95"] = None, None
            continue
        mean, half = mean_ci(values * scale)
        out[name], out[f"{name}_ci95"] = round(mean, 4), round(half, 4)
    return out


def evaluate(handle: ModelHandle, records: list[Record], refs: References | None, cfg,
             families: tuple[str, ...] = tuple(FAMILIES), seed: int = 0,
             protocol: str = "probability", texts: bool = True,
             answers: bool = True) -> dict[str, float | None]:
    """CounterFact metrics over ``records`` (``cfg``: the ``measure`` section; ``seed``: of the
    sampled texts, the same at every measurement).

    ``families`` picks the probability metrics; the generation metrics (fluency, consistency)
    are computed when all families are asked for, ``cfg.fluency`` is on and ``texts``; the
    greedy answers (``*_generated``) when ``cfg.generated_accuracy`` is on and ``answers``.
    ``cfg.compute_dtype``: of the forward passes' products (bfloat16: a named setting).
    """
    return evaluate_records(handle, records, refs, cfg, families, seed, protocol, texts,
                            answers)[0]


def evaluate_records(handle: ModelHandle, records: list[Record], refs: References | None, cfg,
                     families: tuple[str, ...] = tuple(FAMILIES), seed: int = 0,
                     protocol: str = "probability", texts: bool = True, answers: bool = True,
                     ) -> tuple[dict[str, float | None], dict[str, np.ndarray]]:
    """:func:`evaluate`'s figures and each record's own values behind them: per metric an
    (n,) array in the records' order (rates 0-1, magnitudes, fluency; NaN: not measured)."""
    if not records:
        return {}, {}
    dtype = getattr(cfg, "compute_dtype", "float32")
    with compute_dtype(handle, dtype), LoweredLinears(handle, [handle.model], dtype).swapped():
        return _evaluate(handle, records, refs, cfg, families, seed, protocol, texts, answers)


def _evaluate(handle, records, refs, cfg, families, seed, protocol, texts, answers):
    """:func:`evaluate_records` inside its compute dtype."""
    score = accuracy_metrics if protocol == "accuracy" else probability_metrics
    per_record = score(handle, records, cfg.batch_size, families)
    if answers and getattr(cfg, "generated_accuracy", False):
        per_record |= generated_metrics(handle, records, cfg.batch_size, families)
    kind = None
    if set(families) == set(FAMILIES) and cfg.fluency and texts:
        generated, kind = generation_metrics(handle, records, refs, cfg, seed)
        per_record |= generated
    return summarize(per_record) | ({"fluency_prompts": kind} if kind else {}), per_record
