"""Build short/long contexts: x_short = [c_rel; I] and x_long = [c_rel, c_irr; I].

Short context: the supporting paragraphs in *hop order* (the order of MuSiQue's
``question_decomposition``; any supporting paragraph it does not name follows by ``idx``), then
the question and instruction. Generic rows keep their ``evidence`` order.

Long context, RULER-style: the same evidence passages, byte for byte, inserted at uniformly random
positions (keeping their relative order) among distractor passages, until the user message
reaches ``--target-long-tokens`` measured with the real tokenizer. Distractors come from the
example's own non-supporting paragraphs first, then from ``--distractor-pool``. The long length
ends at most the target and within one passage of it.

Input rows are MuSiQue as released or generic JSONL: ``question``, ``answers`` (list),
``evidence`` (strings or {title, text}), optional ``distractors`` and ``id``.

    python -m data_tools.build_triplets --input musique.jsonl --output triplets.jsonl \\
        --tokenizer builtin:qwen2.5 --target-long-tokens 8192 --distractor-pool builtin:wiki
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Optional

from data_tools.common import (INSTRUCTION, INSTRUCTIONS, PASSAGE_SEPARATOR, RowError,
                               RunReport, atomic_output, read_jsonl, refuse_overwriting_inputs,
                               render_passage, render_prompt, require, write_json)
from data_tools.distractors import BUILTIN_WIKI, load_pool
from data_tools.tokenizer import BUILTIN_QA_WORDS, BUILTIN_QWEN, load_tokenizer
from solopo_mcore.errors import entry_point


def parse_musique(row: dict) -> dict:
    require(row, ["id", "paragraphs", "question", "answer"])
    if row.get("answerable") is False:
        raise RowError("unanswerable", "answerable=false (no gold evidence chain)")
    paragraphs = row["paragraphs"]
    if not isinstance(paragraphs, list):
        raise RowError("missing_field", "'paragraphs' must be a list")
    for p in paragraphs:
        require(p, ["idx", "paragraph_text", "is_supporting"])
    supporting = {p["idx"]: p for p in paragraphs if p["is_supporting"]}
    if not supporting:
        raise RowError("no_supporting_paragraph", "no paragraph has is_supporting=true")
    order = []
    for step in row.get("question_decomposition") or []:
        idx = step.get("paragraph_support_idx")
        if idx in supporting and idx not in order:
            order.append(idx)
    order += sorted(i for i in supporting if i not in order)
    answers = [row["answer"]] + list(row.get("answer_aliases") or [])
    return {
        "id": str(row["id"]),
        "question": row["question"],
        "answers": answers,
        "evidence": [(supporting[i].get("title", ""), supporting[i]["paragraph_text"])
                     for i in order],
        "own_distractors": [(p.get("title", ""), p["paragraph_text"]) for p in paragraphs
                            if not p["is_supporting"]],
        "question_decomposition": row.get("question_decomposition"),
    }


def parse_generic(row: dict, line_number: int) -> dict:
    require(row, ["question", "answers", "evidence"])

    def passages(items, field):
        out = []
        for item in items or []:
            if isinstance(item, str):
                out.append(("", item))
            elif isinstance(item, dict) and "text" in item:
                out.append((str(item.get("title", "")), item["text"]))
            else:
                raise RowError("missing_field", f"{field} items must be strings or {{title, text}}")
        return out

    if not isinstance(row["answers"], list):
        raise RowError("missing_field", "'answers' must be a list")
    evidence = passages(row["evidence"], "evidence")
    if not evidence:
        raise RowError("no_supporting_paragraph", "'evidence' is empty")
    return {"id": str(row.get("id", f"line{line_number}")), "question": row["question"],
            "answers": row["answers"], "evidence": evidence,
            "own_distractors": passages(row.get("distractors"), "distractors"),
            "question_decomposition": row.get("question_decomposition")}


class TokenCounter:
    """Token counts of passages, cached (pool passages recur across examples)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict = {}
        self.separator = self.count(PASSAGE_SEPARATOR)

    def count(self, text: str) -> int:
        if text not in self.cache:
            self.cache[text] = len(self.tokenizer(text, add_special_tokens=False).input_ids)
        return self.cache[text]


