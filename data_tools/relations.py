"""Varied facts for the learnable task on a pretrained model: eight relations, each stated in
three phrasings and asked in two, so a model trained on them learns to look a fact up in a long
context rather than one sentence template (``learnable_qa --relations varied``).

Subjects are common first names and each relation draws its values from its own pool of real
names (towns, companies, dogs' names, ships, trees for streets, football clubs; people for
teachers and spouses), every one assigned at random, so an answer never follows from the
question. No name is a substring of another name or of the sentences around it, so sub-EM
cannot be matched by a neighbour. Real names, not made-up syllable compounds: a small
pretrained model tells "Alice" from "Agnes" at the first token, while "Zuka" and "Zuos" share
theirs (docs/data.md, "The pretrained demo"). A long context mixes the evidence with
*same-relation* distractors (other subjects, the same relation, any phrasing: their values are
the rejected answers) and *other-relation* distractors (which also mention names), and
``build_triplets --distractor-pool builtin:wiki`` fills the rest with Wikipedia paragraphs.
"""

from __future__ import annotations

import random
from typing import NamedTuple


class Relation(NamedTuple):
    name: str
    values: str
    """The pool the objects are drawn from: a key of :data:`VALUES`, or ``"people"``."""
    facts: tuple
    """Sentences stating ``{s}``'s ``{o}``: one is drawn per paragraph."""
    questions: tuple
    """Questions about ``{s}`` whose answer is ``{o}``: one is drawn per example."""


RELATIONS = (
    Relation("birthplace", "town", ("The person {s} was born in the town of {o}.",
                            "{s} was born in {o}, a small town by the hills.",
                            "Parish records show that {s} was born in {o}."),
             ("Where was {s} born?", "In which town was {s} born?")),
    Relation("employer", "company", ("{s} works for a company called {o}.",
                          "The firm {o} has employed {s} for many years.",
                          "Since last spring, {s} has worked at {o}."),
             ("Which company does {s} work for?", "Who employs {s}?")),
    Relation("dog", "dog", ("{s} has a dog named {o}.",
                     "The dog that lives with {s} is called {o}.",
                     "Every morning {s} walks a dog called {o}."),
             ("What is the name of {s}'s dog?", "What is {s}'s dog called?")),
    Relation("teacher", "people", ("{s} studied music under a teacher named {o}.",
                         "The teacher of {s} was a musician called {o}.",
                         "As a child, {s} took lessons from {o}."),
             ("Who was {s}'s teacher?", "Under which teacher did {s} study?")),
    Relation("ship", "ship", ("{s} sails on a ship named {o}.",
                      "The ship {o} carries {s} across the northern sea.",
                      "{s} serves as a sailor aboard the {o}."),
             ("On which ship does {s} sail?", "What is the name of the ship {s} serves on?")),
    Relation("spouse", "people", ("{s} is married to {o}.",
                        "{o} and {s} were married in the spring.",
                        "The spouse of {s} is {o}."),
             ("Who is {s} married to?", "Who is the spouse of {s}?")),
    Relation("street", "street", ("{s} lives on {o} Street.",
                        "The house of {s} stands on {o} Street.",
                        "{s} rents a flat on {o} Street."),
             ("On which street does {s} live?", "What street is {s}'s home on?")),
    Relation("club", "club", ("{s} plays for the football club {o}.",
                      "The football club {o} signed {s} last year.",
                      "{s} is a player at the club {o}."),
             ("Which football club does {s} play for?", "For which club does {s} play?")),
)

#: Subjects, and the values of the person-valued relations: one token each for most tokenizers.
PEOPLE = tuple("""Alice Bob Carol David Emma Frank Grace Henry Jack Karen Maria Nathan Olivia Paul
Rachel Vincent Walter Agnes Chris Daniel Eric George Hannah Julia Kevin Laura Oscar Peter Steve
Adam Clara Edith Felix Hugo Ivan Jane Kate Lucy Mike Owen Ruth Sandra Helen Isaac Lisa Otto
Wendy Alan Beth Colin Ellen Gary Jill Kurt Norman Neil Seth Troy Simon Linda Martin Susan
Edward Nancy Patrick Diane Roger Monica Albert Sophie""".split())

