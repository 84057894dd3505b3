"""Sample N chain-of-thought answers per short context and pick (chosen, rejected) by sub-EM.

Backends:
  hf    transformers ``generate`` (built in), batched, sampling at --temperature / --top-p;
  vllm  vLLM, used when installed (``--backend auto`` picks it first);
        (both from :mod:`data_tools.generation`, shared with ``examples/evaluate_qa.py``)
  rule  a rule-based answerer for the offline demo: from MuSiQue's ``question_decomposition`` it
        writes the correct hop chain and broken chains (a wrong bridge entity: a same-relation
        decoy from ``decoy_answers`` when the row has them, else a distractor passage's title;
        or, for multi-hop questions, the bridge entity as the answer) or evasive answers
        ("the passages do not say"). It stands in for sampling when no model can be run.

Scoring is sub-EM against the gold answer and aliases (SQuAD normalisation); the selection
policy is :func:`data_tools.scoring.select_pair`. Examples with no valid pair are counted by
reason (``none_correct``, ``all_correct``) and reported. The paper: 32 samples at T=0.85.

    python -m data_tools.sample_pairs --input triplets.jsonl --output pairs.jsonl \\
        --backend hf --model /models/Qwen2.5-7B-Instruct --num-samples 32 --temperature 0.85
"""

from __future__ import annotations

import argparse
import json
import random
import re
from typing import Optional

from data_tools.common import RowError, RunReport, atomic_output, progress, read_jsonl, require
from data_tools.common import refuse_overwriting_inputs, write_json
from data_tools.generation import make_generator
from data_tools.scoring import select_pair
from solopo_mcore.errors import entry_point

_TITLE = re.compile(r"^Title: (.+)$", re.MULTILINE)


# --------------------------------------------------------------------------- rule backend
def _chain_text(steps: list[tuple[str, str]], final: str) -> str:
    lines = [f"Step {i}: {q} {a}." for i, (q, a) in enumerate(steps, 1)]
    return "\n".join(lines + [f"Answer: {final}"])


