"""zsRE in the MEND layout (``src`` question, ``alt`` new answer, ``pred``/``answers`` true),
e.g. ../shared/data/zsre/zsre_mend_train-1k.json. Records are numbered as they come."""

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


def parse_zsre(raw: dict) -> Record:
    """zsRE in the MEND layout: src question, pred/answers (true), alt (new), rephrase.

    The file has no case ids; readers number the records (``case_id``) before parsing.
    """
    if not isinstance(raw, dict):
        raise fail("?", "record", "is not a JSON object")
    case_id = raw.get("case_id", "?")
    truth = raw.get("pred") or (raw.get("answers") or [None])[0]
    return make_record(
        case_id, subject_template(raw.get("src"), raw.get("subject"), case_id),
        raw.get("subject"), raw.get("alt"), truth,
        paraphrase_prompts=[raw["rephrase"]] if raw.get("rephrase") else [],
    )


def load(path: str | None, name: str = "zsre", skip_invalid: bool = False) -> EditDataset:
    """Records of a MEND-layout zsRE file; specificity and consistency are absent for zsRE."""
    if not path:
        raise DataError("dataset.path is not set: point it at a MEND-layout zsRE JSON file")
    raws = [{**raw, "case_id": i} if isinstance(raw, dict) else raw
            for i, raw in enumerate(read_json_records(path))]
    records, skipped = parse_all(raws, parse_zsre, skip_invalid, "zsre")
    return EditDataset(name=name, records=records, skipped=skipped)