def build_long(example: dict, short_tokens: int, target: int, counter: TokenCounter,
               pool: list, rng: random.Random, max_misses: int = 64,
               instruction: str = INSTRUCTION) -> tuple[str, dict]:
    """Fill distractors to the target, insert the evidence, return (long prompt, metadata)."""
    evidence = [render_passage(t, x) for t, x in example["evidence"]]
    own = [render_passage(t, x) for t, x in example["own_distractors"]]
    rng.shuffle(own)
    budget = target - short_tokens
    chosen: list[tuple[str, str]] = []  # (passage, source)
    misses = 0

    def candidates():
        for p in own:
            yield p, "own"
        while pool:  # no pool (--distractor-pool none): the example's own distractors only
            title, text = pool[rng.randrange(len(pool))]
            yield render_passage(title, text), "pool"

    for passage, source in candidates():
        if misses >= max_misses:
            break
        cost = counter.count(passage) + counter.separator
        if cost <= budget:
            chosen.append((passage, source))
            budget -= cost
            misses = 0
        else:
            misses += 1
        if budget < counter.separator + 8:
            break
    # insert evidence at sorted uniform positions among the distractors
    positions = sorted(rng.randint(0, len(chosen)) for _ in evidence)
    documents, sources, evidence_doc_positions = [], [], []
    distractor_iter = iter(chosen)
    next_evidence = 0
    for slot in range(len(chosen) + 1):
        while next_evidence < len(evidence) and positions[next_evidence] == slot:
            evidence_doc_positions.append(len(documents))
            documents.append(evidence[next_evidence])
            sources.append("evidence")
            next_evidence += 1
        if slot < len(chosen):
            passage, source = next(distractor_iter)
            documents.append(passage)
            sources.append(source)
    long_prompt = render_prompt(documents, example["question"], instruction)
    long_tokens = counter.count(long_prompt)
    while long_tokens > target and len(documents) > len(evidence):  # boundary merges: trim
        drop = max(i for i in range(len(documents)) if i not in evidence_doc_positions)
        documents.pop(drop)
        sources.pop(drop)
        evidence_doc_positions = [p - (p > drop) for p in evidence_doc_positions]
        long_prompt = render_prompt(documents, example["question"], instruction)
        long_tokens = counter.count(long_prompt)
    offsets = [long_prompt.index(documents[p]) for p in evidence_doc_positions]
    meta = {
        "long_tokens": long_tokens,
        "num_distractors": len(documents) - len(evidence),
        "num_own_distractors": sources.count("own"),
        "evidence_doc_positions": evidence_doc_positions,
        "evidence_char_offsets": offsets,
        "evidence_depths": [round(o / max(len(long_prompt), 1), 4) for o in offsets],
    }
    return long_prompt, meta


def build_example(example: dict, target: int, counter: TokenCounter, pool: list,
                  rng: random.Random, instruction: str = INSTRUCTION) -> dict:
    answers = [a for a in example["answers"] if isinstance(a, str) and a.strip()]
    if not answers:
        raise RowError("empty_answers", "no non-empty gold answer")
    evidence = [render_passage(t, x) for t, x in example["evidence"]]
    short_prompt = render_prompt(evidence, example["question"], instruction)
    short_tokens = counter.count(short_prompt)
    if target <= short_tokens:
        raise RowError("long_target_too_short",
                       f"--target-long-tokens {target} <= short context {short_tokens} tokens")
    long_prompt, meta = build_long(example, short_tokens, target, counter, pool, rng,
                                   instruction=instruction)
    for passage in evidence:  # byte-identical evidence in both contexts
        assert passage in short_prompt and passage in long_prompt
    meta.update(short_tokens=short_tokens, target_long_tokens=target,
                rho=round(short_tokens / meta["long_tokens"], 4))
    return {"id": example["id"], "question": example["question"], "answers": answers,
            "prompt_short": short_prompt, "prompt_long": long_prompt, "evidence": evidence,
            "question_decomposition": example["question_decomposition"], "meta": meta,
            **({} if instruction == INSTRUCTION else {"instruction": instruction})}


