"""Anchor statistics: exact against a direct computation, streamed, cached, checked, resumable."""

from __future__ import annotations

import json

import pytest
import torch

from rlsedit_cli.errors import DataError
from rlsedit_cli.models.loader import load_model
from rlsedit_cli.stats import anchor as anchor_mod
from rlsedit_cli.stats.anchor import AnchorStats
from rlsedit_cli.stats.corpus import iter_texts
from rlsedit_cli.stats.moments import accumulate

from .conftest import compose_cfg, shared, tiny_overrides

TEXTS = [f"The river number {i} flows past the old mill and the quiet village." * (1 + i % 3)
         for i in range(40)]


@pytest.fixture(params=["gpt2", "llama"])
def handle(request, tiny_models):
    cfg = compose_cfg(tiny_overrides(request.param, tiny_models[request.param]))
    return load_model(cfg.model, torch.device("cpu"))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def direct_moment(handle, layer, texts, max_length):
    """All keys in memory at once, then K^T K / n: the reference."""
    keys = []
    hook = handle.edited_module(layer).register_forward_pre_hook(
        lambda m, args: keys.append(args[0][0].double()))
    with torch.no_grad():
        for text in texts:
            ids = handle.tok(text, return_tensors="pt", truncation=True, max_length=max_length)
            handle.model(**ids)
    hook.remove()
    K = torch.cat(keys)
    return K.T @ K / K.shape[0]


def test_streamed_moment_equals_direct(handle):
    state = accumulate(handle, [0, 1], iter(TEXTS), num_samples=40, max_length=16, batch_size=7)
    assert state.samples == 40
    for layer in (0, 1):
        ref = direct_moment(handle, layer, TEXTS, 16)
        assert torch.allclose(state.moment(layer), ref, rtol=1e-5, atol=1e-6)
        assert state.sums[layer].dtype == torch.float64


def test_batch_size_does_not_change_the_result(handle):
    a = accumulate(handle, [1], iter(TEXTS), 40, 16, batch_size=1)
    b = accumulate(handle, [1], iter(TEXTS), 40, 16, batch_size=40)
    assert a.tokens == b.tokens
    assert torch.allclose(a.moment(1), b.moment(1), rtol=1e-5, atol=1e-6)


def test_cache_is_reused_and_keyed(handle, corpus, tmp_path, monkeypatch):
    stats = AnchorStats(handle, tmp_path / "cache", str(corpus), 30, 16, 8)
    first = stats.moments([0, 1])
    monkeypatch.setattr(anchor_mod, "accumulate", lambda *a, **k: pytest.fail("recomputed"))
    again = AnchorStats(handle, tmp_path / "cache", str(corpus), 30, 16, 8).moments([0, 1])
    assert all(torch.equal(first[k], again[k]) for k in (0, 1))
    other = AnchorStats(handle, tmp_path / "cache", str(corpus), 20, 16, 8)
    assert other._path(1) != stats._path(1)  # another sample count is another file


def test_other_weights_get_other_statistics(handle, corpus, tmp_path):
    stats = AnchorStats(handle, tmp_path / "cache", str(corpus), 10, 16, 8)
    path = stats._path(1)
    with torch.no_grad():
        handle.model.get_input_embeddings().weight[0, 0] += 1.0
    assert AnchorStats(handle, tmp_path / "cache", str(corpus), 10, 16, 8)._path(1) != path


