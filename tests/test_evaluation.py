"""QA evaluation (examples/evaluate_qa.py, solopo_mcore.evaluation): scoring, bootstrap
intervals, the NIAH grid, end-to-end runs (oracle / wrong / tiny model), resume, refusal."""

import json
import re

import numpy as np
import pytest

from data_tools.scoring import normalize_answer, sub_em
from solopo_mcore.evaluation import items as items_mod
from solopo_mcore.evaluation.items import EvalInputError
from solopo_mcore.evaluation.runner import EvalConfig, run_evaluation
from solopo_mcore.evaluation.summary import bootstrap, score

_QUESTION = re.compile(r"Question: (.*)\n")


@pytest.mark.parametrize("response, golds, prediction, expected", [
    ("Step 1: ...\nAnswer: The Eiffel Tower.", ["Eiffel Tower"], "The Eiffel Tower.", 1),
    ("Answer: an   EIFFEL tower!", ["the Eiffel Tower"], "an   EIFFEL tower!", 1),
    ("Answer: eiffel-tower", ["Eiffel Tower"], "eiffel-tower", 0),  # '-' dropped, not a space
    ("Answer: the U.S.A.", ["United States", "USA"], "the U.S.A.", 1),  # second alias
    ("Answer: America", ["United States", "USA"], "America", 0),
    ("Paris is where it is.\nAnswer: London", ["Paris"], "London", 0),  # last marker counts
    ("It is Paris.", ["Paris"], "It is Paris.", 1),  # no marker: the whole response
    ("Answer: Paris", ["", "Rome"], "Paris", 0),  # an empty alias matches nothing
    ("Answer:", ["Paris"], "", 0),
    ("Answer: not mentioned", ["Paris"], "not mentioned", 0),
])
def test_score_hand_checked(response, golds, prediction, expected):
    assert score(response, golds) == (prediction, expected)


def _rows(short_scores, long_scores_per_example):
    rows = []
    for i, (s, longs) in enumerate(zip(short_scores, long_scores_per_example)):
        rows.append({"example_id": str(i), "context": "short", "score": s})
        rows += [{"example_id": str(i), "context": "long", "score": x} for x in longs]
    return rows


def test_bootstrap_intervals_match_the_normal_approximation():
    n = 400
    short = [i % 2 for i in range(n)]  # p = 0.5
    rows = _rows(short, [[0]] * n)
    out = bootstrap(rows, num_resamples=4000, seed=1)
    assert out["accuracy_short"]["value"] == 0.5 and out["accuracy_short"]["n"] == n
    lo, hi = out["accuracy_short"]["ci95"]
    half_width = 1.96 * np.sqrt(0.25 / n)  # 0.049
    assert abs((hi - lo) / 2 - half_width) < 0.006 and lo < 0.5 < hi
    assert out["accuracy_long"] == {"value": 0.0, "ci95": [0.0, 0.0], "n": n}
    assert out["gap"]["value"] == 0.5 and out["gap"]["n"] == n
    # examples (not generations) are resampled: 4 long items per example, identical within it,
    # give the interval of n examples, not of 4n generations
    clustered = bootstrap(_rows(short, [[s] * 4 for s in short]), num_resamples=4000, seed=1)
    lo, hi = clustered["accuracy_long"]["ci95"]
    assert clustered["accuracy_long"]["n"] == 4 * n
    assert abs((hi - lo) / 2 - half_width) < 0.006
    assert clustered["gap"]["ci95"] == [0.0, 0.0]  # paired: short == long in every example


@pytest.fixture(scope="module")
def heldout(demo_data):
    return items_mod.read_heldout(str(demo_data["triplets"]), items_mod.GRID_FIELDS, limit=3)


def test_grid_places_evidence_at_depth_and_length(heldout, qwen_tokenizer):
    from data_tools.distractors import load_pool

    lengths, depths = [1024, 2048], [0, 25, 50, 100]
    grid = items_mod.grid_items(heldout, qwen_tokenizer, lengths, depths,
                                load_pool("builtin:wiki"), seed=0)
    rows = {r["id"]: r for r in heldout}
    count = lambda text: len(qwen_tokenizer(text, add_special_tokens=False).input_ids)  # noqa
    long_items = [i for i in grid if i.context == "long"]
    assert len(long_items) == len(heldout) * len(lengths) * len(depths)
    assert sum(i.context == "short" for i in grid) == len(heldout)
    for item in long_items:
        row = rows[item.example_id]
        total = count(item.prompt)
        assert item.length_tokens - 32 <= total <= item.length_tokens, (item.id, total)
        block = "\n\n".join(row["evidence"])
        assert item.prompt.count(block) == 1  # contiguous, in order, once
        start = item.prompt.index(block)
        question_at = item.prompt.rindex("\n\nQuestion: ")
        before = count(item.prompt[:start])
        after = count(item.prompt[start + len(block):question_at])
        offset_error = before - item.depth_percent / 100 * (before + after)
        assert abs(offset_error) <= 48, (item.id, before, after)  # about one sentence
        assert item.prompt.endswith(row["prompt_short"][row["prompt_short"].rindex("Question: "):])
        distractors = normalize_answer(item.prompt[:start] + " "
                                       + item.prompt[start + len(block):question_at])
        assert not any(normalize_answer(a) in distractors for a in row["answers"])
    # a row built with another instruction (build_triplets --instruction) keeps it in the grid
    from data_tools.common import INSTRUCTION, INSTRUCTIONS
    other = [dict(heldout[0], instruction=INSTRUCTIONS["sentence"])]
    for item in items_mod.grid_items(other, qwen_tokenizer, [1024], [50],
                                     load_pool("builtin:wiki"), seed=0)[1:]:
        assert item.prompt.endswith(INSTRUCTIONS["sentence"]) and INSTRUCTION not in item.prompt


