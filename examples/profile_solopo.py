"""Profile SoLoPO vs long-PO on your model and layout: parse -> build -> sweep -> report.

    torchrun --nproc-per-node G examples/profile_solopo.py --config RECIPE.yaml \
        --long-lengths 4096,8192,16384,32768 --short-tokens 1024 --find-max-len --out runs/profile

--modes lists variants, MODE[/shared|/unshared]; the default
solo,solo_both,long/unshared,long/shared compares SoLoPO and solo_both with long-PO without and
with shared prefixes. Writes results.json/.csv, time_vs_length.png, memory_vs_length.png and
summary.md (with the step-time and peak-memory ratios) to --out.
"""

import argparse

from solopo_mcore.errors import entry_point
from solopo_mcore.parallel.layout import destroy_parallel
from solopo_mcore.profiling.run import add_arguments, run


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_intermixed_args()
    try:
        run(args)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    with entry_point("profile_solopo"):
        main()
