"""Does the model know the tuning records' facts? The unedited model's efficacy, generalization
and specificity on them, and whether the records can tune an editor at all."""

from __future__ import annotations

from rlsedit_cli.errors import DataError
from rlsedit_cli.eval.counterfact import evaluate

PREFERS_NEW_LIMIT = 50.0  # % of records whose new object the unedited model already prefers


def knowledge(handle, records, measure_cfg, protocol: str) -> dict:
    """The unedited model's figures on ``records`` (editing metrics only, no generated text)."""
    figures = evaluate(handle, records, None, measure_cfg, texts=False, answers=False,
                       protocol=protocol)
    return {"records": len(records), **figures}


def check_usable(figures: dict, where: str) -> None:
    """Refuse records an edit cannot be measured on: the model already prefers the new object
    on half of them or more (nothing left to edit), or no record has neighbourhood prompts."""
    efficacy = figures.get("efficacy")
    if efficacy is not None and efficacy >= PREFERS_NEW_LIMIT:
        raise DataError(f"the unedited model already prefers target_new on {efficacy:.0f}% of "
                        f"the tuning records ({where}): an edit cannot be measured there; "
                        "choose other records (--offset) or a dataset of counterfactual edits")
    if figures.get("specificity") is None:
        raise DataError(f"the tuning records ({where}) have no neighbourhood prompts: "
                        "specificity cannot be measured; tune on CounterFact records")
