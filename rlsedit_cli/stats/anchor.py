"""Anchor statistics C = E[k k^T] per edited layer, cached on disk and impossible to mix up.

The cache key holds the model (name and a fingerprint of its weights up to the edited layer),
the layer, the corpus (content hash for files), the sample count, the maximum length and the
dtypes. Each file has a sidecar with its sha256; a file whose checksum does not match is
recomputed. An interrupted computation leaves a partial state that the next run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from rlsedit_cli.errors import DataError
from rlsedit_cli.files import file_sha256, replaced_atomically
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.progress import progress
from rlsedit_cli.stats.corpus import corpus_id, iter_texts
from rlsedit_cli.stats.moments import MomentState, accumulate

log = logging.getLogger(__name__)
SAVE_PARTIAL_EVERY_S = 60.0


@torch.no_grad()
def fingerprint(handle: ModelHandle, upto_layer: int) -> str:
    """A hash of the weights that shape the inputs of the edited maps up to ``upto_layer``.

    Sums and sums of squares (float64) of the embeddings and of every parameter of the blocks
    0..upto_layer: cheap on any device, different for any other model.
    """
    prefixes = [handle.spec.layer_template.format(i) + "." for i in range(upto_layer + 1)]
    return parameters_digest(
        (name, p) for name, p in handle.model.named_parameters()
        if "emb" in name or "wte" in name or "wpe" in name or name.startswith(tuple(prefixes))
    )[:16]


@torch.no_grad()
def parameters_digest(named) -> str:
    """sha256 over (name, shape, float64 sum and sum of squares) of each (name, parameter)."""
    digest = hashlib.sha256()
    for name, p in named:
        x = p.detach().double()
        digest.update(f"{name}:{tuple(p.shape)}:{float(x.sum()):.12e}:"
                      f"{float((x * x).sum()):.12e}".encode())
    return digest.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-60:]


class AnchorStats:
    """Provides C for edited layers; computes what the cache lacks in one pass over the corpus."""

    def __init__(self, handle: ModelHandle, cache_dir: str | Path, corpus: str, num_samples: int,
                 max_length: int, batch_size: int, precision: str = "float32",
                 sample: str = "random", seed: int = 1) -> None:
        self.handle = handle
        self.corpus, self.sample, self.seed = corpus, sample, int(seed)
        self.num_samples = int(num_samples)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.precision = precision
        # keyed by content (the model's name in conf/ and its weights' fingerprint), not by
        # where the model lies: every clone of the project shares one cache
        self.root = Path(cache_dir).expanduser() / "stats" / _slug(str(handle.spec.name))
        self._fingerprints: dict[int, str] = {}

    def _key(self, key: int | str) -> dict:
        """The cache key of the statistics of an edited map's input (a layer: its MLP output
        map; a module name: another MLP map)."""
        layer = self.handle.map_layer(key)
        if layer not in self._fingerprints:
            self._fingerprints[layer] = fingerprint(self.handle, layer)
        return {"model": str(self.handle.spec.name), "weights": self._fingerprints[layer],
                "layer": layer, "module": self.handle.map_name(key),
                "corpus": corpus_id(self.corpus), "num_samples": self.num_samples,
                "sample": self.sample if self.sample == "first" else f"random:{self.seed}",
                "max_length": self.max_length, "model_dtype": str(self.handle.spec.dtype),
                "precision": self.precision}

    def _path(self, layer: int | str) -> Path:
        key = self._key(layer)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        name = self.handle.map_label(layer)  # layer5 (an MLP output map), gate11, ...
        return self.root / f"{name}_n{self.num_samples}_{digest}.safetensors"

    def _load(self, layer: int | str) -> torch.Tensor | None:
        path = self._path(layer)
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, OSError) as e:  # a truncated sidecar: recompute, never fail
            log.warning("anchor statistics sidecar %s cannot be read (%s): recomputing",
                        meta_path.name, str(e)[:80])
            return None
        if meta.get("sha256") != file_sha256(path) or meta.get("key") != self._key(layer):
            log.warning("anchor statistics %s fail their checksum: recomputing", path.name)
            return None
        moment = load_file(path)["moment"]
        if not torch.isfinite(moment).all():
            raise DataError(f"anchor statistics {path} hold NaN or inf values: remove them "
                            f"(rlsedit stats rm --layer {layer}) and compute or import them again")
        return moment

    def store(self, layer: int | str, moment: torch.Tensor, tokens: int, samples: int,
              **extra) -> Path:
        """Write C of ``layer`` into the cache under this configuration's key (a computed one,
        or one imported from another tool: ``extra`` says from where)."""
        path = self._path(layer)
        if not torch.isfinite(moment).all():
            raise DataError(f"the anchor statistics of layer {layer} hold NaN or inf values "
                            f"({extra.get('imported_from') or 'computed'}): not stored; they "
                            "cannot anchor an edit")
        path.parent.mkdir(parents=True, exist_ok=True)
        dtype = getattr(torch, self.precision)
        with replaced_atomically(path) as tmp:
            save_file({"moment": moment.to(dtype).cpu().contiguous()}, tmp)
        meta = {"key": self._key(layer), "sha256": file_sha256(path), "tokens": int(tokens),
                "samples": int(samples), **extra}
        with replaced_atomically(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(meta, indent=2))
        return path

    def cached(self, layer: int | str) -> tuple[torch.Tensor, dict] | None:
        """The cached C of ``layer`` and its sidecar (tokens, samples), or None."""
        moment = self._load(layer)
        if moment is None:
            return None
        return moment, json.loads(self._path(layer).with_suffix(".json").read_text())

    def _names(self, layers: list[int | str]) -> str:
        """The maps, short: layers [4, 5, 6] (MLP output maps), or gate10, up17, ..."""
        if all(isinstance(key, int) for key in layers):
            return f"layers {list(layers)}"
        return ", ".join(self.handle.map_label(key) for key in layers)

    def _partial_path(self, layers: list[int | str]) -> Path:
        names = "_".join(self._path(layer).stem for layer in layers)
        return self.root / f"partial_{hashlib.sha256(names.encode()).hexdigest()[:16]}.pt"

    def moments(self, layers: list[int | str]) -> dict[int | str, torch.Tensor]:
        """C for each layer, (d_in, d_in) float64 on the layer's device."""
        out = {}
        for layer in layers:
            cached = self._load(layer)
            if cached is not None:
                log.info("anchor statistics of %s from cache %s", self.handle.map_label(layer),
                         self._path(layer))
                out[layer] = cached
        missing = [layer for layer in layers if layer not in out]
        if missing:  # one process computes; others (a sweep's jobs) wait, then read its files
            self.root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.root / ".lock")):
                for layer in missing:
                    cached = self._load(layer)
                    if cached is not None:
                        log.info("anchor statistics of %s computed by another process",
                                 self.handle.map_label(layer))
                        out[layer] = cached
                missing = [layer for layer in layers if layer not in out]
                if missing:
                    out |= self._compute(missing)
        return {layer: out[layer].to(device=self.handle.weight(layer).device,
                                     dtype=torch.float64) for layer in layers}

    def _compute(self, layers: list[int | str]) -> dict[int | str, torch.Tensor]:
        partial = self._partial_path(layers)
        state = None
        if partial.is_file():
            try:
                state = MomentState(**torch.load(partial, map_location="cpu",
                                                 weights_only=True))
                log.info("resuming anchor statistics after %d samples", state.samples)
            except Exception as e:  # a partial file from a killed write: start over
                log.warning("ignoring unreadable partial statistics %s (%s)", partial, e)
        partial.parent.mkdir(parents=True, exist_ok=True)
        bar = progress(total=self.num_samples, initial=state.samples if state else 0,
                       desc=f"anchor statistics, {self._names(layers)}", unit="sample")
        last_save = [time.monotonic()]

        def on_batch(s: MomentState) -> None:
            bar.update(s.samples - bar.n)
            if time.monotonic() - last_save[0] > SAVE_PARTIAL_EVERY_S:
                with replaced_atomically(partial) as tmp:
                    torch.save({"sums": {k: v.cpu() for k, v in s.sums.items()},
                                "tokens": s.tokens, "samples": s.samples}, tmp)
                last_save[0] = time.monotonic()

        log.info("computing anchor statistics of %s over %s (%d samples, %s, %d tokens "
                 "max)", self._names(layers), self.corpus, self.num_samples,
                 "in file order" if self.sample == "first" else f"random, seed {self.seed}",
                 self.max_length)
        texts = iter_texts(self.corpus, self.sample, self.seed)
        state = accumulate(self.handle, layers, texts, self.num_samples,
                           self.max_length, self.batch_size, state, on_batch)
        bar.close()
        if state.samples < self.num_samples:
            log.warning("corpus %s ended after %d of %d samples", self.corpus, state.samples,
                        self.num_samples)
        out = {}  # rounded to the stored precision: fresh and cached runs see the same C
        for layer in layers:
            out[layer] = state.moment(layer).to(getattr(torch, self.precision))
            self.store(layer, out[layer], state.tokens, state.samples)
        partial.unlink(missing_ok=True)
        return out
