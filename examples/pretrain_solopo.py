"""Train with SoLoPO (or a baseline) on Megatron-Core: parse -> build -> train -> close.

    torchrun --nproc-per-node G examples/pretrain_solopo.py --config RECIPE.yaml [key.sub=value ...]
"""

import argparse

from solopo_mcore.config import load_config
from solopo_mcore.errors import entry_point
from solopo_mcore.training.trainer import Trainer


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a recipe: a YAML file, or the name of one shipped in "
                                         "solopo_mcore/recipes (e.g. tiny_cpu, qwen2.5-7b_solo-orpo_8gpu)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.alpha=3")
    return parser.parse_intermixed_args()


def main():
    args = parse_args()
    config = load_config(args.config, args.overrides)  # validated before any process group
    trainer = Trainer(config)
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    with entry_point("pretrain_solopo"):
        main()
