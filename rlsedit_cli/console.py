"""What the console shows: rlsedit's own records, and only the warnings of the libraries below it
(once each); run.log in the run folder keeps everything."""

from __future__ import annotations

import logging
import re

OWN = ("rlsedit", "__main__", "HYDRA", "hydra")

# Warnings a library gives about how rlsedit calls it on purpose: run.log only. lm-eval warns on
# every model object handed to it, which is how the edited model is evaluated in memory.
# transformers warns of a forward without an attention mask whose rows end in the pad token:
# lm-eval's scoring passes right-padded rows and reads only the positions before the padding.
EXPECTED = {
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                   "Passed an already-initialized model through `pretrained`"),
    "transformers.modeling_utils": ("We strongly recommend passing in an `attention_mask`",),
}
NAMES = re.compile(r"[\w.-]*[_\d][\w.-]*")  # identifiers and numbers: one warning per task of
# a group (MMLU's 57 subjects) is the same warning


def route_library_logs() -> None:
    """transformers' records through the root logger's handlers (this filter on the console,
    run.log), not transformers' own console handler."""
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()


class ConsoleFilter(logging.Filter):
    """rlsedit's records at any level; a library's (transformers, lm-eval, datasets, ...) only
    from WARNING up, each distinct message once (messages that differ only in names and
    numbers count as one), and not the EXPECTED ones."""

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
        key = (record.name, NAMES.sub("#", record.getMessage()))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True
