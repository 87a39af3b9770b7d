"""The shipped English text: wikitext-2's raw test split cut into two halves of whole articles.

Articles 0, 2, 4, ... become ``anchor.txt.gz`` (one detokenised paragraph per line, headings
dropped): ordinary text for the anchor statistics of real models, offline. Articles 1, 3, 5, ...
become ``heldout.jsonl.gz`` (``{"page": raw article}``, the layout of lm-eval's
wikitext_document_level dataset): text the statistics never saw, for perplexity. The files in
``rlsedit_cli/assets/english/`` were written by :func:`write_english` from ``wiki.test.raw``.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

TITLE = re.compile(r"^ = [^=].* = $")  # " = Title = "; sections are " = = Section = = "


def articles(raw: str) -> list[str]:
    """The raw pages of a wikitext file, each from its title line on, lines ending in "\\n"."""
    pages: list[list[str]] = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        if TITLE.match(line):
            pages.append([])
        if pages and line.strip():
            pages[-1].append(line + "\n")
    return ["".join(p) for p in pages]


def detokenize(page: str) -> str:
    """lm-eval's wikitext detokeniser (" @-@ " -> "-", " , " -> ", ", ...)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return wikitext_detokenizer({"page": page})


def paragraphs(page: str) -> list[str]:
    """The detokenised paragraphs of a page, headings dropped."""
    return [ln.strip() for ln in detokenize(page).split("\n")
            if ln.strip() and not ln.strip().startswith("=")]


def _write_gz(path: Path, text: str) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(text.encode("utf-8"))  # mtime 0: the same bytes on every build


def write_english(raw_path: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Write anchor.txt.gz and heldout.jsonl.gz from wikitext-2's ``wiki.test.raw``."""
    pages = articles(Path(raw_path).read_text(encoding="utf-8"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    anchor = [p for page in pages[0::2] for p in paragraphs(page)]
    _write_gz(out / "anchor.txt.gz", "".join(p + "\n" for p in anchor))
    _write_gz(out / "heldout.jsonl.gz",
              "".join(json.dumps({"page": page}) + "\n" for page in pages[1::2]))
    return {"articles": len(pages), "anchor_paragraphs": len(anchor),
            "heldout_pages": len(pages[1::2])}
