"""The on-disk triplet dataset format, written by ``data_tools.preprocess`` and read by
:class:`solopo_mcore.data.dataset.TripletDataset` from these same definitions.

``PREFIX.bin/.idx`` is a Megatron indexed dataset: example ``i`` is document ``i``, holding
:data:`SEQUENCES_PER_EXAMPLE` token sequences in that order. ``PREFIX.meta.json`` (written last)
holds the keys named below. A training *segment* is a prompt followed by a response; the four
segments of an example are indexed by :class:`solopo_mcore.roles.Role`.
"""

from __future__ import annotations

import os

from solopo_mcore.storage.integrity import sampled_sha256, sha256_file

FORMAT = "solopo-triplets-v1"
"""``meta["format"]`` of the datasets this version reads and writes."""

SEQUENCES_PER_EXAMPLE = ("short_prompt", "long_prompt", "chosen", "rejected")
"""The token sequences of one example (one indexed-dataset document), in order."""


# Keys of PREFIX.meta.json that the reader relies on (preprocess writes more: lengths, report).
META_FORMAT, META_SEQUENCES, META_NUM_EXAMPLES = "format", "sequences_per_example", "num_examples"
META_FINGERPRINT, META_FILE_CHECKS = "fingerprint", "file_checks"
META_PAD_TOKEN_ID, META_VOCAB_SIZE, META_EXAMPLE_IDS = "pad_token_id", "vocab_size", "example_ids"


def file_checks(prefix: str) -> dict:
    """What ``.meta.json`` records to tie itself to its ``.bin``/``.idx``: the ``.bin`` size, a
    sampled hash of it, and the (small) ``.idx``'s full SHA-256."""
    return {"bin_num_bytes": os.path.getsize(prefix + ".bin"),
            "bin_sampled_sha256": sampled_sha256(prefix + ".bin"),
            "idx_sha256": sha256_file(prefix + ".idx")}