#: The other relations' values, one pool each.
VALUES = {
    "town": tuple("""Milan London Berlin Madrid Vienna Dublin Oslo Prague Lisbon Athens Cairo
Tokyo Boston Denver Houston Austin Seattle Phoenix Chicago Toronto Sydney Lima Geneva Munich
Naples Venice Florence Zurich Hamburg Warsaw Budapest Moscow Delhi Mumbai Beijing Seoul Dallas
Miami Atlanta Detroit Oxford Bristol""".split()),
    "company": tuple("""Google Amazon Intel Nokia Sony Samsung Toyota Honda Tesla Boeing Siemens
Nike Adidas Oracle Netflix Microsoft Facebook Twitter Uber Dell Canon Nikon Philips Bosch Volvo
Lego Ikea Pepsi Disney Walmart Nestle Audi Fiat""".split()),
    "dog": tuple("""Rex Buddy Daisy Charlie Rocky Bella Lucky Molly Duke Bailey Toby Coco Rusty
Shadow Buster Ginger Pepper Milo Teddy Ruby Sadie Zeus Luna Rosie Penny""".split()),
    "ship": tuple("""Victoria Endeavour Discovery Aurora Liberty Voyager Horizon Neptune Atlas
Orion Titan Mercury Apollo Athena Enterprise Resolute Valiant Triumph Sovereign Pegasus Falcon
Eagle Albatross Nautilus Poseidon Olympia Odyssey""".split()),
    "street": tuple("""Oak Maple Elm Pine Cedar Willow Birch Aspen Hazel Laurel Juniper Magnolia
Poplar Sycamore Walnut Chestnut Cherry Spruce Cypress Acacia Linden Alder""".split()),
    "club": tuple("""Arsenal Chelsea Liverpool Barcelona Juventus Ajax Porto Benfica Celtic
Everton Napoli Lyon Monaco Bayern Dortmund Valencia Sevilla Rangers Fulham Roma Lazio Marseille
Villarreal Feyenoord Galatasaray""".split()),
}

_FILLERS = ("People in the area still talk about it.", "Few outside the region know this.",
            "It is mentioned in several local letters.", "")


def _fact(rng: random.Random, relation: Relation, subject: str, obj: str) -> dict:
    text = f"{rng.choice(relation.facts).format(s=subject, o=obj)} {rng.choice(_FILLERS)}"
    return {"title": subject, "paragraph_text": text.strip()}


def _draw(rng: random.Random, pool: list, count: int) -> list:
    """``count`` values from ``pool``, distinct while the pool lasts."""
    if count <= len(pool):
        return rng.sample(pool, count)
    return [*rng.sample(pool, len(pool)), *(rng.choice(pool) for _ in range(count - len(pool)))]


def make_varied_example(rng: random.Random, index: int, num_same: int, num_other: int) -> dict:
    """One MuSiQue-format row, one hop: the evidence states one relation of a subject; the
    question asks it in one of the relation's phrasings; ``num_same`` distractors state the same
    relation of other subjects (their values: ``decoy_answers``), ``num_other`` state other
    relations. The question's subject and answer occur in the evidence only; the other people
    are split into distractor subjects and person values, so no one is both."""
    relation = rng.choice(RELATIONS)
    people = list(PEOPLE)
    rng.shuffle(people)
    subject = people.pop()
    pools = {key: list(values) for key, values in VALUES.items()}
    pools["people"] = people[len(people) // 2:]
    subjects = people[:len(people) // 2]
    answer = rng.choice(pools[relation.values])
    pools[relation.values].remove(answer)
    paragraphs = [{**_fact(rng, relation, subject, answer), "is_supporting": True}]
    decoys: list = []
    for obj in _draw(rng, pools[relation.values], num_same):
        paragraphs.append({**_fact(rng, relation, rng.choice(subjects), obj),
                           "is_supporting": False})
        if obj not in decoys:
            decoys.append(obj)
    for _ in range(num_other):
        other = rng.choice([r for r in RELATIONS if r is not relation])
        paragraphs.append({**_fact(rng, other, rng.choice(subjects),
                                   rng.choice(pools[other.values])), "is_supporting": False})
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
