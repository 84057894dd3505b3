"""Files on disk that several packages share and must trust: checkpoint storage (save, verify,
load, ``latest``), file integrity (hashes, checksums, weight fingerprints) and locks.

It sits below ``training``, ``convert``, ``evaluation``, ``ref_logprobs`` and ``data``, and
imports none of them."""
