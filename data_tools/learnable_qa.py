"""A long-context QA task that a tiny model learns from scratch on CPU, in MuSiQue's format.

Every example states a chain of facts about fictional entities (``The person Kalo was born in
the town of Merta.``); the question asks for the end of the chain; the long context hides those
evidence paragraphs among *hard* distractors: the same relations about other entities, with the
same sentence shapes and the same names. Rows go through the real pipeline unchanged::

    python -m data_tools.learnable_qa --num-examples 640 --out qa.jsonl
    python -m data_tools.build_triplets --input qa.jsonl --output triplets.jsonl \\
        --tokenizer builtin:qa-words --target-long-tokens 1024 --distractor-pool none
    python -m data_tools.sample_pairs --backend rule --input triplets.jsonl --output pairs.jsonl
    python -m data_tools.preprocess --input pairs.jsonl --output-prefix qa \\
        --tokenizer builtin:qa-words --max-seq-length 1536 --model-config MODEL_DIR

Why it is shaped this way (docs/data.md, "The learnable task", has the measurements):

* **One word, one token.** Names are single made-up words and ``builtin:qa-words`` is a word-level
  tokenizer over exactly this task's words (:func:`vocabulary_words`, 629 entries), so an
  answer is one token to copy and a tiny model spends no steps learning sub-word spelling. The
  real Qwen2.5 vocabulary path is tested elsewhere on the other synthetic generator.
* **One hop by default.** Answering is a lookup: find the sentence whose subject is the
  question's entity, copy its object. A 2-layer model learns that in a few hundred steps; each
  further hop needs the previous one right and roughly doubles the steps (``--hops`` up to 3).
* **Nothing to guess from the question.** Every example draws its entities uniformly from
  :data:`NAMES` (256), independently of each other, so no question says anything about its
  answer: a question-only predictor is at chance (1/256 for the answer, 0.5 between chosen and
  rejected). :func:`question_only_baseline` measures that on any split of rows.
* **Plausible wrong answers.** Each decomposition step carries ``decoy_answers``: the objects of
  the distractor paragraphs with the *same* relation. ``sample_pairs --backend rule`` uses them
  for the rejected answer, so chosen and rejected differ only in which same-relation value was
  copied: on the long context, telling them apart needs the subject bound to its value.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
from typing import Iterable, Sequence

from data_tools.common import atomic_output, progress
from solopo_mcore.errors import entry_point

_SYLLABLES = ["ka", "lo", "mer", "vin", "ta", "sol", "dra", "bel", "nor", "thi", "qua", "ren",
              "zu", "mal", "cor", "vex", "ari", "pel", "dun", "ish", "gor", "yel", "fen", "os"]


def _make_names(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names: set = set()
    while len(names) < count:
        names.add((rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES)).capitalize())
    return sorted(names)


#: The entity names: single made-up words, one token each in ``builtin:qa-words``.
NAMES = _make_names(256)

#: Hop h: (fact sentence, sub-question, clause that composes it into a multi-hop question).
#: Sentences never start with a name, so a name is always the same token (" Name").
HOPS = [
    ("The person {s} was born in the town of {o}.", "Where was {s} born?",
     "the town where {s} was born"),
    ("The town of {s} lies in the province of {o}.", "In which province does {s} lie?",
     "the province in which {s} lies"),
    ("The province of {s} has its capital in the city of {o}.",
     "What is the capital of the province of {s}?", "the capital of {s}"),
]
_QUESTION_HEADS = ["", "", "In which province does {x} lie?", "What is the capital of {x}?"]
_FILLER = [
    "It is known for its markets and its river trade.",
    "Local records describe mild winters and a busy harvest.",
    "Travellers often mention its old stone bridges.",
    "The area has been settled for several centuries.",
]
MAX_HOPS = len(HOPS)


def _paragraph(rng: random.Random, hop: int, subject: str, obj: str) -> dict:
    text = f"{HOPS[hop][0].format(s=subject, o=obj)} {rng.choice(_FILLER)}"
    return {"title": subject, "paragraph_text": text}


def _question(entities: Sequence[str], num_hops: int) -> str:
    if num_hops == 1:
        return HOPS[0][1].format(s=entities[0])
    clause = entities[0]
    for hop in range(num_hops - 1):
        clause = HOPS[hop][2].format(s=clause)
    return _QUESTION_HEADS[num_hops].format(x=clause)


def make_example(rng: random.Random, index: int, num_hops: int, num_distractors: int) -> dict:
    """One MuSiQue-format row: ``num_hops`` supporting paragraphs, ``num_distractors`` hard
    non-supporting ones (relations of the chain's hops, about entities not in the chain), and
    per-hop ``decoy_answers`` (the same-relation values of those distractors). A name is either
    a distractor subject or a distractor value within one example, never both, so wherever a
    decoy occurs in the long context it is a value."""
    if not 1 <= num_hops <= MAX_HOPS:
        raise ValueError(f"num_hops must be in 1..{MAX_HOPS}, got {num_hops}")
    entities = rng.sample(NAMES, num_hops + 1)
    others = [n for n in NAMES if n not in entities]
    rng.shuffle(others)  # this example's distractor subjects and values: disjoint halves, so a
    subjects, values = others[:len(others) // 2], others[len(others) // 2:]  # decoy is a value
    paragraphs = [{**_paragraph(rng, hop, entities[hop], entities[hop + 1]),
                   "is_supporting": True} for hop in range(num_hops)]
    decoys: list[list[str]] = [[] for _ in range(num_hops)]
    for _ in range(num_distractors):
        hop = rng.randrange(num_hops)
        subject, obj = rng.choice(subjects), rng.choice(values)
        paragraphs.append({**_paragraph(rng, hop, subject, obj), "is_supporting": False})
        if obj not in decoys[hop]:
            decoys[hop].append(obj)
    order = list(range(len(paragraphs)))
    rng.shuffle(order)
    shuffled = [{"idx": new, **paragraphs[old]} for new, old in enumerate(order)]
    decomposition = [{"id": index * 10 + hop,
                      "question": HOPS[hop][1].format(s=entities[0] if hop == 0 else f"#{hop}"),
                      "answer": entities[hop + 1],
                      "paragraph_support_idx": order.index(hop),
                      "decoy_answers": decoys[hop]}
                     for hop in range(num_hops)]
    return {"id": f"learnable_{num_hops}hop_{index:06d}", "paragraphs": shuffled,
            "question": _question(entities, num_hops),
            "question_decomposition": decomposition, "answer": entities[-1],
            "answer_aliases": [], "answerable": True}


def distractors_for(long_tokens: int) -> int:
    """Distractor paragraphs to generate for a long context of ``long_tokens``: each is about
    26 ``qa-words`` tokens; build_triplets takes what fits and leaves the rest."""
    return long_tokens // 22 + 8


def generate(num_examples: int, seed: int, num_hops: int = 1,
             num_distractors: int = distractors_for(1024), relations: str = "born",
             num_same_relation: int | None = None) -> list[dict]:
    """``relations="born"``: the from-scratch task above. ``"varied"``: one-hop facts over eight
    relations and their phrasings (:mod:`data_tools.relations`), ``num_same_relation`` of the
    ``num_distractors`` stating the question's relation (default: half)."""
    rng = random.Random(seed)
    if relations == "varied":
        from data_tools.relations import make_varied_example
        same = num_distractors // 2 if num_same_relation is None else num_same_relation
        return [make_varied_example(rng, i, same, num_distractors - same)
                for i in range(num_examples)]
    return [make_example(rng, i, num_hops, num_distractors) for i in range(num_examples)]


# --------------------------------------------------------------------------- tokenizer words
def vocabulary_words() -> list[str]:
    """Texts holding every word the task, the prompt format, the rule answers and the chat
    template produce, each in the context it appears in (a word after a space is another
    byte-level piece than the same word at a line start): the corpus that the
    ``builtin:qa-words`` vocabulary is cut from (:mod:`data_tools.tokenizer`). Deterministic."""
    from data_tools.common import render_passage, render_prompt

    rng = random.Random(0)
    texts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
             "<|im_end|>\n<|im_start|>assistant\n",
             "The passages do not say enough to answer this question.\nAnswer: not mentioned"]
    for num_hops in range(1, MAX_HOPS + 1):
        row = make_example(rng, 0, num_hops, 4)
        passages = [render_passage(p["title"], p["paragraph_text"]) for p in row["paragraphs"]]
        texts.append(render_prompt(passages, row["question"]))
        steps = [f"Step {i}: {s['question'].replace(f'#{i - 1}', 'X')} {s['answer']}."
                 for i, s in enumerate(row["question_decomposition"], 1)]
        texts.append("\n".join(steps + [f"Answer: {row['answer']}"]))
    texts += [f"Step {i}:" for i in range(10)]
    texts += [f"x. {sentence}" for sentence in _FILLER]
    texts += [f"{name}\n {name}" for name in NAMES]
    return texts


