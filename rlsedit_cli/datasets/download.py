"""Download a dataset file once into the cache (atomically), or say how to provide it."""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request
from pathlib import Path

from rlsedit_cli.errors import DataError
from rlsedit_cli.files import replaced_atomically

log = logging.getLogger(__name__)


def cached_file(url: str, cache_dir: str | Path, what: str, key: str, timeout: float = 30.0,
                ) -> Path:
    """The file at ``url``, downloaded into ``cache_dir`` on first use.

    Raises:
        DataError: offline or unreachable, naming the file and the ``key`` to set instead.
    """
    dest = Path(cache_dir).expanduser() / "datasets" / Path(url).name
    if dest.is_file():
        return dest
    if os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false"):
        raise DataError(f"{what} is not cached and HF_DATASETS_OFFLINE is set: download {url} "
                        f"and set {key}=/path/to/{dest.name}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dest)
    try:
        with (replaced_atomically(dest) as tmp, urllib.request.urlopen(url, timeout=timeout)
              as response, open(tmp, "wb") as f):
            shutil.copyfileobj(response, f)
    except OSError as e:
        raise DataError(f"cannot download {what} from {url} ({e}): download it where there is a "
                        f"network and set {key}=/path/to/{dest.name}") from e
    return dest
