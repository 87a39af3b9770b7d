"""``rlsedit tune trace``: causal tracing over held-out records, the curve per layer and the
window of layers it proposes for the key-value editors, written to a folder of its own."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from rlsedit_cli.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    tune = sub.add_parser("tune", help="find an editor's settings for a model (causal tracing)")
    verbs = tune.add_subparsers(dest="tune_verb", required=True, metavar="VERB")
    trace = verbs.add_parser("trace", help="ROME's causal tracing over held-out records: where "
                                           "the model's facts are, and a window of layers")
    trace.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides as for `rlsedit run` (model=..., dataset=..., "
                            "dataset.path=...)")
    trace.add_argument("--records", type=int, default=50, help="records to trace")
    trace.add_argument("--offset", type=int, default=5000,
                       help="first record (file order): keep the traced records out of the "
                            "runs you report")
    trace.add_argument("--samples", type=int, default=10, help="corrupted copies per prompt")
    trace.add_argument("--window", type=int, default=10,
                       help="MLP layers restored around each layer (ROME: 10)")
    trace.add_argument("--noise", type=float, default=3.0,
                       help="noise as this many standard deviations of the subject tokens' "
                            "embeddings (ROME's rule s3)")
    trace.add_argument("--width", type=int, default=None,
                       help="layers of the proposed window (default: as many as the model's "
                            "edit_layers)")
    trace.add_argument("--device", default="auto")
    trace.add_argument("--out", help="folder to write (default: outputs/tune/MODEL/trace-TIME)")


def tune_command(args: argparse.Namespace) -> int:
    from rlsedit_cli.config import composed

    cfg = composed([*args.overrides])
    out = Path(args.out or f"{cfg.paths.output_dir}/tune/{cfg.model.name}/"
                           f"trace-{time.strftime('%Y-%m-%d_%H-%M-%S')}").expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty: choose a new folder (tune writes its own)")
    for name, value, low in (("--records", args.records, 1), ("--samples", args.samples, 1),
                             ("--window", args.window, 1), ("--offset", args.offset, 0)):
        if value < low:
            raise ConfigError(f"{name}={value} must be at least {low}")
    if not args.noise > 0:
        raise ConfigError(f"--noise={args.noise} must be above 0")
    result = run_trace(cfg, args)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, result, cfg.model.name)
    log.info("causal trace of %s over %d records (%d skipped): MLP peak at layer %d; proposed "
             "layers %s; %s", cfg.model.name, result["traced"], result["skipped"],
             result["peak_layer"], result["proposed_layers"], out)
    return 0


def run_trace(cfg, args: argparse.Namespace) -> dict:
    """Trace the records; average the MLP indirect effect at the subject's last token over
    those whose clean answer is their true target's first token (ROME's known facts)."""
    import torch

    from rlsedit_cli.models.loader import load_configured, resolve_device
    from rlsedit_cli.models.tokens import encode_target
    from rlsedit_cli.progress import progress
    from rlsedit_cli.runner.run import build
    from rlsedit_cli.tune.trace import noise_level, trace

    handle = load_configured(cfg, resolve_device(args.device))
    records = build(cfg.dataset).records[args.offset : args.offset + args.records]
    if not records:
        raise DataError(f"--offset {args.offset} is past the dataset's records: lower it")
    noise = noise_level(handle, [r.subject for r in records], args.noise)
    rows, skipped = [], 0
    for r in progress(records, desc="causal trace", unit="record"):
        expect = encode_target(handle.tok, r.target_true)[0]
        t = trace(handle, r.prompt, r.subject, noise, kind="mlp", window=args.window,
                  samples=args.samples, expect=expect)
        if not t.correct:
            skipped += 1
            continue
        rows.append((t.scores[0], t.low, t.high))
    if not rows:
        raise DataError(f"the model predicts the true target of none of the {len(records)} "
                        "records (ROME traces known facts only): trace other records "
                        "(--offset) or check the model")
    scores = torch.stack([s for s, _, _ in rows])  # (n, num_layers)
    low = torch.tensor([lo for _, lo, _ in rows])
    effect = (scores - low[:, None]).mean(0)  # the average indirect effect per layer
    peak = int(effect.argmax())
    n = handle.num_layers
    width = min(args.width or len(cfg.model.edit_layers), n)
    first = min(max(0, peak - width + 1), n - width)  # near the start: the first ``width``
    return {"model": cfg.model.name, "traced": len(rows), "skipped": skipped,
            "records": f"{args.offset}..{args.offset + len(records) - 1}",
            "noise": noise, "noise_factor": args.noise, "samples": args.samples,
            "window": args.window, "kind": "mlp", "token": "subject_last",
            "high": float(torch.tensor([h for _, _, h in rows]).mean()),
            "low": float(low.mean()), "mean_score": scores.mean(0).tolist(),
            "indirect_effect": effect.tolist(), "peak_layer": peak,
            "proposed_layers": list(range(first, first + width)),
            "rule": f"the {width} layers ending at the peak of the MLP's average indirect "
                    "effect at the subject's last token (MEMIT's choice of its window)",
            "configured_layers": list(cfg.model.edit_layers)}


def write_report(out: Path, result: dict, model: str) -> None:
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
    ax.axvspan(result["proposed_layers"][0] - 0.5, result["proposed_layers"][-1] + 0.5,
               color="grey", alpha=0.2, label="proposed layers")
    ax.set_xlabel(f"centre of {result['window']} restored MLP layers")
    ax.set_ylabel("average indirect effect")
    ax.set_title(f"{model}: causal trace at the subject's last token ({result['traced']} facts)")
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
        f"Proposed edited layers: {result['proposed_layers']} ({result['rule']}); the model's "
        f"configured edit_layers: {result['configured_layers']}.",
        "",
        "![trace](trace.png)",
        ""]))
