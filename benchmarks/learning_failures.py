"""What the wrong long-context answers of a bench_learning run are: a copy of another fact's
sentence (the evidence was not located: a same-relation distractor or another fact was quoted
instead), a copy of filler text, or not a copy of the context at all (a paraphrase, a made-up
or evasive answer).

    python benchmarks/learning_failures.py runs/bench_smollm2/smollm2-135m_long512_examples256

prints, per seed folder and model, the counts over the held-out long contexts. It reads the
folders that bench_learning wrote (data/heldout.jsonl, answers/NAME/results.jsonl); it runs no
model. A right answer (sub-EM) is counted as right whatever its form.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

KINDS = ("right", "copied another fact", "copied filler", "not a copy")


def classify(prediction: str, prompt_long: str) -> str:
    """The kind of a wrong answer: which paragraph of the long context it copies, if any.
    Fact paragraphs are the task's short ``Title: NAME`` passages; everything else is filler."""
    text = prediction.strip().rstrip(".")
    if not text:
        return "not a copy"
    for paragraph in prompt_long.split("\n\n"):
        if text in paragraph:
            is_fact = paragraph.startswith("Title:") and len(paragraph) < 400
            return "copied another fact" if is_fact else "copied filler"
    return "not a copy"


def count(seed_dir: Path, name: str) -> Counter:
    heldout = {}
    with open(seed_dir / "data" / "heldout.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            heldout[row["id"]] = row
    counts: Counter = Counter()
    with open(seed_dir / "answers" / name / "results.jsonl", encoding="utf-8") as f:
        for line in f:
            result = json.loads(line)
            if result["context"] != "long":
                continue
            counts["right" if result["score"] else
                   classify(result["prediction"], heldout[result["example_id"]]["prompt_long"])] += 1
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path,
                        help="a bench_learning (length, examples) folder holding seedN/ folders")
    args = parser.parse_args(argv)
    seeds = sorted(p for p in args.folder.glob("seed*") if (p / "answers").is_dir())
    if not seeds:
        raise SystemExit(f"learning_failures: {args.folder} holds no seedN/answers folders; give "
                         f"the folder bench_learning made for one length, e.g. "
                         f"runs/bench_smollm2/smollm2-135m_long512_examples256")
    print("| seed | model | " + " | ".join(KINDS) + " |")
    print("|" + "---|" * (2 + len(KINDS)))
    for seed_dir in seeds:
        for answers in sorted(p for p in (seed_dir / "answers").iterdir()
                              if (p / "results.jsonl").is_file()):
            counts = count(seed_dir, answers.name)
            print(f"| {seed_dir.name} | {answers.name} | "
                  + " | ".join(str(counts[k]) for k in KINDS) + " |")


if __name__ == "__main__":
    main()
