"""Precompute DPO reference log-probs over a preprocessed dataset: parse -> build -> run -> close.

    torchrun --nproc-per-node G examples/precompute_ref_logprobs.py --config RECIPE.yaml \
        --output data/solopo.ref [key.sub=value ...]

The reference model is the policy's start: checkpoint.hf_init_dir or checkpoint.load_dir.
Writes OUTPUT.npy ([N, 4] by role) and OUTPUT.json (dataset fingerprint, model, layout).
"""

import argparse

from solopo_mcore.config import load_config
from solopo_mcore.errors import entry_point
from solopo_mcore.parallel.layout import destroy_parallel
from solopo_mcore.ref_logprobs import compute_reference


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (the training recipe)")
    parser.add_argument("--output", help="sidecar path (default: data.ref_logprobs_path)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.data_path=X")
    args = parser.parse_intermixed_args()
    # The sidecar is what this run writes: --output stands for data.ref_logprobs_path.
    extra = [f"data.ref_logprobs_path={args.output}"] if args.output else []
    config = load_config(args.config, args.overrides + extra)
    output = config.data.ref_logprobs_path
    if not output:
        parser.error("--output or data.ref_logprobs_path is required")
    try:
        compute_reference(config, output)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    with entry_point("precompute_ref_logprobs"):
        main()
