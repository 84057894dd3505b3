"""Checks before a Slurm job launches anything: the recipe exists and loads, its TP x PP x CP and
batch fit nodes x GPUs per node, and the allocation's host list has that many nodes.
Prints the hosts, one per line (the first is the rendezvous host).

    python examples/slurm/preflight.py --recipe NAME --nodes 4 --gpus-per-node 8 \
        --nodelist 'gpu[01-04]' [--hosts-file FILE] [key=value ...]

Used by solopo_multinode.sbatch (also in its dry run, where Slurm need not be installed: the
host list is expanded here when ``scontrol`` is absent; ``--hosts-file`` takes scontrol's
expansion when it is there).
"""

import argparse
import re
import sys

from solopo_mcore.config import ConfigError, check_launch, load_config
from solopo_mcore.errors import entry_point


def expand_hostlist(nodelist: str) -> list:
    """Slurm's compact host list (``gpu[01-03,07],login1``) as host names; numeric ranges keep
    their zero padding."""
    hosts = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if match is None:
            hosts.append(item)
            continue
        prefix, ranges, rest = match.groups()
        if "[" in rest:
            raise ConfigError(f"host list {nodelist!r}: one bracket range per name is supported "
                              f"here; run where scontrol is installed")
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ConfigError(f"host list {nodelist!r}: {part!r} is not a numeric range")
            for number in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{number:0{len(lo)}d}{rest}")
    return hosts


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe file or name")
    parser.add_argument("--nodes", type=int, required=True, help="nodes of the allocation")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="ranks per node")
    parser.add_argument("--nodelist", required=True, help="SLURM_JOB_NODELIST")
    parser.add_argument("--hosts-file", help="hosts one per line (scontrol show hostnames); "
                                             "default: expand --nodelist here")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides")
    args = parser.parse_args(argv)
    config = load_config(args.recipe, args.overrides)
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError(f"--nodes {args.nodes} / --gpus-per-node {args.gpus_per_node}: both "
                          f"must be at least 1")
    check_launch(config, args.nodes * args.gpus_per_node)
    if args.hosts_file:
        hosts = [h for h in open(args.hosts_file).read().split() if h]
    else:
        hosts = expand_hostlist(args.nodelist)
    if len(hosts) != args.nodes:
        raise ConfigError(f"the host list {args.nodelist!r} names {len(hosts)} hosts but "
                          f"SLURM_NNODES is {args.nodes}; submit with sbatch --nodes "
                          f"{len(hosts)} or fix the host list")
    print("\n".join(hosts))
    return hosts


if __name__ == "__main__":
    with entry_point("slurm_preflight"):
        main(sys.argv[1:])
