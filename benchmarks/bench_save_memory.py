"""Checkpoint save memory against training memory, per rank, at a real model's shape on CPU:
this project's save (optimizer state one parameter at a time, one tensor written at a time)
against megatron-core's own (its ``fully_reshardable`` gather and its writer). A benchmark, not
a test (tests/test_save_memory.py checks the files are the same); figures go in RESULTS.md.

    python benchmarks/bench_save_memory.py                     # SmolLM2-135M shape, DP1 and DP2
    python benchmarks/bench_save_memory.py --nproc 2 --shape smollm2-135m --layers 30

The model has random weights from the shape's config (no download); the data is the learnable QA
task (629-word vocabulary, 192-token long contexts). Each arm trains 2 steps and saves after
each; printed per rank: the training peak before the first save (VmHWM), the peak during each
save (sampled every ms) and the save's wall time.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"\[save-memory\] rank (\d) step (\d) training_peak_gib ([\d.]+) "
                  r"save_peak_gib ([\d.]+) save_s ([\d.]+)")


def _rank_main(argv: list) -> None:
    """Inside torchrun: the trainer, with each checkpoint save measured."""
    import os
    import time

    if argv[0] == "--megatron":  # megatron-core's own optimizer gather and writer
        argv = argv[1:]
        from solopo_mcore.storage import checkpoint as ck
        ck.optimizer_state_for_save = lambda opt, sharded, meta: opt.sharded_state_dict(
            sharded, metadata=meta)
        ck.OneTensorAtATimeSave = lambda: None
    from solopo_mcore.profiling.memory import PeakRSSSampler, peak_rss_bytes
    from solopo_mcore.storage.checkpoint import CheckpointManager

    original = CheckpointManager.save

    def measured(self, step, *args, **kwargs):
        training_peak = peak_rss_bytes() / 2 ** 30
        start = time.time()
        with PeakRSSSampler(0.001) as sampler:
            out = original(self, step, *args, **kwargs)
        print(f"[save-memory] rank {os.environ['RANK']} step {step} training_peak_gib "
              f"{training_peak:.2f} save_peak_gib {sampler.peak_gib:.2f} save_s "
              f"{time.time() - start:.1f}", flush=True)
        return out

    CheckpointManager.save = measured
    sys.argv = ["examples/pretrain_solopo.py", *argv]
    import runpy
    runpy.run_path(str(REPO / "examples" / "pretrain_solopo.py"), run_name="__main__")


def _data(root: Path) -> str:
    from data_tools import build_triplets, learnable_qa, preprocess, sample_pairs
    qa, triplets, pairs = root / "qa.jsonl", root / "triplets.jsonl", root / "pairs.jsonl"
    learnable_qa.main(["--num-examples", "16", "--out", str(qa), "--long-tokens", "192"])
    build_triplets.main(["--input", str(qa), "--output", str(triplets), "--tokenizer",
                         "builtin:qa-words", "--target-long-tokens", "192",
                         "--distractor-pool", "none"])
    sample_pairs.main(["--backend", "rule", "--num-samples", "4", "--input", str(triplets),
                       "--output", str(pairs)])
    preprocess.main(["--input", str(pairs), "--output-prefix", str(root / "qa"), "--tokenizer",
                     "builtin:qa-words", "--max-seq-length", "512", "--num-proc", "1"])
    return str(root / "qa")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        return _rank_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", help="a reference config's name")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    from solopo_mcore.models.reference_configs import BY_NAME
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prefix = _data(root)
        config = dict(BY_NAME[args.shape], torch_dtype="float32")
        if args.layers:
            config["num_hidden_layers"] = args.layers
        (root / "model").mkdir()
        (root / "model" / "config.json").write_text(json.dumps(config))
        print(f"shape {args.shape}, {config['num_hidden_layers']} layers, fp32, distributed "
              f"optimizer")
        print("| ranks | save | rank | training peak GiB | save peak GiB | save s |")
        print("|---|---|---|---|---|---|")
        for nproc in args.nproc:
            for arm in ("ours", "megatron"):
                run = root / f"{arm}{nproc}"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={nproc}", __file__, "--rank",
                       *(["--megatron"] if arm == "megatron" else []),
                       "--config", "smollm2-135m_cpu", f"model.hf_config_path={root / 'model'}",
                       f"data.data_path={prefix}", "training.train_steps=2",
                       "data.global_batch_size=2", "checkpoint.save_interval=1",
                       f"checkpoint.save_dir={run}", "training.eval_interval=0",
                       "data.num_eval_examples=0", f"logging.metrics_path={run}.jsonl"]
                out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                rows = LINE.findall(out.stdout)
                if out.returncode or not rows:
                    print(f"{arm} at {nproc} ranks failed:\n{out.stdout[-2000:]}"
                          f"{out.stderr[-2000:]}")
                    continue
                for rank, step, train_peak, save_peak, save_s in sorted(rows):
                    if step == "1":
                        print(f"| {nproc} | {arm} | {rank} | {train_peak} | {save_peak} | "
                              f"{save_s} |")


if __name__ == "__main__":
    main()
