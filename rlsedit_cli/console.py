"""What the console shows: rlsedit's own records, and only the warnings of the libraries below it
(once each); run.log in the run folder keeps everything."""

from __future__ import annotations

import logging

OWN = ("rlsedit", "__main__", "HYDRA", "hydra")


class ConsoleFilter(logging.Filter):
    """rlsedit's records at any level; a library's (transformers, lm-eval, datasets, ...) only
    from WARNING up, and each distinct message once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0].startswith(OWN):
            return True
        if record.levelno < logging.WARNING:
            return False
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True
