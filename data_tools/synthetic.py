"""Synthetic multi-hop QA in MuSiQue's released format, for the offline demo and tests.

Facts about fictional entities are chained over 2-4 hops (person -> birth town -> province ->
capital -> founder); the question composes the hops, the gold answer is the last entity. Each
example carries its supporting paragraphs (one per hop, ``is_supporting: true``) and hard
non-supporting paragraphs: the same relations about other entities. ``question_decomposition``
holds each hop's sub-question and answer, as MuSiQue does.

    python -m data_tools.synthetic --num-examples 200 --out data/musique_synthetic.jsonl
"""

from __future__ import annotations

import argparse
import json
import random

from data_tools.common import atomic_output, progress
from solopo_mcore.errors import entry_point

_SYLLABLES = ["ka", "lo", "mer", "vin", "ta", "sol", "dra", "bel", "nor", "thi", "qua", "ren",
              "zu", "mal", "cor", "vex", "ari", "pel", "dun", "ish", "gor", "yel", "fen", "os"]

# (relation sentence, sub-question, compositional clause); {s} subject, {o} object.
_HOPS = [
    ("{s} was born in the town of {o}.", "Where was {s} born?",
     "the town where {s} was born"),
    ("The town of {s} lies in the province of {o}.", "In which province does {s} lie?",
     "the province in which {s} lies"),
    ("The capital of the province of {s} is the city of {o}.",
     "What is the capital of the province of {s}?", "the capital of {s}"),
    ("The city of {s} was founded by {o}.", "Who founded {s}?", "the founder of {s}"),
]
_FILLER = [
    "It is known for its markets and a long tradition of river trade.",
    "Local records describe mild winters and a busy harvest season.",
    "Travellers often mention its old stone bridges and narrow streets.",
    "The area has been settled for several centuries.",
    "Its archives were catalogued by a small team of historians.",
]
_QUESTION_HEADS = ["", "Where was {x} born?", "In which province lies {x}?",
                   "What is the capital of {x}?", "Who founded {x}?"]


def _name(rng: random.Random, used: set) -> str:
    while True:
        n = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if n not in used:
            used.add(n)
            return n


def _chain(rng, used, num_hops):
    entities = [_name(rng, used) + " " + _name(rng, used)]  # a person's full name
    for _ in range(num_hops):
        entities.append(_name(rng, used) + (" " + _name(rng, used) if len(entities) == 4 else ""))
    return entities


def _paragraph(rng, hop, subject, obj):
    sentence = _HOPS[hop][0].format(s=subject, o=obj)
    return {"title": subject, "paragraph_text": f"{sentence} {rng.choice(_FILLER)}"}


def make_example(rng: random.Random, index: int, num_hops: int, num_distractors: int) -> dict:
    used: set = set()
    entities = _chain(rng, used, num_hops)
    paragraphs, decomposition = [], []
    for hop in range(num_hops):
        paragraphs.append({**_paragraph(rng, hop, entities[hop], entities[hop + 1]),
                           "is_supporting": True})
        decomposition.append({"id": index * 10 + hop,
                              "question": _HOPS[hop][1].format(s=entities[hop] if hop == 0
                                                               else f"#{hop}"),
                              "answer": entities[hop + 1],
                              "paragraph_support_idx": hop})
    for _ in range(num_distractors):  # same relations about other entities: hard distractors
        hop = rng.randrange(num_hops)
        fake = _chain(rng, used, num_hops)
        paragraphs.append({**_paragraph(rng, hop, fake[hop], fake[hop + 1]),
                           "is_supporting": False})
    order = list(range(len(paragraphs)))
    rng.shuffle(order)
    shuffled = []
    for new_idx, old in enumerate(order):
        shuffled.append({"idx": new_idx, **paragraphs[old]})
    for step in decomposition:
        step["paragraph_support_idx"] = order.index(step["paragraph_support_idx"])
    clause = entities[0]
    for hop in range(num_hops - 1):
        clause = _HOPS[hop][2].format(s=clause)
    question = _QUESTION_HEADS[num_hops].format(x=clause)
    return {
        "id": f"synthetic_{num_hops}hop_{index:06d}",
        "paragraphs": shuffled,
        "question": question,
        "question_decomposition": decomposition,
        "answer": entities[-1],
        "answer_aliases": [entities[-1].split(" ")[0]] if " " in entities[-1] else [],
        "answerable": True,
    }


def generate(num_examples: int, seed: int, min_hops: int = 2, max_hops: int = 4,
             num_distractors: int = 6) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(rng, i, rng.randint(min_hops, max_hops), num_distractors)
            for i in range(num_examples)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-examples", type=int, default=200,
                        help="examples to generate (default: 200)")
    parser.add_argument("--out", required=True, help="output JSONL (MuSiQue format)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--min-hops", type=int, default=2, help="fewest reasoning hops")
    parser.add_argument("--max-hops", type=int, default=4, help="most reasoning hops")
    parser.add_argument("--num-distractors", type=int, default=6,
                        help="non-supporting paragraphs per example")
    args = parser.parse_args(argv)
    rows = generate(args.num_examples, args.seed, args.min_hops, args.max_hops,
                    args.num_distractors)
    with atomic_output(args.out) as f:
        for row in progress(rows, desc="writing"):
            f.write(json.dumps(row) + "\n")
    print(f"synthetic: wrote {len(rows)} MuSiQue-format examples to {args.out}")


if __name__ == "__main__":
    with entry_point("synthetic"):
        main()
