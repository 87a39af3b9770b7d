"""CounterFact in the EasyEdit/MEND layout (``prompt`` with the subject filled in), e.g.
../shared/data/counterfact/counterfact-train.json. The subject is found in the prompt to make
the "{}" template; the locality prompt becomes a neighbourhood prompt."""

from __future__ import annotations

from rlsedit_cli.datasets.base import EditDataset
from rlsedit_cli.datasets.records import (
    Record,
    fail,
    make_record,
    parse_all,
    read_json_records,
    subject_template,
)
from rlsedit_cli.errors import DataError


def parse_easyedit(raw: dict) -> Record:
    """CounterFact in the EasyEdit/MEND layout: prompt (subject filled in), ground_truth, ..."""
    if not isinstance(raw, dict):
        raise fail("?", "record", "is not a JSON object")
    case_id = raw.get("case_id", "?")
    truth = raw.get("ground_truth")
    neighbourhood = []
    if raw.get("locality_prompt") and raw.get("locality_ground_truth") == truth:
        neighbourhood = [raw["locality_prompt"]]
    return make_record(
        case_id, subject_template(raw.get("prompt"), raw.get("subject"), case_id),
        raw.get("subject"), raw.get("target_new"), truth,
        paraphrase_prompts=[raw["rephrase_prompt"]] if raw.get("rephrase_prompt") else [],
        neighborhood_prompts=neighbourhood,
    )


def load(path: str | None, name: str = "counterfact_easyedit", skip_invalid: bool = False,
         ) -> EditDataset:
    """Records of an EasyEdit-layout CounterFact file (no consistency references)."""
    if not path:
        raise DataError("dataset.path is not set: point it at an EasyEdit-layout JSON file")
    records, skipped = parse_all(read_json_records(path), parse_easyedit, skip_invalid,
                                 "easyedit")
    return EditDataset(name=name, records=records, skipped=skipped)
