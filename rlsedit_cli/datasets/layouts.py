"""Which layout a raw record is in, and its parser (for `rlsedit toy build --facts`)."""

from __future__ import annotations

from rlsedit_cli.datasets.counterfact_easyedit import parse_easyedit
from rlsedit_cli.datasets.records import fail, layout_of, parse_rome
from rlsedit_cli.datasets.zsre import parse_zsre

PARSERS = {"rome": parse_rome, "easyedit": parse_easyedit, "zsre": parse_zsre}


def detect_layout(raw) -> str:
    """``rome``, ``easyedit`` or ``zsre``."""
    found = layout_of(raw)
    if found:
        return found
    raise fail(raw.get("case_id", "?") if isinstance(raw, dict) else "?", "record",
               "is in no known layout (ROME CounterFact, EasyEdit CounterFact or MEND zsRE)")