def _oracle(heldout_rows):
    golds = {r["question"]: r["answers"][0] for r in heldout_rows}
    return lambda prompts: [f"The passages say so.\nAnswer: {golds[_QUESTION.findall(p)[-1]]}"
                            for p in prompts]


def test_end_to_end_oracle_one_wrong_zero(demo_data, tmp_path):
    rows = items_mod.read_heldout(str(demo_data["triplets"]), items_mod.TRIPLET_FIELDS)
    oracle, wrong = _oracle(rows), (lambda prompts: ["Answer: Zanzibar Quokka"] * len(prompts))
    cfg = EvalConfig(str(demo_data["triplets"]), str(tmp_path / "out"), mode="grid",
                     models=[("oracle", str(demo_data["model"])),
                             ("wrong", str(demo_data["model"]))],
                     lengths_tokens=[768, 1024], depths_percent=[0, 50, 100], limit=4,
                     batch_size=5, num_bootstrap=200)
    summaries = run_evaluation(cfg, lambda name, path: oracle if name == "oracle" else wrong)
    by_name = {s["name"]: s for s in summaries}
    for name, expected in (("oracle", 1.0), ("wrong", 0.0)):
        s = by_name[name]
        assert s["accuracy_short"] == {"value": expected, "ci95": [expected, expected], "n": 4}
        assert s["accuracy_long"]["value"] == expected and s["accuracy_long"]["n"] == 4 * 2 * 3
        assert s["gap"]["value"] == 0.0
        assert [(c["length_tokens"], c["depth_percent"], c["accuracy"], c["n"])
                for c in s["cells"]] == [(L, d, expected, 4) for L in (768, 1024)
                                         for d in (0.0, 50.0, 100.0)]
        folder = tmp_path / "out" / name
        for f in ("results.jsonl", "summary.json", "summary.md", "heatmap.png", "settings.json"):
            assert (folder / f).is_file(), f
        lines = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
        assert len(lines) == len({x["id"] for x in lines}) == 4 * (1 + 6)
        for x in lines:  # each line's score is sub-EM of its own prediction and gold
            assert x["score"] == int(sub_em(x["response"], x["gold"]))
            assert x["context"] == ("short" if x["id"].endswith(":short") else "long")
        assert json.loads((folder / "summary.json").read_text())["accuracy_short"]["value"] \
            == expected
    for f in ("summary.json", "summary.md", "comparison.png"):
        assert (tmp_path / "out" / f).is_file()
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| oracle | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | +0.000" in md
    assert "| wrong | 0.000 [0.000, 0.000] | 0.000 [0.000, 0.000] | +0.000" in md
    # a later run adding a checkpoint to the folder: the comparison covers all three
    cfg.models = [("third", str(demo_data["model"]))]
    run_evaluation(cfg, lambda name, path: wrong)
    combined = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["name"] for s in combined["checkpoints"]] == ["third", "oracle", "wrong"]


class _Interrupt(Exception):
    pass


