"""Edit records: one validated form for every dataset layout, and the file readers.

A :class:`Record` is CounterFact's requested rewrite plus its prompt families. Parsers turn raw
records of a layout into Records and raise :class:`DataError` naming the case_id and field.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from rlsedit_cli.errors import DataError


@dataclass(frozen=True)
class Record:
    """One edit request with the prompts used to measure it."""

    case_id: int | str
    prompt: str  # with "{}" where the subject goes
    subject: str
    target_new: str
    target_true: str
    relation_id: str | None = None
    target_new_id: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    neighborhood_answers: tuple[str, ...] = ()  # zsRE: the answer of each neighborhood prompt

    @property
    def rewrite_prompt(self) -> str:
        return fill(self.prompt, self.subject)


def fill(template: str, value: str) -> str:
    """``template`` with ``value`` in place of its first "{}"; every other character, braces
    included, is text (a prompt is data: ``str.format`` would read "{x}" as a field)."""
    head, mark, tail = template.partition("{}")
    if not mark:
        raise ValueError(f"{template!r} has no '{{}}' placeholder")
    return head + value + tail


def fail(case_id, field: str, problem: str) -> DataError:
    return DataError(
        f"record case_id={case_id}: {field} {problem}; fix the record or set "
        "dataset.skip_invalid=true to skip it"
    )


def _text(value, case_id, field: str) -> str:
    if value is not None and not isinstance(value, str):
        raise fail(case_id, field, f"is not a string ({value!r})")
    if value is None or not value.strip():
        raise fail(case_id, field, "is missing or empty")
    return value


def _texts(value, case_id, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(case_id, field, "is not a list of strings")
    return tuple(value)


def make_record(case_id, prompt, subject, target_new, target_true, **families) -> Record:
    """Validate the fields shared by every layout and build the Record (``target_true`` None:
    a layout measured by token accuracy, zsRE, which has none)."""
    prompt = _text(prompt, case_id, "prompt")
    subject = _text(subject, case_id, "subject")
    new = _text(target_new, case_id, "target_new")
    true = "" if target_true is None else _text(target_true, case_id, "target_true")
    if prompt.count("{}") != 1:
        raise fail(case_id, "prompt", f"must hold exactly one '{{}}' for the subject: {prompt!r}")
    if new.strip() == true.strip():
        raise fail(case_id, "target_new", f"equals target_true ({new!r})")
    fields = {k: _texts(v, case_id, k) for k, v in families.items() if k.endswith("_prompts")}
    extra = {k: v for k, v in families.items() if not k.endswith("_prompts")}
    return Record(case_id=case_id, prompt=prompt, subject=subject, target_new=new.strip(),
                  target_true=true.strip(), **extra, **fields)


def subject_template(prompt, subject, case_id) -> str:
    """Turn a prompt with the subject filled in into a "{}" template (first occurrence)."""
    if not isinstance(prompt, str) or not isinstance(subject, str) or not subject.strip():
        raise fail(case_id, "prompt/subject", "is missing or empty")
    if "{}" in prompt and subject not in prompt:  # already a template
        return prompt
    at = prompt.find(subject)
    if at < 0:  # fall back to a case-insensitive match
        m = re.search(re.escape(subject), prompt, flags=re.IGNORECASE)
        if m is None:
            raise fail(case_id, "subject", f"{subject!r} does not occur in prompt {prompt!r}")
        at = m.start()
    return prompt[:at] + "{}" + prompt[at + len(subject) :]


def parse_rome(raw: dict) -> Record:
    """A record in ROME's CounterFact layout (requested_rewrite with a "{}" prompt)."""
    case_id = raw.get("case_id", "?") if isinstance(raw, dict) else "?"
    rw = raw.get("requested_rewrite") if isinstance(raw, dict) else None
    if not isinstance(rw, dict):
        raise fail(case_id, "requested_rewrite", "is missing")
    new, true = rw.get("target_new"), rw.get("target_true")
    if not isinstance(new, dict) or not isinstance(true, dict):
        raise fail(case_id, "requested_rewrite.target_new/target_true", "must be {str, id} objects")
    return make_record(
        case_id, rw.get("prompt"), rw.get("subject"), new.get("str"), true.get("str"),
        relation_id=rw.get("relation_id"), target_new_id=new.get("id"),
        paraphrase_prompts=raw.get("paraphrase_prompts"),
        neighborhood_prompts=raw.get("neighborhood_prompts"),
        attribute_prompts=raw.get("attribute_prompts"),
        generation_prompts=raw.get("generation_prompts"),
    )


def read_json_records(path: str | Path) -> list:
    """Read a JSON list or JSON-lines file (optionally gzipped)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"dataset.path={path} is a folder: set it to the records file inside it")
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist: set dataset.path to a records file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:  # a byte-order mark is no data
            text = f.read()
        if ".jsonl" in path.name:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(f"dataset file {path} is not valid JSON ({e}): fix or replace it") from e
    if not isinstance(data, list):
        raise DataError(f"dataset file {path} must hold a JSON list of records")
    return data


LAYOUTS = {  # layout -> (keys that mark a raw record of it, the dataset config that reads it)
    "rome": (("requested_rewrite",), "counterfact"),
    "easyedit": (("ground_truth", "target_new"), "counterfact_easyedit"),
    "zsre": (("src", "alt"), "zsre"),
}


def layout_of(raw) -> str | None:
    """``rome``, ``easyedit``, ``zsre`` or None (no known layout)."""
    if isinstance(raw, dict):
        for name, (keys, _) in LAYOUTS.items():
            if all(k in raw for k in keys):
                return name
    return None


def parse_all(raws: Iterable, parse: Callable[[dict], Record], skip_invalid: bool,
              layout: str | None = None) -> tuple[list[Record], list[str]]:
    """Parse every raw record; with ``skip_invalid`` collect the errors instead of raising.

    ``layout``: the layout ``parse`` reads; a file whose first record is in another known layout
    is refused at once, naming the dataset config that reads it.
    """
    raws = list(raws)
    found = layout_of(raws[0]) if raws else None
    if layout and found and found != layout:
        raise DataError(f"the dataset file holds {found}-layout records, not {layout}: use "
                        f"dataset={LAYOUTS[found][1]}")
    records, skipped = [], []
    for raw in raws:
        try:
            records.append(parse(raw))
        except DataError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
    return records, skipped