# --------------------------------------------------------------------------- the leak check
def _answer_of(row: dict) -> str:
    answers = row.get("answers") or [row.get("answer")]
    return answers[0]


def _final_answer_of(response: str) -> str:
    from data_tools.scoring import final_answer
    return final_answer(response)


def question_only_baseline(train_rows: Iterable[dict], heldout_rows: Iterable[dict],
                           seed: int = 0) -> dict:
    """The best a model that sees only the question can do, estimated from ``train_rows``.

    For each held-out question it predicts the answer most often seen in training after the same
    question (else after any question: the answers' overall frequency), and prefers the chosen
    over the rejected answer when the chosen was seen more often as a training answer (ties: a
    seeded coin). Rows are ``sample_pairs`` output (or any rows with ``question`` and
    ``answers``). On this task both stay at chance; a generator whose answers follow from the
    question (say, from the subject's name) would show here at once.

    Returns ``{"answer_accuracy", "pairwise_accuracy", "num_heldout", "chance_answer"}``."""
    by_question: dict = collections.defaultdict(collections.Counter)
    overall: collections.Counter = collections.Counter()
    for row in train_rows:
        answer = _answer_of(row)
        by_question[row["question"]][answer] += 1
        overall[answer] += 1
    rng = random.Random(seed)
    num, correct, pair_correct, num_pairs = 0, 0, 0.0, 0
    fallback = overall.most_common(1)[0][0] if overall else ""
    for row in heldout_rows:
        seen = by_question.get(row["question"])
        guess = seen.most_common(1)[0][0] if seen else fallback
        correct += int(guess in row.get("answers", [row.get("answer")]))
        num += 1
        if "chosen" in row and "rejected" in row:
            w = overall[_final_answer_of(row["chosen"])]
            lo = overall[_final_answer_of(row["rejected"])]
            pair_correct += 1.0 if w > lo else 0.0 if w < lo else float(rng.random() < 0.5)
            num_pairs += 1
    return {"answer_accuracy": correct / max(num, 1),
            "pairwise_accuracy": pair_correct / num_pairs if num_pairs else float("nan"),
            "num_heldout": num, "chance_answer": 1.0 / len(NAMES)}