def test_tiny_model_resume_after_interruption(demo_data, tmp_path):
    """Real greedy generation with the tiny model; an interrupted run (stopped after one batch,
    with a half-written line) resumed gives exactly the uninterrupted run's lines."""
    from solopo_mcore.evaluation.models import transformers_generate

    model = str(demo_data["model"])
    generate = transformers_generate(model, "hf", max_new_tokens=3)
    base = dict(input_path=str(demo_data["triplets"]), models=[("tiny", model)], backend="hf",
                max_new_tokens=3, limit=3, batch_size=2, num_bootstrap=100)
    run_evaluation(EvalConfig(output_dir=str(tmp_path / "full"), **base),
                   lambda name, path: generate)
    calls = []

    def interrupted(prompts):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise _Interrupt
        return generate(prompts)
    with pytest.raises(_Interrupt):
        run_evaluation(EvalConfig(output_dir=str(tmp_path / "resumed"), **base),
                       lambda name, path: interrupted)
    results = tmp_path / "resumed" / "tiny" / "results.jsonl"
    assert len(results.read_text().splitlines()) == 2
    with open(results, "a") as f:
        f.write('{"id": "' + "half a line")  # a write cut short
    run_evaluation(EvalConfig(output_dir=str(tmp_path / "resumed"), **base),
                   lambda name, path: generate)
    full = (tmp_path / "full" / "tiny" / "results.jsonl").read_text().splitlines()
    resumed = results.read_text().splitlines()
    assert len(full) == 6 and sorted(resumed) == sorted(full)
    summary = json.loads((tmp_path / "full" / "tiny" / "summary.json").read_text())
    rows = [json.loads(x) for x in full]
    assert summary["accuracy_short"]["value"] == np.mean(
        [r["score"] for r in rows if r["context"] == "short"])
    # a rerun with other settings is refused, naming the difference; nothing is touched
    with pytest.raises(EvalInputError, match=r"max_new_tokens: 3 there, 5 now"):
        run_evaluation(EvalConfig(output_dir=str(tmp_path / "resumed"),
                                  **dict(base, max_new_tokens=5)), lambda name, path: generate)
    assert results.read_text().splitlines() == resumed


def test_bad_input_names_line_and_field(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "q", "answers": ["x"],
                                "prompt_short": "s"}) + "\n")
    with pytest.raises(EvalInputError, match=r"t.jsonl:1: missing field\(s\) 'prompt_long'"):
        items_mod.read_heldout(str(path), items_mod.TRIPLET_FIELDS)


def test_cli_megatron_checkpoint_matches_its_hf_source(demo_data, tmp_path):
    """examples/evaluate_qa.py on a Megatron checkpoint (exported on the fly) gives the same
    generations as on the HF checkpoint it was converted from; the temporary export is removed."""
    import os

    from tests.helpers.launch import run_python

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    converted = run_python("examples/convert_checkpoint.py", [
        "hf-to-mcore", "--src", demo_data["model"], "--dst", tmp_path / "mcore"], env=env)
    assert converted.returncode == 0, converted.stderr[-3000:]
    out = run_python("examples/evaluate_qa.py", [
        "--input", demo_data["triplets"], "--output", tmp_path / "eval",
        "--model", f"hf={demo_data['model']}", "--model", f"mcore={tmp_path / 'mcore'}",
        "--limit", "2", "--max-new-tokens", "3", "--backend", "hf", "--batch-size", "4"],
        env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| hf |" in out.stdout and "| mcore |" in out.stdout
    hf_lines = (tmp_path / "eval" / "hf" / "results.jsonl").read_text().splitlines()
    mc_lines = (tmp_path / "eval" / "mcore" / "results.jsonl").read_text().splitlines()
    assert len(hf_lines) == 4 and mc_lines == hf_lines
    assert not list((tmp_path / "eval" / "mcore").glob("hf_export.*"))
    settings = json.loads((tmp_path / "eval" / "mcore" / "settings.json").read_text())
    assert settings["model"]["kind"] == "megatron" and settings["backend"] == "hf"


def test_a_missing_or_broken_checkpoint_is_named_and_the_others_evaluated(demo_data, tmp_path):
    from solopo_mcore.evaluation.runner import ModelsFailedError

    rows = items_mod.read_heldout(str(demo_data["triplets"]), items_mod.TRIPLET_FIELDS)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")

    def factory(name, path):
        if name == "broken":  # what transformers raises on a truncated safetensors file
            raise OSError(f"Unable to load weights from {path}/model.safetensors")
        return _oracle(rows)
    cfg = EvalConfig(str(demo_data["triplets"]), str(tmp_path / "out"),
                     models=[("missing", str(tmp_path / "nowhere")), ("broken", str(broken)),
                             ("good", str(demo_data["model"]))], limit=3, num_bootstrap=50)
    with pytest.raises(ModelsFailedError) as err:
        run_evaluation(cfg, factory)
    message = str(err.value)
    assert "2 of 3 checkpoints could not be evaluated" in message
    assert f"missing: model '{tmp_path / 'nowhere'}' is not a directory" in message
    assert f"broken: {broken}: OSError: Unable to load weights" in message
    assert "the other 1 was evaluated" in message
    good = json.loads((tmp_path / "out" / "good" / "summary.json").read_text())
    assert good["accuracy_short"]["value"] == 1.0
    assert [s["name"] for s in json.loads((tmp_path / "out" / "summary.json").read_text())[
        "checkpoints"]] == ["good"]
    assert not (tmp_path / "out" / "broken" / "summary.json").exists()
