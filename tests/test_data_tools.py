"""data_tools on a MuSiQue-format fixture, with the real Qwen2.5 tokenizer."""

import json
import os
import subprocess
import time
from pathlib import Path
import sys

import numpy as np
import pytest

from data_tools import build_triplets, preprocess
from data_tools.scoring import normalize_answer, select_pair, sub_em
from solopo_mcore.data.dataset import DatasetError, TripletDataset
from solopo_mcore.data.sampler import SamplerState, TripletSampler
from tests.helpers.launch import run_python

REPO = Path(__file__).resolve().parent.parent


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_real_qwen_tokenizer_ids(qwen_tokenizer):
    assert qwen_tokenizer("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert qwen_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) \
        == [151643, 151644, 151645]
    assert len(qwen_tokenizer) == 151665


def test_supporting_paragraphs_in_both_contexts_byte_identical(demo_data):
    musique = {r["id"]: r for r in _rows(demo_data["musique"])}
    for row in _rows(demo_data["triplets"]):
        source = musique[row["id"]]
        support = [p for p in source["paragraphs"] if p["is_supporting"]]
        assert len(row["evidence"]) == len(support)
        for p in support:
            rendered = f"Title: {p['title']}\n{p['paragraph_text']}"
            assert rendered in row["prompt_short"] and rendered in row["prompt_long"]
        # hop order in the short context (question_decomposition order)
        hops = [source["paragraphs"][s["paragraph_support_idx"]]["paragraph_text"]
                for s in source["question_decomposition"]]
        positions = [row["prompt_short"].index(h) for h in hops]
        assert positions == sorted(positions)
        offsets = row["meta"]["evidence_char_offsets"]
        for passage, offset in zip(row["evidence"], offsets):
            assert row["prompt_long"][offset:offset + len(passage)] == passage


def test_long_lengths_within_tolerance_of_target(demo_data, qwen_tokenizer):
    for row in _rows(demo_data["triplets"]):
        measured = len(qwen_tokenizer(row["prompt_long"], add_special_tokens=False).input_ids)
        assert measured == row["meta"]["long_tokens"]
        assert 512 - 100 <= measured <= 512, measured
        assert row["meta"]["rho"] == pytest.approx(row["meta"]["short_tokens"] / measured, abs=1e-3)


def test_build_triplets_is_deterministic(demo_data, tmp_path):
    out = tmp_path / "again.jsonl"
    build_triplets.run(str(demo_data["musique"]), str(out), "builtin:qwen2.5", 512,
                       "builtin:wiki", seed=0)
    assert out.read_bytes() == demo_data["triplets"].read_bytes()
    # --limit N reads N rows (when none is skipped), not N + 1, and writes N
    limited = build_triplets.run(str(demo_data["musique"]), str(tmp_path / "8.jsonl"),
                                 "builtin:qwen2.5", 512, "builtin:wiki", seed=0, limit=8)
    assert (limited["read"], limited["written"]) == (8, 8)
    assert out.read_text().splitlines()[:8] == (tmp_path / "8.jsonl").read_text().splitlines()


@pytest.mark.parametrize("prediction,golds,expected", [
    ("Step 1: ... \nAnswer: The Houston Baptist University.", ["Houston Baptist University"], True),
    ("Answer: 1960", ["1960"], True),
    ("so it was founded in 1960.\nAnswer: 1961", ["1960"], False),  # only the final answer counts
    ("Answer: houston-baptist university", ["Houston Baptist University"], False),
    ("Answer: an apple", ["Apple"], True),
    ("Answer: not mentioned", ["Paris"], False),
    ("Answer: ", ["Paris"], False),
])
def test_sub_em_hand_checked(prediction, golds, expected):
    assert sub_em(prediction, golds) is expected


def test_normalize_answer():
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"


def test_pair_policy_prefers_substantive_wrong_answers():
    import random
    responses = ["Answer: Paris", "Answer: not mentioned", "Answer: Lyon"]
    chosen, rejected, scores, status = select_pair(responses, ["Paris"], random.Random(0))
    assert (chosen, rejected, status) == (0, 2, "ok") and scores == [True, False, False]
    assert select_pair(["Answer: Paris"], ["Paris"], random.Random(0))[3] == "all_correct"
    assert select_pair(["Answer: Rome"], ["Paris"], random.Random(0))[3] == "none_correct"


def test_indexed_dataset_round_trips_token_for_token(demo_data, qwen_tokenizer):
    dataset = TripletDataset(demo_data["prefix"])
    pairs = _rows(demo_data["pairs"])
    assert len(dataset) == len(pairs) == dataset.meta["num_examples"]
    for i in (0, len(dataset) // 2, len(dataset) - 1):
        ex, row = dataset[i], pairs[i]
        expected = preprocess.tokenize_row(row, qwen_tokenizer)
        assert ex.short_prompt == expected["short_prompt"]
        assert ex.long_prompt == expected["long_prompt"]
        assert ex.chosen == expected["chosen"] and ex.rejected == expected["rejected"]
        assert ex.chosen[-1] == qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert qwen_tokenizer.decode(ex.chosen[:-1]) == row["chosen"]
    assert dataset.meta["example_ids"][0] == pairs[0]["id"]


def test_sampler_shards_and_resumes_exactly():
    indices = np.arange(37)
    full = TripletSampler(indices, 8, 2, 0, 1, seed=5)
    steps = [full.next_step() for _ in range(9)]  # crosses epoch boundaries
    resumed = TripletSampler(indices, 8, 2, 0, 1, seed=5,
                             state=SamplerState(consumed_examples=8 * 4))
    assert [resumed.next_step() for _ in range(5)] == steps[4:]
    # DP=2 ranks together cover exactly the DP=1 global batch
    r0 = TripletSampler(indices, 8, 2, 0, 2, seed=5).next_step()
    r1 = TripletSampler(indices, 8, 2, 1, 2, seed=5).next_step()
    assert sorted(sum(r0 + r1, [])) == sorted(sum(steps[0], []))
    # each epoch is a permutation of all indices
    first_epoch = [i for s in steps for mb in s for i in mb][:37]
    assert sorted(first_epoch) == list(range(37))


def test_incomplete_dataset_is_refused(demo_data, tmp_path):
    import shutil
    prefix = tmp_path / "copy"
    for ext in (".bin", ".idx"):
        shutil.copy(demo_data["prefix"] + ext, str(prefix) + ext)
    with pytest.raises(DatasetError, match="meta.json is missing"):
        TripletDataset(str(prefix))


def _run_tool(module, *args):
    return run_python(f"-m {module}", args, env={"PYTHONWARNINGS": "ignore", **__import__("os").environ})


def test_bad_rows_are_reported_with_line_and_reason(tmp_path, demo_data):
    good = _rows(demo_data["musique"])[0]
    no_support = json.loads(json.dumps(good))
    for p in no_support["paragraphs"]:
        p["is_supporting"] = False
    empty_answers = dict(good, answer="", answer_aliases=[])
    missing = {k: v for k, v in good.items() if k != "question"}
    lines = [json.dumps(good), "{not json", json.dumps(missing), json.dumps(no_support),
             json.dumps(empty_answers)]
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    result = _run_tool("data_tools.build_triplets", "--input", src, "--output", out,
                       "--target-long-tokens", 400)
    assert result.returncode == 0, result.stderr
    for line, reason in [(2, "invalid_json"), (3, "missing_field"),
                         (4, "no_supporting_paragraph"), (5, "empty_answers")]:
        assert f"bad.jsonl:{line}: skipped ({reason})" in result.stderr
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["read"] == 5 and summary["written"] == 1 and summary["skipped_total"] == 4
    assert "read 5, written 1, skipped 4" in result.stdout
    # a long target shorter than the short context
    result = _run_tool("data_tools.build_triplets", "--input", src, "--output", out,
                       "--target-long-tokens", 50)
    assert "skipped (long_target_too_short)" in result.stderr
    # --strict stops at the first bad row and leaves no output that looks complete
    strict_out = tmp_path / "strict.jsonl"
    result = _run_tool("data_tools.build_triplets", "--input", src, "--output", strict_out,
                       "--target-long-tokens", 400, "--strict")
    assert result.returncode != 0 and "bad.jsonl:2" in result.stderr
    assert not strict_out.exists() and not (tmp_path / "strict.jsonl.tmp").exists()


def test_preprocess_skips_too_long_and_refuses_large_vocab(tmp_path, demo_data):
    from solopo_mcore.data.dataset import TripletDataset
    full = TripletDataset(demo_data["prefix"])
    longest = sorted(max(len(ex.short_prompt), len(ex.long_prompt)) +
                     max(len(ex.chosen), len(ex.rejected)) for ex in map(full.__getitem__,
                                                                         range(len(full))))
    limit = longest[len(longest) // 2]  # about half the examples are too long
    result = _run_tool("data_tools.preprocess", "--input", demo_data["pairs"], "--output-prefix",
                       tmp_path / "short", "--max-seq-length", limit, "--num-proc", 1)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "short.meta.json").read_text())
    assert meta["report"]["skipped"].get("too_long", 0) > 0
    assert meta["num_examples"] + meta["report"]["skipped"]["too_long"] == meta["report"]["read"]
    from solopo_mcore.models.tiny import build_tiny_hf_model
    small = tmp_path / "small_vocab_model"
    build_tiny_hf_model(small, "qwen2", vocab_size=1000)
    result = _run_tool("data_tools.preprocess", "--input", demo_data["pairs"], "--output-prefix",
                       tmp_path / "x", "--model-config", small, "--num-proc", 1)
    assert result.returncode != 0
    assert "the tokenizer has 151665 tokens but the model" in result.stderr
    assert "vocab_size=1000" in result.stderr


def test_hf_generation_backend_samples_scores_and_reports(demo_data, tmp_path):
    """The built-in transformers backend on the tiny random model: it generates, scores by sub-EM
    and, as a random model answers nothing right, reports every example as `none_correct`; no
    pair written is an error (exit 1) that leaves no output."""
    rows = demo_data["triplets"].read_text().splitlines()[:3]
    src = tmp_path / "three.jsonl"
    src.write_text("\n".join(rows) + "\n")
    result = _run_tool("data_tools.sample_pairs", "--input", src, "--output", tmp_path / "p.jsonl",
                       "--backend", "hf", "--model", demo_data["model"], "--num-samples", 2,
                       "--max-new-tokens", 6, "--batch-size", 2)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "0 rows written" in result.stderr and "(read 3, skipped 3: none_correct=3)" in \
        result.stderr, result.stderr[-3000:]
    assert "0/2 samples sub-EM correct" in result.stderr
    assert not (tmp_path / "p.jsonl").exists()


def test_preprocess_replaces_a_dataset_as_one_set(tmp_path, monkeypatch):
    """A new .bin/.idx/.meta.json set replaces the previous one only when complete: a failure
    while writing or committing the new set leaves the previous set whole and loadable."""
    import data_tools.common as common
    from data_tools import preprocess
    from solopo_mcore.data.dataset import TripletDataset

    rows = [{"id": str(i), "prompt_short": f"short {i}", "prompt_long": f"long context {i}",
             "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(6)]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = str(tmp_path / "out" / "ds")
    preprocess.run(str(source), prefix, "builtin:qa-words", 256)
    before = {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx", ".meta.json")}

    source.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):  # the third rename (.meta.json) fails
        calls.append(dst)
        if str(dst).endswith(".meta.json") and str(src).endswith(".tmp.meta.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(common.os, "replace", failing_replace)
    # one line naming the space (the partial files removed); the previous set untouched
    with pytest.raises(SystemExit, match=r"preprocess: no space left on the device writing "
                                         r".*the dataset already there is unchanged"):
        preprocess.run(str(source), prefix, "builtin:qa-words", 256)
    monkeypatch.setattr(common.os, "replace", real_replace)
    assert {ext: open(prefix + ext, "rb").read() for ext in before} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["ds.bin", "ds.idx", "ds.meta.json"]  # no .previous links, no staged files left
    assert len(TripletDataset(prefix)) == 6
    preprocess.run(str(source), prefix, "builtin:qa-words", 256)
    assert len(TripletDataset(prefix)) == 3
    assert not list((tmp_path / "out").glob("*.previous"))


def _slow_to_tokenize_source(path, num_rows=40000):
    """A pairs file that preprocess --num-proc 2 tokenizes for ~28 s after its two workers
    exist (~8 s after start; 41 MB)."""
    words = "alpha beta gamma delta epsilon " * 10
    rows = [{"id": str(i), "prompt_short": f"{words} {i}", "prompt_long": f"{words} {words}",
             "chosen": "yes", "rejected": "no"} for i in range(num_rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _start_preprocess_with_workers(tmp_path, source):
    """preprocess --num-proc 2 of ``source`` (still tokenizing when its two workers exist);
    returns (process, worker pids)."""
    import psutil
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "data_tools.preprocess", "--input", str(source),
                             "--output-prefix", str(tmp_path / "out" / "ds"), "--tokenizer",
                             "builtin:qa-words", "--max-seq-length", "4096", "--num-proc", "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        if len(workers) >= 2:
            time.sleep(1.0)  # let them start tokenizing
            return proc, workers
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"preprocess never had 2 workers: {proc.communicate()}")


def test_preprocess_ctrl_c_is_interrupted_and_kill_leaves_no_worker(tmp_path):
    import psutil
    import signal

    source = _slow_to_tokenize_source(tmp_path / "pairs.jsonl")
    proc, workers = _start_preprocess_with_workers(tmp_path / "int", source)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "preprocess: interrupted" in err, err[-3000:]
    assert "unexpected" not in err and not list((tmp_path / "int" / "out").glob("ds.*"))

    proc, workers = _start_preprocess_with_workers(tmp_path / "kill", source)
    proc.kill()  # kill -9 of preprocess itself
    proc.communicate(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status()
                                         != psutil.STATUS_ZOMBIE for p in workers):
        time.sleep(0.2)
    left = [p for p in workers if psutil.pid_exists(p)
            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"workers outlived preprocess: {left}"
