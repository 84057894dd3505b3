"""The learnable QA task (data_tools.learnable_qa) through the real pipeline: its word-level
tokenizer, hard distractors, plausible rejected answers, and the question-only leak check."""

import json
import random
import re

import pytest

from data_tools import build_triplets, learnable_qa
from data_tools.common import INSTRUCTIONS
from data_tools.sample_pairs import main as sample_pairs_main
from data_tools.scoring import final_answer, sub_em
from data_tools.tokenizer import load_tokenizer

SENTENCE = re.compile(r"The person (\w+) was born in the town of (\w+)\.")


@pytest.fixture(scope="module")
def qa_words():
    return load_tokenizer("builtin:qa-words")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("learnable_qa")
    learnable_qa.main(["--num-examples", "48", "--out", str(root / "qa.jsonl"),
                       "--long-tokens", "512", "--seed", "5"])
    build_triplets.run(str(root / "qa.jsonl"), str(root / "triplets.jsonl"), "builtin:qa-words",
                       512, None, seed=0)
    sample_pairs_main(["--backend", "rule", "--num-samples", "8", "--input",
                       str(root / "triplets.jsonl"), "--output", str(root / "pairs.jsonl")])
    rows = {name: [json.loads(line) for line in open(root / f"{name}.jsonl")]
            for name in ("qa", "triplets", "pairs")}
    return rows


def test_every_prompt_and_answer_is_in_the_word_vocabulary(pipeline, qa_words):
    """No <unk>, one token per name, and decoding gives the text back exactly."""
    assert len(qa_words) < 1000
    unk = qa_words.unk_token_id
    for row in pipeline["pairs"]:
        for text in (row["prompt_short"], row["prompt_long"], row["chosen"], row["rejected"]):
            ids = qa_words(text, add_special_tokens=False).input_ids
            assert unk not in ids, text
            assert qa_words.decode(ids) == text
    for name in learnable_qa.NAMES:
        assert len(qa_words(" " + name, add_special_tokens=False).input_ids) == 1, name
    chat = qa_words.apply_chat_template([{"role": "user", "content": "x"}],
                                        add_generation_prompt=True, tokenize=False)
    assert unk not in qa_words(chat.replace("x", pipeline["pairs"][0]["prompt_short"]),
                               add_special_tokens=False).input_ids


def test_long_context_is_evidence_among_same_relation_distractors(pipeline, qa_words):
    for row in pipeline["triplets"]:
        short = SENTENCE.findall(row["prompt_short"])
        long = SENTENCE.findall(row["prompt_long"])
        assert len(short) == 1 and short[0] in long          # the evidence, byte for byte
        subject, answer = short[0]
        assert row["answers"] == [answer] and subject in row["question"]
        # hard distractors only: the same relation about other entities, to the target length
        assert len(long) >= 15
        others = [pair for pair in long if pair != short[0]]
        assert all(subject not in pair and answer not in pair for pair in others)
        measured = len(qa_words(row["prompt_long"], add_special_tokens=False).input_ids)
        assert 512 - 40 <= measured <= 512 == row["meta"]["target_long_tokens"]


def test_rejected_answers_are_plausible_same_relation_values(pipeline):
    for row in pipeline["pairs"]:
        assert sub_em(row["chosen"], row["answers"])
        assert not sub_em(row["rejected"], row["answers"])
        wrong = final_answer(row["rejected"])
        # a value the long context gives for the same relation about another entity, absent
        # from the short context: telling it apart on the long context needs the subject
        assert (re.search(rf"born in the town of {wrong}\.", row["prompt_long"])
                and wrong not in row["prompt_short"]), (wrong, row["id"])


def test_multi_hop_rows_get_wrong_hop_and_wrong_bridge_answers(tmp_path):
    learnable_qa.main(["--num-examples", "12", "--out", str(tmp_path / "qa.jsonl"),
                       "--hops", "2", "--long-tokens", "512"])
    build_triplets.run(str(tmp_path / "qa.jsonl"), str(tmp_path / "t.jsonl"),
                       "builtin:qa-words", 512, None)
    from data_tools.sample_pairs import rule_samples
    for row in map(json.loads, open(tmp_path / "t.jsonl")):
        bridge = row["question_decomposition"][0]["answer"]
        samples = rule_samples(row, 40, random.Random(0))
        finals = {final_answer(s) for s in samples}
        assert row["answers"][0] in finals and bridge in finals  # correct, and a wrong hop
        assert len(finals - {row["answers"][0], bridge, "not mentioned"}) >= 3


