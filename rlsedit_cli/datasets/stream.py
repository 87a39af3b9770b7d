"""Cut the dataset into the stream of edit batches."""

from __future__ import annotations

import random

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.errors import ConfigError


def make_stream(records: list[Record], num_edits: int, batch_size: int, seed: int,
                shuffle: bool = True, offset: int = 0) -> list[list[Record]]:
    """Batches of the edits to make: records [offset, offset + num_edits) of the (shuffled) set.

    The order depends only on ``seed``, so the same config always streams the same edits.
    """
    order = list(records)
    if shuffle:
        random.Random(seed).shuffle(order)
    if offset + num_edits > len(order):
        raise ConfigError(
            f"stream.num_edits={num_edits} with stream.offset={offset} needs {offset + num_edits} "
            f"records but the dataset has {len(order)}: lower stream.num_edits or the offset"
        )
    chosen = order[offset : offset + num_edits]
    return [chosen[i : i + batch_size] for i in range(0, num_edits, batch_size)]


def stream_of(records: list[Record], stream) -> list[list[Record]]:
    """:func:`make_stream` with the keys of the ``stream`` config section that order the edits
    (the section also holds how the stream may end, ``stop_on_collapse``)."""
    return make_stream(records, stream.num_edits, stream.batch_size, stream.seed,
                       stream.shuffle, stream.offset)
