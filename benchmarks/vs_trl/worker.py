"""One timed training run, ours or TRL's, in its own process: ``python -m
benchmarks.vs_trl.worker SPEC.json``. Writes ``spec["out"]`` (JSON): per-step wall seconds
(from one step's end to the next's, everything the loop does), per-step logged figures, tokens
per step and the process's peak RSS. For the correctness check, TRL's worker also writes the
token ids its own tokenization produced for the examples it trained on, which the benchmark
compares with ours after every TRL run.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_ours(spec: dict) -> dict:
    """Our trainer, one process (world size 1), the steps of Trainer.train() without eval,
    saves or export."""
    from solopo_mcore.config import load_config
    from solopo_mcore.training.trainer import Trainer

    overrides = [*spec["overrides"], "data.shuffle=false", "data.num_eval_examples=0",
                 f"data.shared_prefix={str(spec['shared_prefix']).lower()}",
                 f"objective.mode={spec['mode']}", f"training.train_steps={spec['steps']}",
                 "logging.progress_bar=false"]
    if spec.get("recompute"):
        overrides.append("model.recompute_granularity=full")
    if spec.get("ref_path"):
        overrides.append(f"data.ref_logprobs_path={spec['ref_path']}")
    trainer = Trainer(load_config(None, overrides))
    steps = []
    try:
        last = time.perf_counter()
        while trainer.step < spec["steps"]:
            metrics = trainer.train_step()
            now = time.perf_counter()
            steps.append({"seconds": now - last, "tokens": metrics["throughput/tokens_per_step"],
                          "logged": {k: v for k, v in metrics.items()
                                     if k.split("/")[0] in ("loss", "logps", "reward")}})
            last = now
    finally:
        trainer.close()
    return {"steps": steps}


class _StepClock:
    """A TrainerCallback recording each step's end (and the logged figures)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def __init__(self):
                self.ends = []

            def on_train_begin(self, args, state, control, **kwargs):
                self.ends.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                self.ends.append(time.perf_counter())
        return Clock()


def _trl_tokens(trainer, algorithm: str, count: int) -> list:
    """(prompt, chosen, rejected) token ids of the first ``count`` examples as TRL tokenized
    them (after its own EOS handling)."""
    data = trainer.train_dataset
    out = []
    for i in range(min(count, len(data))):
        row = data[i]
        if algorithm == "dpo":
            out.append([row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]])
        else:  # CPO / ORPO: labels are -100 over the prompt
            prompt = row["prompt_input_ids"]
            out.append([prompt, row["chosen_input_ids"][len(prompt):],
                        row["rejected_input_ids"][len(prompt):]])
    return out


def _response_nll_orpo(trainer_cls):
    """TRL's ORPOTrainer with our NLL term: the chosen response's mean NLL (TRL's own mean
    log-prob of the chosen response, which carries the gradient) instead of TRL's cross-entropy
    over prompt and response. TRL's value is still logged, as ``nll_loss_as_shipped``. Used by
    the check only, so that steps after the first compare the same objective; timing runs TRL as
    shipped."""

    class ResponseNLLORPOTrainer(trainer_cls):
        def concatenated_forward(self, model, batch):
            out = super().concatenated_forward(model, batch)
            self.store_metrics({"nll_loss_as_shipped": out[4].detach().item()})
            return (*out[:4], -out[0].mean(), *out[5:])

    return ResponseNLLORPOTrainer


def run_trl(spec: dict) -> dict:
    """TRL's trainer for the algorithm, on the same HF model and pairs, as text (TRL tokenizes)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from benchmarks.vs_trl.conventions import Hyper, trl_setup

    hyper = Hyper.from_dict(spec["hyper"])
    from data_tools.tokenizer import load_tokenizer

    # the tokenizer preprocess used: AutoTokenizer would rebuild a word-level tokenizer
    # (builtin:qa-words) as merge-less BPE and split its words into characters
    tokenizer = load_tokenizer(spec["model_dir"])
    rows = []
    for row in spec["rows"]:  # the standard (not conversational) format: prompt text with the
        prompt = tokenizer.apply_chat_template(  # chat template applied, as our preprocess does
            [{"role": "user", "content": row["prompt_long"]}], add_generation_prompt=True,
            tokenize=False)
        rows.append({"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]})
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    common = dict(output_dir=spec["work_dir"], per_device_train_batch_size=1,
                  gradient_accumulation_steps=1, max_steps=spec["steps"], logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
                  dataloader_num_workers=0, train_sampling_strategy="sequential",
                  optim="adamw_torch", disable_tqdm=True, dataset_num_proc=None,
                  # TRL 1.16's default is on; the timing runs set it both ways
                  gradient_checkpointing=spec.get("recompute") is not False)
    trainer_cls, config_cls, kwargs = trl_setup(hyper, spec["max_length"], common)
    algorithm = hyper.objective.algorithm
    if algorithm == "orpo" and spec.get("orpo_nll") == "response":
        trainer_cls = _response_nll_orpo(trainer_cls)
    clock = _StepClock()
    trainer = trainer_cls(model=model, args=config_cls(**kwargs),
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[clock])
    tokens = _trl_tokens(trainer, algorithm, spec["steps"])  # what it trains on
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    seconds = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    per_example = [len(p) * 2 + len(c) + len(r) for p, c, r in tokens]
    steps = [{"seconds": s, "tokens": per_example[i % len(per_example)], "logged": logged[i]}
             for i, s in enumerate(seconds)]
    return {"steps": steps, "trl_tokens": tokens}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    result = run_ours(spec) if spec["side"] == "ours" else run_trl(spec)
    result.update(peak_rss_gib=_peak_rss_gib(), process_seconds=time.perf_counter() - start,
                  threads=torch.get_num_threads())
    tmp = Path(spec["out"] + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, spec["out"])


if __name__ == "__main__":
    main()