def test_question_only_baseline_stays_at_chance(tmp_path):
    rows = learnable_qa.generate(2000, seed=1)
    for row in rows:  # the fields the baseline reads, as sample_pairs writes them
        row["answers"] = [row["answer"]]
        decoy = row["question_decomposition"][0]["decoy_answers"][0]
        row["chosen"], row["rejected"] = f"Answer: {row['answer']}", f"Answer: {decoy}"
    result = learnable_qa.question_only_baseline(rows[:1600], rows[1600:])
    assert result["num_heldout"] == 400
    assert result["answer_accuracy"] <= 0.02          # chance is 1/256
    assert 0.4 <= result["pairwise_accuracy"] <= 0.6  # chance is 0.5
    # the check can fail: answers that follow from the question are found at once
    leaky = [dict(r, answer=learnable_qa.NAMES[hash(r["question"].split()[2]) % 7],
                  answers=[learnable_qa.NAMES[hash(r["question"].split()[2]) % 7]]) for r in rows]
    for row in leaky:
        row["chosen"] = f"Answer: {row['answer']}"
    subject_keyed = learnable_qa.question_only_baseline(leaky[:1600], leaky[1600:])
    assert subject_keyed["answer_accuracy"] > 0.1
    assert subject_keyed["pairwise_accuracy"] > 0.9


def test_distractor_counts_are_of_the_long_context_as_written(pipeline):
    for row in pipeline["triplets"]:
        meta = row["meta"]
        # every distractor is the row's own (no pool); counted after the trim to the target
        assert meta["num_own_distractors"] == meta["num_distractors"] == \
            len(SENTENCE.findall(row["prompt_long"])) - 1


def test_bad_pipeline_inputs_are_refused_with_the_fix(tmp_path):
    learnable_qa.main(["--num-examples", "4", "--out", str(tmp_path / "qa.jsonl")])
    with pytest.raises(SystemExit, match="--distractor-pool none"):  # Wikipedia text: <unk>
        build_triplets.run(str(tmp_path / "qa.jsonl"), str(tmp_path / "t.jsonl"),
                           "builtin:qa-words", 512, "builtin:wiki")
    with pytest.raises(SystemExit, match="0 rows written .*long_target_too_short=4"):
        build_triplets.run(str(tmp_path / "qa.jsonl"), str(tmp_path / "t.jsonl"),
                           "builtin:qa-words", 30, None)
    assert not (tmp_path / "t.jsonl").exists()  # no empty output left behind
    with pytest.raises(SystemExit, match="must be build_triplets output"):  # a skipped step
        sample_pairs_main(["--backend", "rule", "--input", str(tmp_path / "qa.jsonl"),
                           "--output", str(tmp_path / "p.jsonl")])
    assert not (tmp_path / "p.jsonl").exists()
    with pytest.raises(SystemExit, match="--num-distractors must be >= 0"):
        learnable_qa.main(["--num-distractors", "-2", "--out", str(tmp_path / "x.jsonl")])


def test_varied_relations_vary_and_their_decoys_are_same_relation_values(tmp_path):
    """``--relations varied`` (the pretrained demo's task): every relation, phrasing and question
    form occurs; the answer is stated once, by the evidence; each decoy is the value of a
    same-relation distractor; a question-only predictor stays at chance."""
    from data_tools.relations import PEOPLE, RELATIONS, VALUES
    learnable_qa.main(["--relations", "varied", "--num-examples", "600", "--num-distractors",
                       "6", "--num-same-relation", "2", "--seed", "3",
                       "--out", str(tmp_path / "qa.jsonl")])
    rows = [json.loads(line) for line in open(tmp_path / "qa.jsonl")]
    by_name = {r.name: r for r in RELATIONS}
    seen_facts, seen_questions = set(), set()
    for row in rows:
        relation = by_name[row["relation"]]
        step = row["question_decomposition"][0]
        evidence = row["paragraphs"][step["paragraph_support_idx"]]
        assert evidence["is_supporting"] and row["answer"] in evidence["paragraph_text"]
        assert sum(row["answer"] in p["paragraph_text"] for p in row["paragraphs"]) == 1
        assert len(row["paragraphs"]) == 7
        subject = evidence["title"]
        forms = [q.format(s=subject) for q in relation.questions]
        assert row["question"] in forms
        seen_questions.add((relation.name, forms.index(row["question"])))
        same = []
        for paragraph in row["paragraphs"]:
            for k, fact in enumerate(relation.facts):
                pattern = re.escape(fact).replace(r"\{s\}", r"(\w+)").replace(r"\{o\}", r"(\w+)")
                match = re.match(pattern, paragraph["paragraph_text"])
                if match:
                    seen_facts.add((relation.name, k))
                    if not paragraph["is_supporting"]:
                        same.append(match.group(2) if fact.index("{s}") < fact.index("{o}")
                                    else match.group(1))
        assert set(step["decoy_answers"]) == set(same) and 1 <= len(same) <= 2, row["id"]
    assert len(seen_facts) == sum(len(r.facts) for r in RELATIONS)
    assert len(seen_questions) == sum(len(r.questions) for r in RELATIONS)
    names = [*PEOPLE, *(v for pool in VALUES.values() for v in pool)]
    texts = [t.lower() for r in RELATIONS for t in (*r.facts, *r.questions)]
    for name in names:  # sub-EM cannot be matched by another name or by the sentences
        assert [n for n in names if name.lower() in n.lower()] == [name], name
        assert not any(name.lower() in t for t in texts), name
    for row in rows:
        row["answers"] = [row["answer"]]
        row["chosen"] = f"Answer: {row['answer']}"
        row["rejected"] = f"Answer: {row['question_decomposition'][0]['decoy_answers'][0]}"
    result = learnable_qa.question_only_baseline(rows[:500], rows[500:])
    assert result["answer_accuracy"] <= 0.03 and 0.35 <= result["pairwise_accuracy"] <= 0.65


