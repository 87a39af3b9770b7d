"""Where a model keeps its facts: ROME's causal trace over records, averaged over the known facts,
and the window of layers it proposes for the key-value editors; its files (json, csv, png,
markdown)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlsedit_cli.errors import DataError

MIN_KNOWN = 5  # known facts below which a trace proposes no layers


def trace_records(handle, records, where: str, samples: int, window: int, noise_factor: float,
                  width: int, configured: list[int]) -> dict:
    """Trace ``records`` (``where``: which they are, for the report); average the MLP indirect
    effect at the subject's last token over those whose clean answer is their true target's
    first token (ROME's known facts); propose the ``width`` layers ending at its peak when at
    least :data:`MIN_KNOWN` facts were traced."""
    from rlsedit_cli.models.tokens import encode_target
    from rlsedit_cli.progress import progress
    from rlsedit_cli.tune.trace import noise_level, trace

    noise = noise_level(handle, [r.subject for r in records], noise_factor)
    rows, skipped = [], 0
    for r in progress(records, desc="causal trace", unit="record"):
        expect = encode_target(handle.tok, r.target_true)[0]
        t = trace(handle, r.prompt, r.subject, noise, kind="mlp", window=window,
                  samples=samples, expect=expect)
        if not t.correct:
            skipped += 1
            continue
        rows.append((t.scores[0], t.low, t.high))
    if not rows:
        raise DataError(f"the model predicts the true target of none of the {len(records)} "
                        f"records ({where}; ROME traces known facts only): trace other "
                        "records (--offset) or check the model")
    scores = torch.stack([s for s, _, _ in rows])  # (n, num_layers)
    low = torch.tensor([lo for _, lo, _ in rows])
    effect = (scores - low[:, None]).mean(0)  # the average indirect effect per layer
    peak = int(effect.argmax())
    n = handle.num_layers
    width = min(width, n)
    first = min(max(0, peak - width + 1), n - width)  # near the start: the first ``width``
    proposed = list(range(first, first + width)) if len(rows) >= MIN_KNOWN else None
    return {"model": handle.spec.name, "traced": len(rows), "skipped": skipped,
            "records": where, "noise": noise, "noise_factor": noise_factor, "samples": samples,
            "window": window, "kind": "mlp", "token": "subject_last",
            "high": float(torch.tensor([h for _, _, h in rows]).mean()),
            "low": float(low.mean()), "mean_score": scores.mean(0).tolist(),
            "indirect_effect": effect.tolist(), "peak_layer": peak,
            "proposed_layers": proposed,
            "rule": f"the {width} layers ending at the peak of the MLP's average indirect "
                    "effect at the subject's last token (MEMIT's choice of its window), when "
                    f"{MIN_KNOWN} known facts or more were traced",
            "configured_layers": list(configured)}


def write_trace(out: Path, result: dict, model: str) -> None:
    """trace.json, trace.csv, trace.png and report.md in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    (out / "trace.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["layer,mean_score,indirect_effect"]
    lines += [f"{i},{s:.6f},{e:.6f}" for i, (s, e) in
              enumerate(zip(result["mean_score"], result["indirect_effect"]))]
    (out / "trace.csv").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(result["indirect_effect"])), result["indirect_effect"], color="seagreen")
    if result["proposed_layers"]:
        ax.axvspan(result["proposed_layers"][0] - 0.5, result["proposed_layers"][-1] + 0.5,
                   color="grey", alpha=0.2, label="proposed layers")
    ax.set_xlabel(f"centre of {result['window']} restored MLP layers")
    ax.set_ylabel("average indirect effect")
    ax.set_title(f"{model}: causal trace at the subject's last token ({result['traced']} facts)")
    if result["proposed_layers"]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "trace.png", dpi=120)
    plt.close(fig)
    peak = result["peak_layer"]
    (out / "report.md").write_text("\n".join([
        f"# Causal trace of {model}",
        "",
        f"Records {result['records']} ({result['traced']} whose clean answer is their true "
        f"target, {result['skipped']} left out), {result['samples']} corrupted copies each, "
        f"noise {result['noise']:.4f} ({result['noise_factor']:g} x the subject embeddings' "
        f"std), MLP outputs restored in windows of {result['window']} layers at the subject's "
        "last token (ROME's causal_trace.py).",
        "",
        f"p(answer): clean {result['high']:.4f}, corrupted {result['low']:.4f}; the largest "
        f"average indirect effect {result['indirect_effect'][peak]:.4f} at layer {peak}.",
        "",
        f"Proposed edited layers: {result['proposed_layers'] or 'none'} ({result['rule']}); "
        "the model's "
        f"configured edit_layers: {result['configured_layers']}.",
        "",
        "![trace](trace.png)",
        ""]))