def test_corrupt_cache_is_detected_and_recomputed(handle, corpus, tmp_path, caplog):
    stats = AnchorStats(handle, tmp_path / "cache", str(corpus), 10, 16, 8)
    good = stats.moments([1])[1]
    path = stats._path(1)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    again = AnchorStats(handle, tmp_path / "cache", str(corpus), 10, 16, 8).moments([1])[1]
    assert "fail their checksum: recomputing" in caplog.text
    assert torch.allclose(good, again)
    sidecar = path.with_suffix(".json")  # a write cut short: half of the JSON
    sidecar.write_text(sidecar.read_text()[: len(sidecar.read_text()) // 2])
    third = AnchorStats(handle, tmp_path / "cache", str(corpus), 10, 16, 8).moments([1])[1]
    assert "cannot be read" in caplog.text and torch.allclose(good, third)
    assert json.loads(sidecar.read_text())["key"]  # rewritten whole


def test_interrupted_computation_resumes(handle, corpus, tmp_path, monkeypatch):
    from rlsedit_cli.stats import moments

    monkeypatch.setattr(anchor_mod, "SAVE_PARTIAL_EVERY_S", -1.0)  # save after every batch
    monkeypatch.setattr(moments, "SORT_WINDOW", 4)  # windows of 20 texts: two in the corpus
    calls = {"n": 0}
    real = anchor_mod.accumulate

    def interrupted(*args, **kwargs):
        on_batch = args[-1]

        def stop_after_one_window(state):  # 20 of the 40 texts (4 batches of 5 per window)
            on_batch(state)
            calls["n"] += 1
            if calls["n"] == 1:
                assert state.samples == 20
                raise KeyboardInterrupt

        return real(*args[:-1], stop_after_one_window)

    monkeypatch.setattr(anchor_mod, "accumulate", interrupted)
    stats = AnchorStats(handle, tmp_path / "cache", str(corpus), 40, 16, 5)
    with pytest.raises(KeyboardInterrupt):
        stats.moments([0, 1])
    assert list((tmp_path / "cache").rglob("partial_*.pt"))
    monkeypatch.setattr(anchor_mod, "accumulate", real)
    resumed = AnchorStats(handle, tmp_path / "cache", str(corpus), 40, 16, 5).moments([0, 1])
    assert not list((tmp_path / "cache").rglob("partial_*.pt"))
    ref = accumulate(handle, [0, 1], iter(TEXTS), 40, 16, 5)
    for layer in (0, 1):
        assert torch.allclose(resumed[layer], ref.moment(layer), rtol=1e-5, atol=1e-6)


def test_wikitext_file_corpus(handle, tmp_path):
    path = shared("wikitext-2/wiki.test.raw")
    texts = list(iter_texts(str(path)))[:5]
    assert all(t.strip() for t in texts)
    C = AnchorStats(handle, tmp_path / "cache", str(path), 50, 32, 16).moments([1])[1]
    assert torch.allclose(C, C.T) and float(torch.linalg.eigvalsh(C)[0]) > -1e-6


def test_unreachable_hub_corpus_is_one_clear_line():
    with pytest.raises(DataError) as err:
        next(iter_texts("wikitext"))
    msg = str(err.value)
    assert "stats.corpus" in msg and "\n" not in msg


def test_missing_corpus_file():
    with pytest.raises(DataError, match="does not exist"):
        iter_texts("/no/such/corpus.txt")


def test_shipped_english_text_is_the_two_halves_of_wikitext2(tmp_path):
    """assets/english holds what write_english makes of wikitext-2's test split: disjoint
    halves of whole articles (anchor statistics never see the perplexity text)."""
    import gzip
    import json

    from rlsedit_cli.config import ASSETS_DIR
    from rlsedit_cli.stats.wikitext import articles, paragraphs, write_english

    raw = shared("wikitext-2/wiki.test.raw")
    counts = write_english(raw, tmp_path)
    assert counts == {"articles": 62, "anchor_paragraphs": 1158, "heldout_pages": 31}
    shipped = ASSETS_DIR / "english"
    for name in ("anchor.txt.gz", "heldout.jsonl.gz"):
        assert gzip.decompress((shipped / name).read_bytes()) == gzip.decompress(
            (tmp_path / name).read_bytes()), name
    pages = articles(raw.read_text(encoding="utf-8"))
    held = [json.loads(line)["page"] for line in
            gzip.decompress((shipped / "heldout.jsonl.gz").read_bytes()).decode().splitlines()]
    anchor = gzip.decompress((shipped / "anchor.txt.gz").read_bytes()).decode().splitlines()
    assert held == pages[1::2]  # the odd articles, raw
    assert anchor == [p for page in pages[0::2] for p in paragraphs(page)]  # the even ones
    assert " @-@ " not in " ".join(anchor) and " @-@ " in " ".join(held)  # detokenised vs raw


TWO_JOBS = """
import hashlib, logging, sys
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from tests.conftest import compose_cfg
from rlsedit_cli.models.loader import load_model
from rlsedit_cli.stats.anchor import AnchorStats
cfg = compose_cfg([])
handle = load_model(cfg.model, torch.device("cpu"))
C = AnchorStats(handle, sys.argv[1], cfg.model.anchor_corpus, 400, 64, 16).moments([0, 1])
print("C", hashlib.sha256(C[0].numpy().tobytes() + C[1].numpy().tobytes()).hexdigest())
"""


def test_two_jobs_on_one_fresh_cache_compute_the_statistics_once(tmp_path):
    """Two processes (a sweep's jobs) share paths.cache: one computes, the other waits for it
    and reads its files; both get the same C and neither crashes on the other's files."""
    import subprocess
    import sys

    from .conftest import TINY_BUNDLE

    root = TINY_BUNDLE.parents[2]  # the checkout, so that `tests.conftest` imports
    jobs = [subprocess.Popen([sys.executable, "-c", TWO_JOBS, str(tmp_path / "cache")],
                             cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [job.communicate(timeout=600) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outs[0][1][-2000:] + outs[1][1][-2000:]
    logs = outs[0][1] + outs[1][1]
    assert logs.count("computing anchor statistics") == 1
    assert logs.count("computed by another process") + logs.count("from cache") == 2
    sums = {line for out, _ in outs for line in out.splitlines() if line.startswith("C ")}
    assert len(sums) == 1
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_anchor_texts_are_a_seeded_random_sample_by_default(tmp_path):
    """As the references' layer_stats.py (random_sample=1): the first n texts read are a
    uniform, seeded sample of the corpus, not its first n texts."""
    from .conftest import compose_cfg

    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"text number {i}\n" for i in range(200)))
    first = list(iter_texts(str(path)))
    one, again = (list(iter_texts(str(path), "random", 1)) for _ in range(2))
    assert one == again and one != list(iter_texts(str(path), "random", 2))
    assert sorted(one) == sorted(first) and one[:20] != first[:20]
    assert sum(int(t.split()[-1]) >= 100 for t in one[:50]) > 10  # drawn from the whole file
    cfg = compose_cfg([])
    assert cfg.stats.sample == "random" and cfg.stats.seed == 1
    with pytest.raises(DataError, match="stats.sample"):
        iter_texts(str(path), "last")