#: A model the task is learnable for on 2 CPU cores: 2 layers (the fewest that can compose a
#: lookup), heads divisible by TP=2. Passed as ``build_tiny_hf_model(overrides=...)``.
TINY_MODEL_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
TOKENIZER = "builtin:qa-words"


def pipeline_commands(python: str, out_dir, num_examples: int, long_tokens: int, seed: int = 0,
                      model_seed: int = 0) -> list[list[str]]:
    """The commands that turn this task into a training run's inputs, as a user types them:
    generate -> build_triplets -> sample_pairs (rule) -> a tiny HF model -> preprocess ->
    hf-to-mcore (verified). Outputs under ``out_dir``: ``data/{qa,triplets,pairs}.jsonl``,
    ``data/qa.{bin,idx,meta.json}``, ``model/hf_init``, ``model/mcore_init``."""
    from pathlib import Path

    data, model = Path(out_dir) / "data", Path(out_dir) / "model"
    build_model = (f"from solopo_mcore.models.tiny import build_tiny_hf_model; "
                   f"from data_tools.tokenizer import load_tokenizer; "
                   f"t = load_tokenizer({TOKENIZER!r}); "
                   f"build_tiny_hf_model({str(model / 'hf_init')!r}, 'qwen2', vocab_size=len(t), "
                   f"seed={model_seed}, tokenizer=t, overrides={TINY_MODEL_SHAPE!r}); "
                   f"print('tiny Qwen2 HF model written')")
    commands = [
        ["-m", "data_tools.learnable_qa", "--num-examples", num_examples, "--seed", seed,
         "--long-tokens", long_tokens, "--out", data / "qa.jsonl"],
        ["-m", "data_tools.build_triplets", "--input", data / "qa.jsonl", "--output",
         data / "triplets.jsonl", "--target-long-tokens", long_tokens, "--distractor-pool",
         "none", "--tokenizer", TOKENIZER, "--seed", seed],
        ["-m", "data_tools.sample_pairs", "--backend", "rule", "--num-samples", 8, "--seed",
         seed, "--input", data / "triplets.jsonl", "--output", data / "pairs.jsonl"],
        ["-c", build_model],
        ["-m", "data_tools.preprocess", "--input", data / "pairs.jsonl", "--output-prefix",
         data / "qa", "--tokenizer", TOKENIZER, "--max-seq-length", long_tokens + 512,
         "--num-proc", 2, "--model-config", model / "hf_init"],
        ["examples/convert_checkpoint.py", "hf-to-mcore", "--src", model / "hf_init", "--dst",
         model / "mcore_init", "--verify", "--overwrite"],
    ]
    return [[python, *map(str, c)] for c in commands]


