"""Varied facts for the learnable task on a pretrained model: eight relations, each stated in
three phrasings and asked in two, so a model trained on them learns to look a fact up in a long
context rather than one sentence template (``learnable_qa --relations varied``).

Every object is one of the task's made-up names, so an answer never follows from the question
and sub-EM scoring cannot be matched by a common word. A long context mixes the evidence with
*same-relation* distractors (other subjects, the same relation, any phrasing: their values are
the rejected answers) and *other-relation* distractors (which also mention names), and
``build_triplets --distractor-pool builtin:wiki`` fills the rest with Wikipedia paragraphs.
"""

from __future__ import annotations

import random
from typing import NamedTuple


class Relation(NamedTuple):
    name: str
    facts: tuple
    """Sentences stating ``{s}``'s ``{o}``: one is drawn per paragraph."""
    questions: tuple
    """Questions about ``{s}`` whose answer is ``{o}``: one is drawn per example."""


RELATIONS = (
    Relation("birthplace", ("The person {s} was born in the town of {o}.",
                            "{s} was born in {o}, a small town by the hills.",
                            "Parish records show that {s} was born in {o}."),
             ("Where was {s} born?", "In which town was {s} born?")),
    Relation("employer", ("{s} works for a company called {o}.",
                          "The firm {o} has employed {s} for many years.",
                          "Since last spring, {s} has worked at {o}."),
             ("Which company does {s} work for?", "Who employs {s}?")),
    Relation("dog", ("{s} has a dog named {o}.",
                     "The dog that lives with {s} is called {o}.",
                     "Every morning {s} walks a dog called {o}."),
             ("What is the name of {s}'s dog?", "What is {s}'s dog called?")),
    Relation("teacher", ("{s} studied music under a teacher named {o}.",
                         "The teacher of {s} was a musician called {o}.",
                         "As a child, {s} took lessons from {o}."),
             ("Who was {s}'s teacher?", "Under which teacher did {s} study?")),
    Relation("ship", ("{s} sails on a ship named {o}.",
                      "The ship {o} carries {s} across the northern sea.",
                      "{s} serves as a sailor aboard the {o}."),
             ("On which ship does {s} sail?", "What is the name of the ship {s} serves on?")),
    Relation("spouse", ("{s} is married to {o}.",
                        "{o} and {s} were married in the spring.",
                        "The spouse of {s} is {o}."),
             ("Who is {s} married to?", "Who is the spouse of {s}?")),
    Relation("street", ("{s} lives on {o} Street.",
                        "The house of {s} stands on {o} Street.",
                        "{s} rents a flat on {o} Street."),
             ("On which street does {s} live?", "What street is {s}'s home on?")),
    Relation("club", ("{s} plays for the football club {o}.",
                      "The football club {o} signed {s} last year.",
                      "{s} is a player at the club {o}."),
             ("Which football club does {s} play for?", "For which club does {s} play?")),
)

_FILLERS = ("People in the area still talk about it.", "Few outside the region know this.",
            "It is mentioned in several local letters.", "")


def _fact(rng: random.Random, relation: Relation, subject: str, obj: str) -> dict:
    text = f"{rng.choice(relation.facts).format(s=subject, o=obj)} {rng.choice(_FILLERS)}"
    return {"title": subject, "paragraph_text": text.strip()}


def make_varied_example(rng: random.Random, index: int, names: list, num_same: int,
                        num_other: int) -> dict:
    """One MuSiQue-format row, one hop: the evidence states one relation of a subject; the
    question asks it in one of the relation's phrasings; ``num_same`` distractors state the same
    relation of other subjects (their values: ``decoy_answers``), ``num_other`` state other
    relations. Subjects and values of the distractors are disjoint sets of names, apart from
    the evidence's own two."""
    relation = rng.choice(RELATIONS)
    subject, answer = rng.sample(names, 2)
    others = [n for n in names if n not in (subject, answer)]
    rng.shuffle(others)
    subjects, values = others[:len(others) // 2], others[len(others) // 2:]
    paragraphs = [{**_fact(rng, relation, subject, answer), "is_supporting": True}]
    decoys: list = []
    for _ in range(num_same):
        obj = rng.choice(values)
        paragraphs.append({**_fact(rng, relation, rng.choice(subjects), obj),
                           "is_supporting": False})
        if obj not in decoys:
            decoys.append(obj)
    for _ in range(num_other):
        other = rng.choice([r for r in RELATIONS if r is not relation])
        paragraphs.append({**_fact(rng, other, rng.choice(subjects), rng.choice(values)),
                           "is_supporting": False})
    order = list(range(len(paragraphs)))
    rng.shuffle(order)
    question = rng.choice(relation.questions).format(s=subject)
    return {"id": f"varied_{relation.name}_{index:06d}",
            "paragraphs": [{"idx": new, **paragraphs[old]} for new, old in enumerate(order)],
            "question": question,
            "question_decomposition": [{"id": index * 10, "question": question,
                                        "answer": answer, "paragraph_support_idx": order.index(0),
                                        "decoy_answers": decoys}],
            "answer": answer, "answer_aliases": [], "answerable": True,
            "relation": relation.name}
