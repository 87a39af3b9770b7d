"""`rlsedit bench stats`: the anchor statistics' rate against a plain forward pass.

The statistics (:func:`rlsedit_cli.stats.moments.accumulate`) run the model up to the highest
edited map and add ``K^T K`` per edited layer. The reference rate is a plain forward pass of the
same blocks on the same batches (texts sorted by length in windows, as ``accumulate`` batches
them), stopped at the same layer, with no key collection: the statistics cannot run faster than
that. Also reported: the share of padded positions in those batches.
"""

from __future__ import annotations

from itertools import islice

import torch

from rlsedit_cli.bench.gemm import timed
from rlsedit_cli.editing.inputs import forward_until
from rlsedit_cli.models.handle import ModelHandle, StopForwardError
from rlsedit_cli.stats.corpus import iter_texts
from rlsedit_cli.stats.moments import SORT_WINDOW, accumulate, sorted_batches


@torch.no_grad()
def _plain_forward(handle: ModelHandle, batches, top: int) -> None:
    """The model on each batch, stopped where ``accumulate`` stops: at the top edited map."""
    def stop(module, args):
        raise StopForwardError

    for ids, mask in batches:
        forward_until(handle, {"input_ids": ids.to(handle.device),
                               "attention_mask": mask.to(handle.device)}, top,
                      [(handle.edited_module(top), "pre", stop)])


def bench_stats(handle: ModelHandle, layers: list[int], corpus: str, samples: int,
                max_length: int, batch_size: int, seed: int = 1) -> dict:
    """Samples per second of the statistics and of the plain forward on the same texts."""
    texts = list(islice(iter_texts(corpus, "random", seed), samples))
    window = batch_size * SORT_WINDOW  # the batches accumulate makes of these texts
    batches = [b for w in range(0, len(texts), window)
               for b in sorted_batches(handle.tok, texts[w : w + window], max_length, batch_size)]
    _plain_forward(handle, batches[:1], max(layers))  # warm-up
    forward_s, _ = timed(lambda: _plain_forward(handle, batches, max(layers)), handle.device)
    stats_s, state = timed(lambda: accumulate(handle, layers, iter(texts), len(texts),
                                              max_length, batch_size), handle.device)
    real = sum(int(m.sum()) for _, m in batches)
    padded = sum(m.numel() for _, m in batches)
    return {"bench": "stats", "device": str(handle.device), "model": str(handle.spec.name),
            "layers": list(layers), "samples": len(texts), "tokens": state.tokens,
            "batch_size": batch_size, "max_length": max_length,
            "stats_s": round(stats_s, 3), "forward_s": round(forward_s, 3),
            "stats_samples_per_s": round(len(texts) / stats_s, 2),
            "forward_samples_per_s": round(len(texts) / forward_s, 2),
            "stats_share_of_forward_rate": round(forward_s / stats_s, 3),
            "padding_share": round(1 - real / padded, 4)}
