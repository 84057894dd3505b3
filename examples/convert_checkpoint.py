"""Convert checkpoints between Hugging Face and Megatron-Core (dist_checkpointing).

    python examples/convert_checkpoint.py hf-to-mcore --src HF_DIR --dst MCORE_DIR [--tp N --pp N] [--verify]
    python examples/convert_checkpoint.py mcore-to-hf --src MCORE_DIR --dst HF_DIR [--verify]
    python examples/convert_checkpoint.py gguf-to-hf --src MODEL.gguf --dst HF_DIR [--dtype bf16]

gguf-to-hf needs the optional extra (pip install -e ".[gguf]"): transformers' own GGUF loader
dequantizes the file; the folder records it in gguf_import.json.

With --tp/--pp > 1 and no torchrun environment, the script relaunches itself under torchrun.
--verify compares float32 logits with transformers on random tokens and fails above --tolerance.
Memory: one layer at a time in either direction (docs/design.md, "Conversion in bounded memory").
"""

import argparse
import json
import os
import sys

from solopo_mcore.errors import entry_point


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf", "gguf-to-hf"],
                        help="hf-to-mcore: HF directory -> dist_checkpointing checkpoint; "
                             "mcore-to-hf: the reverse; gguf-to-hf: a llama.cpp GGUF file -> "
                             "HF directory (Llama, Qwen2)")
    parser.add_argument("--src", required=True,
                        help="source: an HF model directory, or a Megatron checkpoint "
                             "(iteration folder or save_dir with 'latest')")
    parser.add_argument("--dst", required=True,
                        help="destination directory (must not be, contain or lie inside --src)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert at")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert at")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                        help="parameter dtype (hf-to-mcore default: the HF config's dtype; "
                             "mcore-to-hf default: the checkpoint's; gguf-to-hf default: fp32, "
                             "which holds every dequantized value exactly)")
    parser.add_argument("--hf-config", help="mcore-to-hf: HF directory for the architecture and "
                                            "tokenizer files (default: recorded in the checkpoint)")
    parser.add_argument("--verify", action="store_true",
                        help="compare logits with transformers before the result replaces --dst "
                             "(gguf-to-hf: read the written folder back and compare every "
                             "tensor bit for bit)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="--verify: largest allowed |logit difference| (default: 1e-3)")
    parser.add_argument("--verify-tokens", type=int, default=64,
                        help="--verify: tokens per random sequence (default: 64); past a scaled "
                             "model's original positions (YaRN, llama3) to check the scaling "
                             "where it matters")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="mcore-to-hf, gguf-to-hf: largest safetensors file in GB (default: "
                             "5, as transformers; mcore-to-hf streams, so memory stays the same)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --dst, once the new one is complete "
                             "(and verified)")
    args = parser.parse_args()
    if args.tp < 1 or args.pp < 1:
        parser.error("--tp and --pp must be at least 1")
    if args.max_shard_gb <= 0:
        parser.error("--max-shard-gb must be positive")
    if args.verify_tokens < 2:
        parser.error("--verify-tokens must be at least 2")
    if args.verify_tokens != 64 and not args.verify:
        parser.error("--verify-tokens applies to --verify only; add --verify")
    if args.direction == "hf-to-mcore":
        for flag, value, default in (("--hf-config", args.hf_config, None),
                                     ("--max-shard-gb", args.max_shard_gb, 5.0)):
            if value != default:
                parser.error(f"{flag} applies to mcore-to-hf only")
    if args.direction == "gguf-to-hf":
        for flag, value, default in (("--tp", args.tp, 1), ("--pp", args.pp, 1),
                                     ("--hf-config", args.hf_config, None),
                                     ("--tolerance", args.tolerance, 1e-3),
                                     ("--verify-tokens", args.verify_tokens, 64)):
            if value != default:
                parser.error(f"{flag} does not apply to gguf-to-hf (one process, no Megatron "
                             f"model; --verify compares tensors bit for bit)")
    return args


def main():
    args = parse_args()
    if args.direction == "gguf-to-hf":
        from solopo_mcore.convert.gguf_import import gguf_to_hf
        report = gguf_to_hf(args.src, args.dst, args.dtype or "fp32", args.overwrite,
                            args.verify, max_shard_bytes=int(args.max_shard_gb * 1e9))
        print(json.dumps(report, indent=2))
        return
    world = args.tp * args.pp
    if world > 1 and "RANK" not in os.environ:  # relaunch under torchrun, if the layout fits
        from solopo_mcore.convert.commands import check_layout_before_launch
        check_layout_before_launch(args.direction, args.src, args.hf_config, args.tp, args.pp)
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run",
                                  f"--nproc-per-node={world}", *sys.argv])
    from solopo_mcore.convert import commands
    from solopo_mcore.parallel.layout import destroy_parallel, init_distributed

    init_distributed()
    try:
        if args.direction == "hf-to-mcore":
            report = commands.hf_to_mcore(args.src, args.dst, args.tp, args.pp, args.dtype,
                                          args.verify, args.tolerance, args.overwrite,
                                          verify_tokens=args.verify_tokens)
        else:
            report = commands.mcore_to_hf(args.src, args.dst, args.tp, args.pp, args.hf_config,
                                          args.verify, args.tolerance, args.overwrite, args.dtype,
                                          max_shard_bytes=int(args.max_shard_gb * 1e9),
                                          verify_tokens=args.verify_tokens)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(report, indent=2))
    finally:
        destroy_parallel()


if __name__ == "__main__":
    with entry_point("convert_checkpoint"):
        main()
