"""zsRE in the MEND layout, read as the literature does (memit/dsets/zsre.py): the edit makes the
question's answer ``answers[0]``; the paraphrase is ``rephrase``; the neighborhood prompt is the
NQ question ``loc`` + "?" with its answer ``loc_ans``. Metrics are token-level top-1 accuracies
(eval/counterfact.py, ``protocol="accuracy"``). Records are numbered as they come
(e.g. ../shared/data/zsre/zsre_mend_train-1k.json)."""

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
    """One MEND-layout record: src, subject, answers, rephrase, loc, loc_ans.

    The file has no case ids; readers number the records (``case_id``) before parsing.
    """
    if not isinstance(raw, dict):
        raise fail("?", "record", "is not a JSON object")
    case_id = raw.get("case_id", "?")
    answers = raw.get("answers")
    if not isinstance(answers, list) or not answers:
        raise fail(case_id, "answers", "is missing or empty")
    loc, loc_ans = raw.get("loc"), raw.get("loc_ans")
    has_loc = isinstance(loc, str) and loc.strip() and isinstance(loc_ans, str) and loc_ans.strip()
    return make_record(
        case_id, subject_template(raw.get("src"), raw.get("subject"), case_id),
        raw.get("subject"), answers[0], None,
        paraphrase_prompts=[raw["rephrase"]] if raw.get("rephrase") else [],
        neighborhood_prompts=[loc + "?"] if has_loc else [],
        neighborhood_answers=(loc_ans,) if has_loc else (),
    )


def load(path: str | None, name: str = "zsre", skip_invalid: bool = False) -> EditDataset:
    """Records of a MEND-layout zsRE file; specificity and consistency are absent for zsRE."""
    if not path:
        raise DataError("dataset.path is not set: point it at a MEND-layout zsRE JSON file")
    raws = [{**raw, "case_id": i} if isinstance(raw, dict) else raw
            for i, raw in enumerate(read_json_records(path))]
    records, skipped = parse_all(raws, parse_zsre, skip_invalid, "zsre")
    return EditDataset(name=name, records=records, skipped=skipped, protocol="accuracy")