def pretrained_pipeline_commands(python: str, out_dir, hf_dir, num_examples: int,
                                 long_tokens: int, num_distractors: int, num_same_relation: int,
                                 rule_style: str, instruction: str,
                                 seed: int = 0
                                 ) -> list[list[str]]:
    """:func:`pipeline_commands` for a pretrained model: the varied relations, the model's own
    tokenizer, Wikipedia filler around the distractors, the instruction named ``instruction``
    (``build_triplets --instruction``), pairs of the rule style ``rule_style``
    (``sample_pairs --rule-style``), and ``hf_dir`` converted (verified).
    Same outputs under ``out_dir`` (``model/mcore_init``; the HF model stays in ``hf_dir``)."""
    from pathlib import Path

    data, model = Path(out_dir) / "data", Path(out_dir) / "model"
    commands = [
        ["-m", "data_tools.learnable_qa", "--relations", "varied", "--num-examples",
         num_examples, "--seed", seed, "--num-distractors", num_distractors,
         "--num-same-relation", num_same_relation, "--out", data / "qa.jsonl"],
        ["-m", "data_tools.build_triplets", "--input", data / "qa.jsonl", "--output",
         data / "triplets.jsonl", "--target-long-tokens", long_tokens, "--distractor-pool",
         "builtin:wiki", "--tokenizer", hf_dir, "--seed", seed, "--instruction", instruction],
        ["-m", "data_tools.sample_pairs", "--backend", "rule", "--rule-style", rule_style,
         "--num-samples", 8, "--seed", seed, "--input", data / "triplets.jsonl", "--output",
         data / "pairs.jsonl"],
        ["-m", "data_tools.preprocess", "--input", data / "pairs.jsonl", "--output-prefix",
         data / "qa", "--tokenizer", hf_dir, "--max-seq-length", long_tokens + 512,
         "--num-proc", 2, "--model-config", hf_dir],
        ["examples/convert_checkpoint.py", "hf-to-mcore", "--src", hf_dir, "--dst",
         model / "mcore_init", "--verify", "--overwrite"],
    ]
    return [[python, *map(str, c)] for c in commands]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-examples", type=int, default=640,
                        help="examples to generate (default: 640)")
    parser.add_argument("--out", required=True, help="output JSONL (MuSiQue format)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--hops", type=int, default=1, choices=range(1, MAX_HOPS + 1),
                        help="reasoning hops per question (default: 1, see the module doc)")
    parser.add_argument("--long-tokens", type=int, default=1024,
                        help="the long context the rows are for: sets how many distractor "
                             "paragraphs each row carries (default: 1024)")
    parser.add_argument("--num-distractors", type=int, default=None,
                        help="distractor paragraphs per row (default: from --long-tokens)")
    parser.add_argument("--relations", default="born", choices=["born", "varied"],
                        help="born: one relation and sentence shape, for a model trained from "
                             "scratch on the qa-words vocabulary (default); varied: eight "
                             "relations in several phrasings, for a pretrained model and its "
                             "own tokenizer (one hop)")
    parser.add_argument("--num-same-relation", type=int, default=None,
                        help="varied: distractors stating the question's relation (default: "
                             "half of --num-distractors); the rest state other relations")
    args = parser.parse_args(argv)
    if args.relations == "varied" and args.hops != 1:
        raise SystemExit("learnable_qa: --relations varied is one hop; drop --hops")
    if args.num_examples < 1:
        raise SystemExit("learnable_qa: --num-examples must be >= 1")
    if args.num_distractors is not None and args.num_distractors < 0:
        raise SystemExit("learnable_qa: --num-distractors must be >= 0")
    num_distractors = (args.num_distractors if args.num_distractors is not None
                       else distractors_for(args.long_tokens))
    if args.num_same_relation is not None and not 0 <= args.num_same_relation <= num_distractors:
        raise SystemExit(f"learnable_qa: --num-same-relation must be in 0..{num_distractors} "
                         f"(the distractors per row)")
    rows = generate(args.num_examples, args.seed, args.hops, num_distractors, args.relations,
                    args.num_same_relation)
    with atomic_output(args.out) as f:
        for row in progress(rows, desc="writing"):
            f.write(json.dumps(row) + "\n")
    print(f"learnable_qa: wrote {len(rows)} {args.hops}-hop examples ({args.relations} "
          f"relations) with {num_distractors} hard distractors each to {args.out}")


if __name__ == "__main__":
    with entry_point("learnable_qa"):
        main()
