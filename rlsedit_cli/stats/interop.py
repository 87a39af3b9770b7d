"""Anchor statistics in the format MEMIT, ROME and AlphaEdit write and publish.

Their ``layer_stats.py`` keeps one ``SecondMoment`` per edited module in
``<stats_dir>/<model>/<corpus>_stats/<module>_<precision>_mom2_<samples>.npz``, saved by
``runningstats.save_cached_state``: ``mom2.mom2`` is the UNNORMALISED sum of k k^T over every
token seen, ``mom2.count`` the number of those tokens, ``mom2.constructor`` the class to rebuild,
``sample_size`` the number of texts. Their ``get_cov`` uses ``mom2 / count``, which is our C.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from rlsedit_cli.errors import DataError, first_line
from rlsedit_cli.files import replaced_atomically
from rlsedit_cli.stats.anchor import AnchorStats
from rlsedit_cli.stats.corpus import corpus_id

NAME = re.compile(r"^(?P<module>.+)_(?P<precision>float16|float32|float64)_mom2(?:_(?P<n>\d+))?"
                  r"\.npz$")
CONSTRUCTOR = "util.runningstats.SecondMoment()"


def model_folder(name_or_path: str) -> str:
    """The folder name layer_stats.py gives a model (``config._name_or_path``, "/" -> "_")."""
    return str(name_or_path).rstrip("/").replace("/", "_")


def corpus_name(corpus: str) -> str:
    """The ``<corpus>`` of a ``<corpus>_stats`` folder: the hub name (wikipedia, wikitext) or a
    file's name and content hash."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", corpus_id(corpus))


def read_memit(path: str | Path) -> dict:
    """The file's module, precision, sample count, model and corpus folders, and C."""
    path = Path(path).expanduser()
    found = NAME.match(path.name)
    if not path.exists():
        raise DataError(f"{path}: no such file; give the path of a statistics file")
    if not path.is_file() or found is None:
        raise DataError(f"{path} is not a statistics file of MEMIT's layer_stats.py (a "
                        "<module>_<precision>_mom2_<samples>.npz file)")
    try:
        with np.load(path, allow_pickle=False) as data:
            total, count = data["mom2.mom2"], int(data["mom2.count"])
            samples = int(data["sample_size"]) if "sample_size" in data.files else None
    except (KeyError, ValueError, OSError, EOFError) as e:
        what = ("it is not a NumPy .npz archive of plain arrays"
                if "pickle" in str(e) or "zip" in str(e).lower() or isinstance(e, EOFError)
                else f"{type(e).__name__}: {first_line(e)[:100]}")
        raise DataError(f"{path} cannot be read as MEMIT statistics ({what}): give a file "
                        "their layer_stats.py wrote") from e
    if not np.isfinite(total).all():
        raise DataError(f"{path}: mom2.mom2 holds NaN or inf values: these statistics cannot "
                        "anchor an edit; compute them again")
    if total.ndim != 2 or total.shape[0] != total.shape[1] or count < 1:
        raise DataError(f"{path}: mom2.mom2 of shape {total.shape} and count {count} is not a "
                        "second moment")
    corpus = path.parent.name.removesuffix("_stats") if path.parent.name.endswith(
        "_stats") else None
    n = int(found["n"]) if found["n"] else samples
    return {"module": found["module"], "precision": found["precision"], "samples": n,
            "model": path.parent.parent.name if corpus else None, "corpus": corpus,
            "tokens": count, "moment": torch.from_numpy(total.astype(np.float64) / count)}


def import_memit(anchor: AnchorStats, path: str | Path, name_or_path: str) -> Path:
    """Check a MEMIT statistics file against the model and the stats settings of ``anchor``
    and store it in the cache under their key (a run with those settings then reads it)."""
    got = read_memit(path)
    spec = anchor.handle.spec
    layers = {spec.mlp_out_template.format(i): i for i in range(anchor.handle.num_layers)}
    if got["module"] not in layers:
        raise DataError(f"{path}: module {got['module']} is not an edited map of "
                        f"{spec.name} (those are {spec.mlp_out_template.format('N')})")
    layer = layers[got["module"]]
    if got["model"] is not None and got["model"] != model_folder(name_or_path):
        raise DataError(f"{path} holds statistics of model {got['model']}, not of "
                        f"{model_folder(name_or_path)} (model={spec.name}): choose its model")
    d_in = anchor.handle.weight_shape(layer)[1]
    if tuple(got["moment"].shape) != (d_in, d_in):
        raise DataError(f"{path}: a {tuple(got['moment'].shape)} moment, but layer {layer} of "
                        f"{spec.name} has {d_in} inputs: not statistics of this model")
    if got["corpus"] is not None and got["corpus"] != corpus_name(anchor.corpus):
        raise DataError(f"{path} was computed over {got['corpus']}; this config's stats.corpus "
                        f"is {anchor.corpus}: set stats.corpus={got['corpus']}")
    if got["samples"] is not None and got["samples"] != anchor.num_samples:
        raise DataError(f"{path} was computed over {got['samples']} samples; this config has "
                        f"stats.num_samples={anchor.num_samples}: set "
                        f"stats.num_samples={got['samples']}")
    return anchor.store(layer, got["moment"], got["tokens"], got["samples"] or 0,
                        imported_from=str(Path(path).expanduser().resolve()))


def export_memit(anchor: AnchorStats, layers: list[int], out: str | Path,
                 name_or_path: str) -> list[Path]:
    """Write the cached C of ``layers`` as layer_stats.py would (missing ones are named)."""
    folder = (Path(out).expanduser() / model_folder(name_or_path)
              / f"{corpus_name(anchor.corpus)}_stats")
    written = []
    for layer in layers:
        found = anchor.cached(layer)
        if found is None:
            raise DataError(f"no cached statistics of layer {layer} for these settings: run "
                            "once (or `rlsedit bench stats`) to compute them first")
        moment, meta = found
        module = anchor.handle.spec.mlp_out_template.format(layer)
        name = f"{module}_{anchor.precision}_mom2_{meta['samples']}.npz"
        folder.mkdir(parents=True, exist_ok=True)
        total = (moment.double() * meta["tokens"]).numpy().astype(anchor.precision)
        with replaced_atomically(folder / name) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{"mom2.constructor": np.array(CONSTRUCTOR),
                           "mom2.count": np.array(meta["tokens"]), "mom2.mom2": total,
                           "sample_size": np.array(meta["samples"])})
        written.append(folder / name)
    return written
