"""Evaluation items: one user message to answer, with its gold answers and where it sits.

Two sources, both from held-out ``data_tools.build_triplets`` rows:

* **triplets**: each row's ``prompt_short`` and ``prompt_long`` as they are;
* **grid** (NIAH-style): each row's short prompt, plus its evidence passages placed as one
  contiguous block at each requested *depth* of distractor text, for each requested total
  *length* of the user message in tokens (measured with the tokenizer, like build_triplets).
  Depth is the share of the distractor tokens that precede the evidence: 0 % puts the evidence
  first, 100 % last (just before the question). Distractors come from the same pools as
  ``data_tools`` (``builtin:wiki`` or a file); for one example and length the same haystack is
  used at every depth, so only the position changes. Pool passages that share a title with the
  evidence or contain a gold answer are not used. The evidence goes in at the sentence boundary
  nearest the requested depth.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

from data_tools.build_triplets import TokenCounter
from data_tools.common import (INSTRUCTION, PASSAGE_SEPARATOR, read_jsonl_strict,
                               render_prompt)
from data_tools.scoring import normalize_answer
from solopo_mcore.errors import UserError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TITLE = re.compile(r"^Title: (.+)$", re.MULTILINE)
TRIPLET_FIELDS = ("id", "question", "answers", "prompt_short", "prompt_long")
GRID_FIELDS = ("id", "question", "answers", "prompt_short", "evidence")


class EvalInputError(UserError, ValueError):
    """Unusable evaluation input; the message names the file, row or setting and the fix."""


@dataclass
class EvalItem:
    id: str
    """Unique within a run: ``<example>:short``, ``<example>:long`` or ``<example>:L<len>:d<depth>``."""
    example_id: str
    context: str
    """``short`` or ``long``."""
    prompt: str
    answers: list
    length_tokens: Optional[int] = None
    """Requested (grid) or built (triplets) user-message length; None for short items."""
    depth_percent: Optional[float] = None
    """Requested (grid) or built (triplets: first evidence passage) evidence depth."""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def read_heldout(path: str, fields, limit: Optional[int] = None) -> list[dict]:
    """Rows of a build_triplets JSONL; a bad row stops the run with its line number."""
    rows, seen = [], {}

    def not_json(line_number, exc):
        return EvalInputError(f"{path}:{line_number}: not valid JSON ({exc}); the input is the "
                              f"output of `python -m data_tools.build_triplets`")

    for line_number, row in read_jsonl_strict(path, not_json):
        missing = [k for k in fields if not isinstance(row, dict) or k not in row]
        if missing:
            raise EvalInputError(
                f"{path}:{line_number}: missing field(s) {', '.join(map(repr, missing))}; "
                f"the input is the output of `python -m data_tools.build_triplets`")
        answers = [a for a in row["answers"] if isinstance(a, str) and a.strip()] \
            if isinstance(row["answers"], list) else []
        if not answers:
            raise EvalInputError(f"{path}:{line_number}: 'answers' must be a non-empty list "
                                 f"of strings")
        row_id = str(row["id"])
        if row_id in seen:
            raise EvalInputError(f"{path}:{line_number}: id {row_id!r} already used on line "
                                 f"{seen[row_id]}; ids must be unique")
        seen[row_id] = line_number
        rows.append(dict(row, id=row_id, answers=answers))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise EvalInputError(f"{path}: no rows")
    return rows


def triplet_items(rows: list[dict]) -> list[EvalItem]:
    items = []
    for row in rows:
        meta = row.get("meta") or {}
        depths = meta.get("evidence_depths") or [None]
        items.append(EvalItem(f"{row['id']}:short", row["id"], "short", row["prompt_short"],
                              row["answers"]))
        items.append(EvalItem(
            f"{row['id']}:long", row["id"], "long", row["prompt_long"], row["answers"],
            length_tokens=meta.get("long_tokens"),
            depth_percent=None if depths[0] is None else round(100 * depths[0], 1)))
    return items


@functools.lru_cache(maxsize=None)
def _normalized(text: str) -> str:
    return normalize_answer(text)


def _haystack(evidence_titles: set, answers: list, budget: int, counter: TokenCounter,
              pool: list, rng: random.Random, max_misses: int = 64, max_scan: int = 2000
              ) -> list[tuple[str, int]]:
    """Random pool passages ``(text, tokens incl. separator)`` filling at most ``budget``:
    random draws until ``max_misses`` in a row do not fit, then the first passages that fit
    in a scan of up to ``max_scan`` passages from a random start."""
    from data_tools.common import render_passage

    golds = [g for g in (normalize_answer(a) for a in answers) if g]
    floor = counter.separator + 8

    def usable(index: int):
        title, text = pool[index]
        if title in evidence_titles or (golds and any(g in _normalized(text) for g in golds)):
            return None
        passage = render_passage(title, text)
        # the passage with its separator, counted together: a final '.' and the '\n\n' after
        # it are one token, so this is exactly what the passage adds to the joined prompt
        return passage, counter.count(passage + PASSAGE_SEPARATOR)

    chosen, misses, draws = [], 0, 0
    while budget >= floor and misses < max_misses and draws < 100 * max_misses + len(pool):
        draws += 1
        candidate = usable(rng.randrange(len(pool)))
        if candidate is None:
            continue
        if candidate[1] <= budget:
            chosen.append(candidate)
            budget -= candidate[1]
            misses = 0
        else:
            misses += 1
    start = rng.randrange(len(pool))
    for offset in range(min(len(pool), max_scan)):
        if budget < floor:
            break
        candidate = usable((start + offset) % len(pool))
        if candidate is not None and candidate[1] <= budget:
            chosen.append(candidate)
            budget -= candidate[1]
    return chosen


def _split_for_depth(haystack: list[tuple[str, int]], target: float, counter: TokenCounter
                     ) -> list[str]:
    """The haystack as documents with a ``None`` slot where the evidence goes: at the sentence
    boundary whose token offset is nearest ``target``."""
    docs = [p for p, _ in haystack]
    before = 0
    for i, (passage, cost) in enumerate(haystack):
        if before + cost <= target:
            before += cost
            continue
        # the target falls inside passage i (or its separator): candidate cut points
        title, _, body = passage.partition("\n") if passage.startswith("Title: ") else ("", "",
                                                                                         passage)
        sentences = _SENTENCE_END.split(body)
        best_k, best_gap = 0, abs(target - before)
        for k in range(1, len(sentences) + 1):
            head = (title + "\n" if title else "") + " ".join(sentences[:k])
            pos = before + counter.count(head + PASSAGE_SEPARATOR)
            if abs(target - pos) < best_gap:
                best_k, best_gap = k, abs(target - pos)
        if best_k == 0:
            return docs[:i] + [None] + docs[i:]
        if best_k == len(sentences):
            return docs[:i + 1] + [None] + docs[i + 1:]
        head = (title + "\n" if title else "") + " ".join(sentences[:best_k])
        tail = " ".join(sentences[best_k:])
        return docs[:i] + [head, None, tail] + docs[i + 1:]
    return docs + [None]


def place_evidence(row: dict, length_tokens: int, depth_percent: float, counter: TokenCounter,
                   haystack: list[tuple[str, int]]) -> tuple[str, dict]:
    """One grid prompt and its measured length / evidence depth (tokens)."""
    evidence = list(row["evidence"])
    total_distractor = sum(c for _, c in haystack)
    docs = _split_for_depth(haystack, depth_percent / 100 * total_distractor, counter)
    slot = docs.index(None)
    documents = docs[:slot] + evidence + docs[slot + 1:]
    instruction = row.get("instruction", INSTRUCTION)  # build_triplets --instruction
    prompt = render_prompt(documents, row["question"], instruction)
    while counter.count(prompt) > length_tokens and len(documents) > len(evidence):
        if slot + len(evidence) < len(documents):  # drop the distractor farthest from the
            documents.pop()                        # evidence (boundary merges)
        else:
            documents.pop(0)
            slot -= 1
        prompt = render_prompt(documents, row["question"], instruction)
    start = len(PASSAGE_SEPARATOR.join(documents[:slot] + [""])) if slot else 0
    end = len(PASSAGE_SEPARATOR.join(documents[:slot + len(evidence)] + [""]))
    context_end = len(PASSAGE_SEPARATOR.join(documents) + PASSAGE_SEPARATOR)
    tokens_before = counter.count(prompt[:start]) if start else 0
    tokens_after = counter.count(prompt[end:context_end]) if end < context_end else 0
    meta = {"measured_length_tokens": counter.count(prompt),
            "evidence_token_offset": tokens_before,
            "distractor_tokens": tokens_before + tokens_after,
            "measured_depth_percent": round(100 * tokens_before / max(1, tokens_before
                                                                      + tokens_after), 2)}
    return prompt, meta


def grid_items(rows: list[dict], tokenizer, lengths: list[int], depths: list[float],
               pool: list, seed: int = 0) -> list[EvalItem]:
    """Short items plus one long item per (example, length, depth); see the module doc."""
    if not pool:
        raise EvalInputError("the grid needs a distractor pool (--distractor-pool builtin:wiki "
                             "or a file)")
    for depth in depths:
        if not 0 <= depth <= 100:
            raise EvalInputError(f"depth {depth}: depths are percentages in [0, 100]")
    counter = TokenCounter(tokenizer)
    items = []
    for row in rows:
        items.append(EvalItem(f"{row['id']}:short", row["id"], "short", row["prompt_short"],
                              row["answers"]))
        short_tokens = counter.count(render_prompt(list(row["evidence"]), row["question"],
                                                   row.get("instruction", INSTRUCTION)))
        titles = set(_TITLE.findall("\n".join(row["evidence"])))
        for length in lengths:
            if length <= short_tokens + 16:
                raise EvalInputError(
                    f"example {row['id']!r}: its evidence and question take {short_tokens} "
                    f"tokens, more than the grid length {length}; use lengths above "
                    f"{short_tokens + 16} (--lengths) or leave this example out")
            rng = random.Random(f"{seed}:{row['id']}:{length}")
            budget = length - short_tokens - 2 * counter.separator - 2  # room for a split
            haystack = _haystack(titles, row["answers"], budget, counter, pool, rng)
            for depth in depths:
                prompt, meta = place_evidence(row, length, depth, counter, haystack)
                items.append(EvalItem(f"{row['id']}:L{length}:d{depth:g}", row["id"], "long",
                                      prompt, row["answers"], length_tokens=length,
                                      depth_percent=float(depth), meta=meta))
    return items
