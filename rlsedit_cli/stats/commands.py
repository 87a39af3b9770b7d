"""``rlsedit stats ls | rm | import | export``: the anchor-statistics cache, and MEMIT's format."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from rlsedit_cli.errors import DataError

log = logging.getLogger(__name__)


def entries(cache: str | Path) -> list[dict]:
    """What the cache holds: one row per cached layer (model, layer, corpus, samples, ...)."""
    rows = []
    for meta_path in sorted((Path(cache).expanduser() / "stats").glob("*/layer*.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, OSError):
            continue
        key, data = meta.get("key", {}), meta_path.with_suffix(".safetensors")
        size = data.stat().st_size if data.is_file() else 0
        rows.append({"model": key.get("model"), "layer": key.get("layer"),
                     "corpus": key.get("corpus"), "samples": meta.get("samples"),
                     "tokens": meta.get("tokens"), "size_mb": round(size / 2**20, 1),
                     "age_days": round((time.time() - meta_path.stat().st_mtime) / 86400, 1),
                     "imported_from": meta.get("imported_from"), "file": str(data)})
    return rows


def remove(cache: str | Path, model: str | None, layer: int | None) -> list[str]:
    """Delete the cached layers of ``model`` (all models: None) and ``layer`` (all: None)."""
    gone = []
    for row in entries(cache):
        if (model is None or row["model"] == model) and (layer is None or row["layer"] == layer):
            data = Path(row["file"])
            data.unlink(missing_ok=True)
            data.with_suffix(".json").unlink(missing_ok=True)
            gone.append(str(data))
    return gone


def _config(source: str | None, overrides: list[str]):
    """A run folder's resolved config, or the config ``rlsedit run OVERRIDES`` composes."""
    from rlsedit_cli.config import composed

    if source and (Path(source) / "config.yaml").is_file():
        return OmegaConf.load(Path(source) / "config.yaml")
    if source:
        overrides = [f"model={source}", *overrides]
    return composed(overrides)


def _anchor(cfg):
    import torch

    from rlsedit_cli.models.loader import load_model
    from rlsedit_cli.stats.anchor import AnchorStats

    handle = load_model(cfg.model, torch.device("cpu"), cfg.paths.cache)
    stats = OmegaConf.to_container(cfg.stats, resolve=True)
    base = cfg.model.get("name_or_path") or str(cfg.model.name)
    return AnchorStats(handle, cfg.paths.cache, **stats), str(base)


def stats_command(args) -> int:
    """The ``rlsedit stats`` verbs."""
    from rlsedit_cli.stats.interop import export_memit, import_memit

    args.cache = _cache(args)
    if args.stats_verb == "ls":
        rows = entries(args.cache)
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        log.info("%d cached layer(s) under %s", len(rows), Path(args.cache).expanduser())
        return 0
    if args.stats_verb == "rm":
        if args.model is None and args.layer is None and not args.all:
            raise DataError("stats rm removes nothing without --model M, --layer L or --all")
        gone = remove(args.cache, args.model, args.layer)
        log.info("removed %d cached layer(s)", len(gone))
        return 0
    files = [a for a in getattr(args, "files", []) if "=" not in a]  # KEY=VALUE: overrides
    overrides = [*(a for a in getattr(args, "files", []) if "=" in a), *args.overrides]
    if args.cache_given:
        overrides.append(f"paths.cache={args.cache}")
    cfg = _config(args.source if args.stats_verb == "export" else None, overrides)
    anchor, base = _anchor(cfg)
    if args.stats_verb == "import":
        for path in files:
            log.info("imported %s as %s", path, import_memit(anchor, path, base))
        return 0
    layers = list(args.layers or cfg.model.edit_layers)
    for path in export_memit(anchor, layers, args.out, base):
        sys.stdout.write(f"{path}\n")
    return 0


DEFAULT_CACHE = "~/.cache/rlsedit"


def _cache(args) -> str:
    """The cache folder, spelt ``--cache DIR`` or ``paths.cache=DIR`` with every verb (the
    other KEY=VALUE overrides are for import and export only)."""
    given = [a.split("=", 1)[1] for a in [*getattr(args, "files", []), *args.overrides]
             if a.startswith("paths.cache=")]
    if args.cache is not None and given and given[-1] != args.cache:
        raise DataError(f"stats {args.stats_verb}: --cache {args.cache} and "
                        f"paths.cache={given[-1]} disagree: give one")
    if args.stats_verb in ("ls", "rm"):
        other = [a for a in args.overrides if not a.startswith("paths.cache=")]
        if other:
            raise DataError(f"stats {args.stats_verb} takes no override {other[0]!r}: only "
                            "paths.cache=DIR (or --cache DIR)")
    args.cache_given = args.cache is not None and not given
    return args.cache or (given[-1] if given else DEFAULT_CACHE)


def add_parser(sub) -> None:
    """The ``stats`` sub-command's arguments."""
    stats = sub.add_parser("stats", help="the anchor-statistics cache: ls, rm, import and "
                                         "export MEMIT's files")
    verbs = stats.add_subparsers(dest="stats_verb", required=True, metavar="VERB")
    ls = verbs.add_parser("ls", help="what the cache holds")
    rm = verbs.add_parser("rm", help="remove cached statistics")
    rm.add_argument("--model", help="only this model (its conf/model name)")
    rm.add_argument("--layer", type=int, help="only this layer")
    rm.add_argument("--all", action="store_true", help="every cached layer")
    imp = verbs.add_parser("import", help="MEMIT/ROME/AlphaEdit .npz files into the cache")
    imp.add_argument("files", nargs="+", metavar="FILE",
                     help="<module>_<precision>_mom2_<n>.npz files, then KEY=VALUE overrides "
                          "as for `rlsedit run` (model=..., stats.num_samples=..., "
                          "paths.cache=...)")
    imp.set_defaults(overrides=[])
    exp = verbs.add_parser("export", help="cached statistics as MEMIT's .npz files")
    exp.add_argument("source", help="a run folder, or a model config name (as model=...)")
    exp.add_argument("--out", required=True, help="stats_dir to write into")
    exp.add_argument("--layers", type=int, nargs="+", help="default: the model's edit_layers")
    exp.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="config overrides as for `rlsedit run` (stats.num_samples=..., "
                          "paths.cache=...)")
    for parser in (ls, rm):
        parser.set_defaults(overrides=[])
    for parser in (ls, rm, imp, exp):
        parser.add_argument("--cache", help=f"the cache folder, as paths.cache=DIR (default "
                                            f"{DEFAULT_CACHE})")
