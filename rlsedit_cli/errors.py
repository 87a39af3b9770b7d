"""User-facing errors. Each message is one line that names the problem and how to fix it.

The CLI prints ``error: <message>`` for these and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class RlseditError(Exception):
    """Base class of every error the user can fix."""


class ConfigError(RlseditError):
    """A config value is invalid (out of range, inconsistent, unknown)."""


class DataError(RlseditError):
    """A dataset, record or cache file is missing or malformed."""


class ModelLoadError(RlseditError):
    """A model or tokenizer cannot be loaded, or its architecture is not supported."""


class NumericalError(RlseditError):
    """A factorisation failed or a tensor holds NaN/inf."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm sends on preemption, ``kill``, a container's stop) raised as an
    interrupt, so that a run ends as after Ctrl-C: its last checkpoint kept, the resume named."""


def stopped_by(err: KeyboardInterrupt) -> tuple[str, int]:
    """How a run was stopped, in words, and the exit status that says so (128 + the signal)."""
    return ("terminated (SIGTERM)", 143) if isinstance(err, Terminated) else ("interrupted", 130)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
