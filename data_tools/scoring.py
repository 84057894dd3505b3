"""sub-EM scoring with SQuAD-style normalisation, and the chosen/rejected selection policy."""

from __future__ import annotations

import random
import re
import string
from typing import Optional, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_EVASIVE = re.compile(r"\b(not (mentioned|given|stated|provided|specified)|do(es)? not say|"
                      r"do(es)? not (contain|mention|specify)|cannot be determined|unknown|"
                      r"no answer|i don'?t know)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def final_answer(response: str) -> str:
    """The text after the last 'Answer:' marker, or the whole response if there is none."""
    idx = response.lower().rfind("answer:")
    return response[idx + len("answer:"):].strip() if idx >= 0 else response.strip()


def sub_em(prediction: str, golds: Sequence[str]) -> bool:
    """True when some normalised gold answer occurs inside the normalised predicted answer."""
    pred = normalize_answer(final_answer(prediction))
    if not pred:
        return False
    return any((g := normalize_answer(gold)) and g in pred for gold in golds)


def is_evasive(response: str) -> bool:
    return bool(_EVASIVE.search(final_answer(response).lower()))


def select_pair(responses: Sequence[str], golds: Sequence[str], rng: random.Random
                ) -> tuple[Optional[int], Optional[int], list[bool], str]:
    """Pick (chosen, rejected) indices by the documented policy.

    * chosen: a response whose final answer is sub-EM correct; among several, a uniformly random
      one (seeded), so no length bias is introduced;
    * rejected: a sub-EM incorrect response, preferring wrong *non-evasive* answers (a broken
      reasoning chain), and an evasive one ("the passages do not say") only when no other is left;
    * no pair: returns reason ``all_correct`` or ``none_correct`` (counted by the caller).
    """
    scores = [sub_em(r, golds) for r in responses]
    correct = [i for i, ok in enumerate(scores) if ok]
    wrong = [i for i, ok in enumerate(scores) if not ok]
    if not correct:
        return None, None, scores, "none_correct"
    if not wrong:
        return None, None, scores, "all_correct"
    substantive = [i for i in wrong if not is_evasive(responses[i])]
    chosen = rng.choice(correct)
    rejected = rng.choice(substantive or wrong)
    return chosen, rejected, scores, "ok"
