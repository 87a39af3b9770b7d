"""`rlsedit toy build`: train a tiny GPT-2 (and its tokenizer) that knows a set of facts.

The default builds the toy world's model shipped as ``rlsedit_cli/assets/gpt2_tiny``; with
``facts`` it trains on the true facts of any CounterFact file (ROME or EasyEdit layout). The output
folder is a "bundle": a Hugging Face model folder plus ``world/`` (the records, reference snippets
and tf-idf statistics), ``corpus.txt.gz`` (ordinary text for anchor statistics) and ``build.json``.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rlsedit_cli.datasets.layouts import PARSERS, detect_layout
from rlsedit_cli.datasets.records import Record, parse_all, read_json_records
from rlsedit_cli.datasets.world import World, build_world, training_sentences
from rlsedit_cli.errors import DataError
from rlsedit_cli.eval.scoring import completion_nll
from rlsedit_cli.files import folder_replaced_atomically
from rlsedit_cli.progress import progress

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"


@dataclass
class BuildConfig:
    """Hyper-parameters of the tiny model and its training (all defaults are the shipped ones)."""

    num_subjects: int = 3000
    seed: int = 0
    vocab_size: int = 4096
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 128
    seq_len: int = 64
    batch_size: int = 32
    epochs: float = 24.0
    lr: float = 2e-3
    warmup: int = 100


def record_sentences(records: list[Record]) -> list[str]:
    """True statements of a CounterFact file: every prompt family completed with its true object.

    Attribute prompts are about other subjects whose true object is target_new.
    """
    out = []
    for r in records:
        truths = [r.rewrite_prompt, *r.paraphrase_prompts, *r.neighborhood_prompts]
        out.extend(f"{p} {r.target_true}." for p in truths)
        out.extend(f"{p} {r.target_new}." for p in r.attribute_prompts)
    return out


def rome_layout(r: Record) -> dict:
    """A Record back in ROME's CounterFact layout (how bundles store their records)."""
    return {
        "case_id": r.case_id,
        "requested_rewrite": {
            "prompt": r.prompt, "subject": r.subject, "relation_id": r.relation_id,
            "target_new": {"str": r.target_new, "id": r.target_new_id},
            "target_true": {"str": r.target_true, "id": None},
        },
        "paraphrase_prompts": list(r.paraphrase_prompts),
        "neighborhood_prompts": list(r.neighborhood_prompts),
        "attribute_prompts": list(r.attribute_prompts),
        "generation_prompts": list(r.generation_prompts),
    }


def train_tokenizer(sentences: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on ``sentences``.

    Unlike GPT-2's, it puts ``<|endoftext|>`` before every prompt (a BOS, as Llama's tokenizer
    does) and a space before the first word, so that a subject is the same tokens wherever it
    stands and never sits at position 0, the attention sink.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(sentences, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", special_tokens=[(EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=1024,
    )


def pack(ids: list[list[int]], seq_len: int, eos: int, rng: random.Random,
         ) -> list[tuple[list[int], int]]:
    """Shuffle texts and pack them into sequences of ``seq_len`` tokens: EOS t1 EOS t2 EOS ...

    Every text follows an EOS, as every prompt follows the tokenizer's BOS (the same token).
    Returns (ids, used) pairs: ``used`` tokens are text and separators, the rest is padding.
    """
    order = list(range(len(ids)))
    rng.shuffle(order)
    seqs, cur = [], [eos]
    for i in order:
        sent = ids[i][: seq_len - 2] + [eos]
        if len(cur) + len(sent) > seq_len:
            seqs.append((cur + [eos] * (seq_len - len(cur)), len(cur)))
            cur = [eos]
        cur = cur + sent
    if len(cur) > 1:
        seqs.append((cur + [eos] * (seq_len - len(cur)), len(cur)))
    return seqs