def run(input_path: str, output_path: str, tokenizer_name: str, target_long_tokens: int,
        distractor_pool: Optional[str], input_format: str = "auto", seed: int = 0,
        strict: bool = False, limit: Optional[int] = None,
        instruction: str = INSTRUCTION) -> dict:
    pool_file = distractor_pool if distractor_pool and distractor_pool != BUILTIN_WIKI else None
    refuse_overwriting_inputs(
        "build_triplets", {"--input": input_path, "--distractor-pool": pool_file},
        {"--output": output_path, "--output (.summary.json)": output_path + ".summary.json",
         "--output (.tmp)": output_path + ".tmp"})
    if tokenizer_name == BUILTIN_QA_WORDS and distractor_pool:
        raise SystemExit(f"build_triplets: --tokenizer {BUILTIN_QA_WORDS} covers only the "
                         f"learnable QA task's words; --distractor-pool {distractor_pool} would "
                         f"fill the long context with <unk>. Use --distractor-pool none (the "
                         f"rows' own distractors, see python -m data_tools.learnable_qa "
                         f"--long-tokens).")
    report = RunReport("build_triplets", strict=strict)
    counter = TokenCounter(load_tokenizer(tokenizer_name))
    pool = load_pool(distractor_pool) if distractor_pool else []
    lengths = []
    with atomic_output(output_path) as out:
        for line_number, row in read_jsonl(input_path, report):
            where = f"{input_path}:{line_number}"
            try:
                fmt = input_format if input_format != "auto" else (
                    "musique" if "paragraphs" in row else "generic")
                example = parse_musique(row) if fmt == "musique" else parse_generic(row,
                                                                                      line_number)
                rng = random.Random(f"{seed}:{example['id']}")  # per-example: order-independent
                built = build_example(example, target_long_tokens, counter, pool, rng,
                                      instruction)
            except RowError as exc:
                report.skip(where, exc.reason, str(exc))
                continue
            out.write(json.dumps(built, ensure_ascii=False) + "\n")
            report.written += 1
            lengths.append((built["meta"]["short_tokens"], built["meta"]["long_tokens"]))
            if limit is not None and report.written >= limit:
                break  # before reading (and counting) another row
        report.require_written(input_path, "Fix the input or the skip reasons above (e.g. a "
                               "--target-long-tokens above the short contexts' length).")
    if lengths:
        # the long context ends within one passage of the target; far below it, the distractors
        # ran out (too few own distractors and no pool): said, not hidden in a mean
        short_of_target = sum(1 for _, long in lengths if long < 0.9 * target_long_tokens)
        if short_of_target:
            report.extra["rows_under_90pct_of_target"] = short_of_target
            print(f"build_triplets: warning: {short_of_target} of {len(lengths)} long contexts "
                  f"have under 90% of --target-long-tokens {target_long_tokens}: the distractors "
                  f"ran out (more per row: learnable_qa --long-tokens / --num-distractors, or a "
                  f"--distractor-pool)", flush=True)
        report.extra.update(
            mean_short_tokens=round(sum(s for s, _ in lengths) / len(lengths), 1),
            mean_long_tokens=round(sum(l for _, l in lengths) / len(lengths), 1),
            mean_rho=round(sum(s / l for s, l in lengths) / len(lengths), 4))
    summary = report.as_dict()
    write_json(output_path + ".summary.json", summary)
    report.print_summary()
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="MuSiQue or generic QA JSONL")
    parser.add_argument("--output", required=True, help="triplet-context JSONL")
    parser.add_argument("--tokenizer", default=BUILTIN_QWEN,
                        help=f"HF tokenizer directory or {BUILTIN_QWEN}")
    parser.add_argument("--target-long-tokens", type=int, required=True,
                        help="length of the long user message, in tokens")
    parser.add_argument("--distractor-pool", default=BUILTIN_WIKI,
                        help=f"{BUILTIN_WIKI}, a .jsonl with 'text', or a .txt file; 'none' to "
                             f"use only each example's own distractors")
    parser.add_argument("--format", default="auto", choices=["auto", "musique", "generic"],
                        help="input format; auto: musique when a row has 'paragraphs'")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the per-example distractor choice and order")
    parser.add_argument("--limit", type=int, default=None, help="stop after N written examples")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row")
    parser.add_argument("--instruction", default="final-answer", choices=sorted(INSTRUCTIONS),
                        help="the instruction after the question: final-answer (reason step by "
                             "step, then 'Answer: <answer>'; default) or sentence (answer with "
                             "the one sentence that answers it; kept in each row as "
                             "'instruction', which evaluate_qa's grid reuses)")
    args = parser.parse_args(argv)
    run(args.input, args.output, args.tokenizer, args.target_long_tokens,
        None if args.distractor_pool == "none" else args.distractor_pool, args.format,
        args.seed, args.strict, args.limit, INSTRUCTIONS[args.instruction])


if __name__ == "__main__":
    with entry_point("build_triplets"):
        main()
