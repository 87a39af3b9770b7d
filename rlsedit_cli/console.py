"""What the console shows: rlsedit's own records, and only the warnings of the libraries below it
(once each); run.log in the run folder keeps everything."""

from __future__ import annotations

import logging

OWN = ("rlsedit", "__main__", "HYDRA", "hydra")

# Warnings a library gives about how rlsedit calls it on purpose: run.log only. lm-eval warns on
# every model object handed to it, which is how the edited model is evaluated in memory.
EXPECTED = {
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                   "Passed an already-initialized model through `pretrained`"),
}


class ConsoleFilter(logging.Filter):
    """rlsedit's records at any level; a library's (transformers, lm-eval, datasets, ...) only
    from WARNING up, each distinct message once, and not the EXPECTED ones."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0].startswith(OWN):
            return True
        if record.levelno < logging.WARNING:
            return False
        if record.getMessage().startswith(EXPECTED.get(record.name, ())):
            return False
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True