def _in_text(name: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


def _sentence_naming(name: str, text: str) -> Optional[str]:
    """The first sentence of ``text`` that names ``name`` as a word."""
    for sentence in re.findall(r"[^.\n]+\.", text):
        if _in_text(name, sentence):
            return sentence.strip()
    return None


def quote_samples(row: dict, num_samples: int, rng: random.Random,
                  answer_line: bool = True) -> list[str]:
    """The ``quote`` rule style, for a pretrained model (one hop): an answer quotes the sentence
    it relies on, then gives the name (``Answer: NAME``), as such a model answers from a short
    context anyway. Correct: the evidence sentence. Wrong: a same-relation distractor's sentence
    from the long context with its value (the long context's typical mistake: quoting the wrong
    passage), else an evasive answer. ``answer_line=False`` is the ``sentence`` style: the
    quoted sentence alone, which names the answer (sub-EM scores the whole response)."""
    steps = row.get("question_decomposition")
    if not steps or len(steps) != 1:
        raise RowError("not_one_hop", "--rule-style quote and sentence need a one-hop "
                                      "question_decomposition")
    answer = steps[0]["answer"]
    evidence = _sentence_naming(answer, "\n".join(row.get("evidence", [])))
    if evidence is None:
        raise RowError("answer_not_in_evidence", f"no evidence sentence names {answer!r}")

    def answered(sentence: str, name: str) -> str:
        return f"{sentence}\nAnswer: {name}" if answer_line else sentence

    wrong = [answered(sentence, decoy) for decoy in steps[0].get("decoy_answers") or []
             if decoy != answer and (sentence := _sentence_naming(decoy, row["prompt_long"]))]
    samples = [answered(evidence, answer)]
    while len(samples) < num_samples:
        if wrong and rng.random() >= 0.25:
            samples.append(rng.choice(wrong))
        else:
            samples.append(answered("The passages do not say enough to answer this question.",
                                    "not mentioned"))
    rng.shuffle(samples)
    return samples


def rule_samples(row: dict, num_samples: int, rng: random.Random) -> list[str]:
    """One correct chain plus broken or evasive ones (see module doc).

    A chain breaks at a random hop with a wrong bridge entity: one of that hop's
    ``decoy_answers`` (the same relation's value for another entity, when the row carries them,
    as :mod:`data_tools.learnable_qa` rows do) that occurs in the long context, else the title
    of a long-context passage that is not evidence. A multi-hop chain may also stop one hop
    early and answer with the bridge entity (a wrong hop)."""
    steps = row.get("question_decomposition")
    if not steps:
        raise RowError("no_decomposition", "the rule backend needs question_decomposition")
    answers = [s["answer"] for s in steps]

    def resolve(question: str, values: list[str]) -> str:
        return re.sub(r"#(\d+)", lambda m: values[int(m.group(1)) - 1], question)

    correct = _chain_text([(resolve(s["question"], answers), a) for s, a in zip(steps, answers)],
                          answers[-1])
    evidence_titles = set(_TITLE.findall("\n".join(row.get("evidence", []))))
    titles = [t for t in _TITLE.findall(row["prompt_long"]) if t not in evidence_titles
              and t not in answers] or ["an unnamed place"]
    hop_decoys = [[d for d in s.get("decoy_answers") or []
                   if d not in answers and _in_text(d, row["prompt_long"])] or titles
                  for s in steps]
    samples = [correct]
    while len(samples) < num_samples:
        if rng.random() < 0.25:
            samples.append("The passages do not say enough to answer this question.\n"
                           "Answer: not mentioned")
            continue
        if len(steps) > 1 and rng.random() < 0.25:  # a wrong hop: stop at the bridge entity
            stop = rng.randrange(1, len(steps))
            samples.append(_chain_text([(resolve(s["question"], answers), a) for s, a in
                                        zip(steps[:stop], answers[:stop])], answers[stop - 1]))
            continue
        hop = rng.randrange(len(steps))  # the chain breaks here: a wrong bridge entity
        broken = answers[:hop] + [rng.choice(hop_decoys[h]) for h in range(hop, len(steps))]
        samples.append(_chain_text([(resolve(s["question"], broken), a)
                                    for s, a in zip(steps, broken)], broken[-1]))
    rng.shuffle(samples)
    return samples


# --------------------------------------------------------------------------- model backends
def make_sampler(backend: str, args) -> Optional[object]:
    """None for the rule backend, else a sampling generator from :mod:`data_tools.generation`."""
    if backend == "rule":
        return None
    if not args.model:
        raise SystemExit(f"sample_pairs: --backend {backend} needs --model DIR")
    return make_generator(backend, args.model, args.tokenizer,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, num_return_sequences=args.num_samples,
                          seed=args.seed)


# --------------------------------------------------------------------------- driver
def _pair_row(row: dict, samples: list[str], rng: random.Random, report: RunReport, where: str):
    chosen, rejected, scores, status = select_pair(samples, row["answers"], rng)
    if status != "ok":
        report.skip(where, status, f"{sum(scores)}/{len(scores)} samples sub-EM correct")
        return None
    return {"id": row["id"], "question": row["question"], "answers": row["answers"],
            "prompt_short": row["prompt_short"], "prompt_long": row["prompt_long"],
            "chosen": samples[chosen], "rejected": samples[rejected],
            "scores": scores, "num_samples": len(samples), "meta": row.get("meta", {})}


def run(args) -> dict:
    refuse_overwriting_inputs(
        "sample_pairs", {"--input": args.input},
        {"--output": args.output, "--output (.summary.json)": args.output + ".summary.json",
         "--output (.tmp)": args.output + ".tmp"})
    report = RunReport("sample_pairs", strict=args.strict)
    sampler = make_sampler(args.backend, args)
    rows = []
    for line_number, row in read_jsonl(args.input, report):
        try:
            require(row, ["id", "question", "answers", "prompt_short", "prompt_long"])
            rows.append((line_number, row))
        except RowError as exc:
            report.skip(f"{args.input}:{line_number}", exc.reason, str(exc))
    with atomic_output(args.output) as out:
        for start in progress(range(0, len(rows), args.batch_size), desc="sampling",
                              total=(len(rows) + args.batch_size - 1) // args.batch_size):
            batch = rows[start:start + args.batch_size]
            if sampler is None:
                generated = []
                for line_number, row in batch:
                    try:
                        style = getattr(args, "rule_style", "steps")
                        rng = random.Random(f"{args.seed}:{row['id']}")
                        generated.append(
                            rule_samples(row, args.num_samples, rng) if style == "steps" else
                            quote_samples(row, args.num_samples, rng,
                                          answer_line=style == "quote"))
                    except RowError as exc:
                        report.skip(f"{args.input}:{line_number}", exc.reason, str(exc))
                        generated.append(None)
            else:
                generated = sampler([row["prompt_short"] for _, row in batch])
            for (line_number, row), samples in zip(batch, generated):
                if samples is None:
                    continue
                pair = _pair_row(row, samples, random.Random(f"{args.seed}:pick:{row['id']}"),
                                 report, f"{args.input}:{line_number}")
                if pair is not None:
                    out.write(json.dumps(pair, ensure_ascii=False) + "\n")
                    report.written += 1
        report.require_written(args.input, "The input must be build_triplets output (id, "
                               "question, answers, prompt_short, prompt_long); with a model "
                               "backend, rows with no correct or no wrong sample are skipped.")
    summary = report.as_dict()
    write_json(args.output + ".summary.json", summary)
    report.print_summary()
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="output of build_triplets")
    parser.add_argument("--output", required=True, help="pairs JSONL for preprocess")
    parser.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm", "rule"],
                        help="sampler (see above); auto: vllm when installed, else hf")
    parser.add_argument("--model", help="HF model directory (hf / vllm backends)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    parser.add_argument("--num-samples", type=int, default=32,
                        help="answers sampled per question (the paper: 32)")
    parser.add_argument("--temperature", type=float, default=0.85,
                        help="sampling temperature (the paper: 0.85)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling top-p")
    parser.add_argument("--max-new-tokens", type=int, default=512,
                        help="longest sampled answer, in tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row")
    parser.add_argument("--rule-style", default="steps", choices=["steps", "quote", "sentence"],
                        help="rule backend: steps (a 'Step i:' hop chain, the from-scratch "
                             "demo's), quote (the sentence relied on, then 'Answer: NAME': "
                             "one-hop rows, for a pretrained model) or sentence (the sentence "
                             "relied on alone, which names the answer)")
    args = parser.parse_args(argv)
    if args.rule_style != "steps" and args.backend != "rule":
        parser.error("--rule-style applies to --backend rule")
    run(args)


if __name__ == "__main__":
    with entry_point("sample_pairs"):
        main()