def test_quote_pairs_quote_the_evidence_and_a_same_relation_distractor(tmp_path):
    """``sample_pairs --backend rule --rule-style quote|sentence`` on varied rows: the chosen
    answer quotes the evidence sentence, which names the answer; the rejected quotes a
    same-relation distractor sentence of the long context, which names its value. ``quote``
    adds 'Answer: NAME' to both; ``sentence`` is the same pairs without that line."""
    learnable_qa.main(["--relations", "varied", "--num-examples", "24", "--num-distractors",
                       "6", "--seed", "4", "--out", str(tmp_path / "qa.jsonl")])
    build_triplets.main(["--input", str(tmp_path / "qa.jsonl"), "--output",
                         str(tmp_path / "triplets.jsonl"), "--target-long-tokens", "400",
                         "--distractor-pool", "none", "--instruction", "sentence"])
    for row in map(json.loads, open(tmp_path / "triplets.jsonl")):
        for prompt in (row["prompt_short"], row["prompt_long"]):
            assert prompt.endswith(f"Question: {row['question']}\n{INSTRUCTIONS['sentence']}")
        assert row["instruction"] == INSTRUCTIONS["sentence"]
    qa = {r["id"]: r for r in map(json.loads, open(tmp_path / "qa.jsonl"))}
    styles = {}
    for style in ("quote", "sentence"):
        sample_pairs_main(["--backend", "rule", "--rule-style", style, "--num-samples", "8",
                           "--input", str(tmp_path / "triplets.jsonl"),
                           "--output", str(tmp_path / f"{style}.jsonl")])
        styles[style] = [json.loads(line) for line in open(tmp_path / f"{style}.jsonl")]
    assert len(styles["quote"]) == len(styles["sentence"]) == 24
    for pair, bare in zip(styles["quote"], styles["sentence"]):
        row = qa[pair["id"]]
        step = row["question_decomposition"][0]
        evidence = row["paragraphs"][step["paragraph_support_idx"]]["paragraph_text"]
        chosen_sentence, chosen_answer = pair["chosen"].split("\nAnswer: ")
        assert chosen_answer == row["answer"] and chosen_sentence in evidence
        assert sub_em(pair["chosen"], [row["answer"]])
        rejected_sentence, rejected_answer = pair["rejected"].split("\nAnswer: ")
        assert rejected_answer in step["decoy_answers"], pair["rejected"]
        assert rejected_sentence in pair["prompt_long"] and rejected_answer in rejected_sentence
        assert not sub_em(pair["rejected"], [row["answer"]])
        assert (bare["id"], bare["chosen"], bare["rejected"]) == (
            pair["id"], chosen_sentence, rejected_sentence)
        assert sub_em(bare["chosen"], [row["answer"]])
        assert not sub_em(bare["rejected"], [row["answer"]])
    with pytest.raises(SystemExit):  # the style belongs to the rule backend
        sample_pairs_main(["--backend", "hf", "--rule-style", "quote", "--input",
                           str(tmp_path / "triplets.jsonl"), "--output", str(tmp_path / "x")])
