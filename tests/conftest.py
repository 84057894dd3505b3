"""Shared fixtures: offline mode, tiny HF models written once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

#: A test whose call takes longer than this states why, with ``@pytest.mark.slow(reason=...)``
#: (docs/testing.md); the session's summary names those that do not.
SLOW_TEST_S = 60.0
_UNEXPLAINED_SLOW: list = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.duration > SLOW_TEST_S and \
            item.get_closest_marker("slow") is None:
        _UNEXPLAINED_SLOW.append((report.duration, item.nodeid))


def pytest_terminal_summary(terminalreporter):
    if _UNEXPLAINED_SLOW:
        terminalreporter.write_sep("=", f"tests over {SLOW_TEST_S:.0f} s without a stated reason")
        for seconds, nodeid in sorted(_UNEXPLAINED_SLOW, reverse=True):
            terminalreporter.write_line(f"{seconds:7.1f} s  {nodeid}  (add @pytest.mark.slow("
                                        f"reason=...) or make it cheaper: docs/testing.md)")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """Qwen2-shaped (GQA, QKV bias, tied embeddings, vocab 1000 -> padded 1024), fp32."""
    from solopo_mcore.models.tiny import build_tiny_hf_model
    path = tmp_path_factory.mktemp("tiny_qwen2")
    build_tiny_hf_model(path, "qwen2", vocab_size=1000, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen2_untied(tmp_path_factory):
    from solopo_mcore.models.tiny import build_tiny_hf_model
    path = tmp_path_factory.mktemp("tiny_qwen2_untied")
    build_tiny_hf_model(path, "qwen2", vocab_size=1000, seed=1,
                        overrides={"tie_word_embeddings": False})
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Llama 3.1-shaped (GQA, llama3 RoPE scaling, untied)."""
    from solopo_mcore.models.tiny import build_tiny_hf_model
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_hf_model(path, "llama", vocab_size=1000, seed=2)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen2_yarn(tmp_path_factory):
    """Qwen2 with YaRN as Qwen2.5 documents it, scaled down: 256 trained positions, factor 4,
    so 1,024 usable; the tests run it past 256."""
    from solopo_mcore.models.tiny import TINY_YARN_OVERRIDES, build_tiny_hf_model
    path = tmp_path_factory.mktemp("tiny_qwen2_yarn")
    build_tiny_hf_model(path, "qwen2", vocab_size=1000, seed=4, overrides=TINY_YARN_OVERRIDES)
    return str(path)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2.5 vocabulary, rebuilt offline from dashscope's qwen.tiktoken."""
    from data_tools.tokenizer import load_tokenizer
    return load_tokenizer("builtin:qwen2.5")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory, qwen_tokenizer):
    """The demo pipeline on a small scale: synthetic MuSiQue -> triplets (512-token long
    contexts, Wikipedia distractors) -> rule pairs -> indexed dataset; plus a tiny Qwen2 model
    with the real vocabulary. Returns a dict of paths."""
    from data_tools import build_triplets, preprocess, synthetic
    from data_tools.sample_pairs import main as sample_pairs_main
    from solopo_mcore.models.tiny import build_tiny_hf_model

    root = tmp_path_factory.mktemp("demo_data")
    musique = root / "musique.jsonl"
    synthetic.main(["--num-examples", "40", "--out", str(musique), "--seed", "3"])
    build_triplets.run(str(musique), str(root / "triplets.jsonl"), "builtin:qwen2.5", 512,
                       "builtin:wiki", seed=0)
    sample_pairs_main(["--backend", "rule", "--num-samples", "6", "--input",
                       str(root / "triplets.jsonl"), "--output", str(root / "pairs.jsonl")])
    model_dir = root / "hf_init"
    build_tiny_hf_model(model_dir, "qwen2", vocab_size=len(qwen_tokenizer), seed=0,
                        tokenizer=qwen_tokenizer)
    preprocess.run(str(root / "pairs.jsonl"), str(root / "solopo"), "builtin:qwen2.5", 1024,
                   num_proc=1, model_config=str(model_dir))
    return {"root": root, "musique": musique, "triplets": root / "triplets.jsonl",
            "pairs": root / "pairs.jsonl", "prefix": str(root / "solopo"), "model": model_dir}


@pytest.fixture(scope="session")
def convergence_inputs(tmp_path_factory):
    """The learnable QA task through the real data pipeline (60 examples, 192-token long
    contexts, builtin:qa-words) and a tiny 4-layer Qwen2 with redrawn weights, for the whole-run
    convergence tests (tests/helpers/convergence.py). Returns paths and digests."""
    from tests.helpers.convergence import build_inputs
    return build_inputs(tmp_path_factory.mktemp("convergence"))


@pytest.fixture(scope="session")
def run_data(convergence_inputs):
    """A dataset and model for tests that need *a* training run (resume, signals, restarts,
    checkpoints, exports): the convergence inputs above, whose 629-word vocabulary makes a
    step ~10x cheaper than ``demo_data``'s 151,665-token Qwen vocabulary. Same keys as
    ``demo_data`` for ``tiny_run_overrides`` ("model", "prefix"). Read only: runs write into
    their own folders."""
    return convergence_inputs
