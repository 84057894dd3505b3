"""fwd+bwd of the model core at a given layer shape: this project's Megatron GPTModel (torch SDPA
core attention, response-only logits) next to HF transformers' Qwen2 (sdpa, full logits).

Prints tokens/s, model TFLOP/s (solopo_mcore.profiling.flops: Megatron's convention, causal-halved
attention, logits only where computed) and peak memory for each, one sequence per step, the
median of --iters after one warm-up.

    python benchmarks/bench_model_core.py --shape qwen2.5-7b --layers 4 --seq 8192,32768 \
        --dtype bf16                                   # on a GPU
    python benchmarks/bench_model_core.py --shape small --seq 1024,2048 --dtype fp32   # on CPU
"""

import argparse
import json
import statistics
import time

import torch

SMALL = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 512,
         "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 2, "vocab_size": 32000, "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "max_position_embeddings": 131072,
         "tie_word_embeddings": False}


def peak_gib(sampler=None):
    from solopo_mcore.platform import device_memory_stats
    stats = device_memory_stats()
    if stats:
        return stats["memory/max_allocated_gib"]
    return sampler.peak_gib if sampler else float("nan")


def measure(step, iters):
    from solopo_mcore.platform import reset_peak_memory, synchronize as sync
    from solopo_mcore.profiling.memory import PeakRSSSampler
    step()  # warm-up
    sync()
    reset_peak_memory()
    times = []
    with PeakRSSSampler() as sampler:
        for _ in range(iters):
            start = time.time()
            step()
            sync()
            times.append(time.time() - start)
    return statistics.median(times), peak_gib(sampler)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=["small", "qwen2.5-7b"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", default="1024,2048")
    parser.add_argument("--response-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--attention-backend", default="auto",
                        choices=["auto", "cudnn", "flash", "efficient", "math"],
                        help="ModelConfig.attention_backend for our model (auto: math on CPU)")
    parser.add_argument("--out", help="append JSON lines here")
    args = parser.parse_args()

    from solopo_mcore.config import ModelConfig, ParallelConfig
    from solopo_mcore.models.builder import build_model_chunks
    from solopo_mcore.models.hf_config import shape_from_dict
    from solopo_mcore.models.reference_configs import QWEN25_7B_INSTRUCT
    from solopo_mcore.parallel.layout import initialize_parallel
    from solopo_mcore.platform import default_device, empty_cache
    from solopo_mcore.profiling.flops import training_step_flops
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(QWEN25_7B_INSTRUCT if args.shape == "qwen2.5-7b" else SMALL)
    raw["num_hidden_layers"] = args.layers
    shape = shape_from_dict(raw)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pg_collection = initialize_parallel(ParallelConfig(), seed=0)
    device = default_device()  # after initialize_parallel, which binds the process to its GPU
    model = build_model_chunks(shape, ModelConfig(params_dtype=args.dtype,
                                                  attention_backend=args.attention_backend),
                               ParallelConfig(), pg_collection)[0].to(device)
    hf = None
    if not args.skip_hf:
        hf_cfg = AutoConfig.for_model("qwen2", **{k: v for k, v in raw.items()
                                                  if k != "model_type"})
        hf_cfg._attn_implementation = "sdpa"
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).to(device)
        hf.gradient_checkpointing_disable()
    rows = []
    for seq in [int(s) for s in args.seq.split(",")]:
        ids = torch.randint(0, shape.vocab_size, (1, seq), device=device)
        labels = torch.roll(ids, -1, dims=1)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, seq - args.response_tokens - 1:seq - 1] = True

        def ours():
            model.zero_grad(set_to_none=True)
            model(ids, None, None, labels=labels, loss_mask=mask).sum().backward()

        def theirs():
            hf.zero_grad(set_to_none=True)
            logits = hf(ids).logits.float()
            torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0][mask] \
                .sum().backward()

        ours_name = f"megatron+sdpa[{args.attention_backend}] (response-only logits)"
        for name, step, logit_tokens in ((ours_name, ours, args.response_tokens),
                                         ("hf transformers qwen2 sdpa (full logits)", theirs,
                                          seq)):
            if step is theirs and hf is None:
                continue
            try:
                seconds, peak = measure(step, args.iters)
            except torch.OutOfMemoryError:
                rows.append({"impl": name, "seq": seq, "oom": True})
                print(f"{name:52s} seq {seq:7d}: out of memory", flush=True)
                continue
            finally:
                empty_cache()
            flops = training_step_flops(shape, [(seq, logit_tokens)])
            row = {"impl": name, "seq": seq, "attention_backend": args.attention_backend,
                   "layers": args.layers, "shape": args.shape, "dtype": args.dtype, "step_sec": seconds, "tokens_per_sec": seq / seconds,
                   "model_tflops": flops / seconds / 1e12, "peak_gib": peak, "device": str(device)}
            rows.append(row)
            print(f"{name:52s} seq {seq:7d}: {seconds:8.3f} s  {seq / seconds:9.0f} tok/s  "
                  f"{flops / seconds / 1e12:7.2f} TFLOP/s  peak {peak:6.2f} GiB", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