def train_model(sentences: list[str], tok, cfg: BuildConfig) -> tuple[GPT2LMHeadModel, dict]:
    """Train a GPT-2 language model on the sentences; returns the model and training stats."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    eos = tok.eos_token_id
    ids = tok(sentences, add_special_tokens=False)["input_ids"]
    config = GPT2Config(
        vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, loss_type="ForCausalLM",
        activation_function="gelu_pytorch_tanh",  # GPT-2's tanh GELU as one fused kernel
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    per_epoch = len(pack(ids, cfg.seq_len, eos, random.Random(cfg.seed))) // cfg.batch_size
    total = max(1, int(cfg.epochs * per_epoch))
    model.train()
    step, loss_avg, start = 0, float("nan"), time.time()
    bar = progress(total=total, desc="train tiny GPT-2", unit="step")
    while step < total:
        seqs = pack(ids, cfg.seq_len, eos, rng)
        for b in range(0, len(seqs) - cfg.batch_size + 1, cfg.batch_size):
            if step >= total:
                break
            chunk = seqs[b : b + cfg.batch_size]
            x = torch.tensor([c[0] for c in chunk])
            used = torch.tensor([c[1] for c in chunk])
            labels = torch.where(torch.arange(cfg.seq_len) < used[:, None], x, -100)
            warm = min(1.0, (step + 1) / cfg.warmup)
            lr = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = model(input_ids=x, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_avg = loss.item() if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * loss.item()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss_avg:.3f}")
    bar.close()
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    return model, {"steps": total, "final_loss": round(loss_avg, 4), "parameters": params,
                   "train_seconds": round(time.time() - start, 1)}


def knowledge(model, tok, records: list[Record], batch_size: int = 128) -> dict[str, float]:
    """Share of rewrite / paraphrase prompts where target_true beats target_new (pre-edit)."""
    out = {}
    for family in ("rewrite", "paraphrase"):
        prompts = [(r, p) for r in records
                   for p in ([r.rewrite_prompt] if family == "rewrite" else r.paraphrase_prompts)]
        if not prompts:
            continue
        pairs = [(p, t) for r, p in prompts for t in (r.target_true, r.target_new)]
        nll = completion_nll(model, tok, pairs, batch_size).view(-1, 2)
        out[family] = round(float((nll[:, 0] < nll[:, 1]).float().mean()), 4)
    return out


def _write_gz(path: Path, text: str) -> None:
    """gzip with a zero timestamp, so that rebuilding gives identical bytes."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(text.encode("utf-8"))


def _load_facts(path: str, limit: int | None) -> list[Record]:
    if not Path(path).expanduser().is_file():
        raise DataError(f"toy build --facts {path}: no such file; give a CounterFact JSON file")
    raws = read_json_records(path)[:limit]
    if not raws:
        raise DataError(f"{path} holds no records: give --facts a CounterFact file")
    parse = PARSERS[detect_layout(raws[0])]
    records, _ = parse_all(raws, parse, skip_invalid=False)
    return records


def build_bundle(out: str | Path, cfg: BuildConfig, facts: str | None = None,
                 limit: int | None = None) -> dict:
    """Build a bundle into ``out`` (written to a temporary folder, then moved into place)."""
    out = Path(out)
    world: World | None = None
    if facts:
        records = _load_facts(facts, limit)
        sentences = record_sentences(records)
        raw_records = [rome_layout(r) for r in records]
    else:
        world = build_world(cfg.num_subjects, cfg.seed)
        sentences = training_sentences(world, cfg.seed)
        raw_records = world.records
        records, _ = parse_all(raw_records, PARSERS["rome"], skip_invalid=False)
    log.info("%d records, %d training sentences", len(records), len(sentences))
    tok = train_tokenizer(sentences, cfg.vocab_size)
    model, stats = train_model(sentences, tok, cfg)
    stats["knowledge"] = knowledge(model, tok, records)
    log.info("pre-edit knowledge: %s", stats["knowledge"])

    out.parent.mkdir(parents=True, exist_ok=True)
    with folder_replaced_atomically(out) as tmp:
        (tmp / "world").mkdir(parents=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_gz(tmp / "world" / "records.json.gz", json.dumps(raw_records))
        if world is not None:
            _write_gz(tmp / "world" / "snippets.json.gz", json.dumps(world.snippets))
            _write_gz(tmp / "world" / "tfidf.json.gz",
                      json.dumps({"vocab": world.vocab, "idf": world.idf}))
        shuffled = list(sentences)
        random.Random(cfg.seed).shuffle(shuffled)
        _write_gz(tmp / "corpus.txt.gz", "\n".join(shuffled) + "\n")
        info = {"config": asdict(cfg), "facts": facts, "records": len(records),
                "torch": torch.__version__, **stats}
        (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def check_bundle(path: str | Path) -> dict[str, float]:
    """Pre-edit knowledge of a bundle's model on its own records."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    records, _ = parse_all(read_json_records(path / "world" / "records.json.gz"),
                           PARSERS["rome"], skip_invalid=False)
    return knowledge(model, tok, records)
