"""What a checkpoint is and whether its files are intact.

* **Checksums**: every file of a checkpoint gets a SHA-256 in ``checksums.json``, written after
  ``dist_checkpointing.save`` has finished and before the checkpoint is marked complete. Each rank
  hashes the shard files it wrote, so the cost is spread over the ranks. Load verifies them
  (the file list is split round-robin over the ranks) before ``dist_checkpointing`` reads a byte.
* **Weights fingerprint**: a cheap, layout-independent identity of a set of weight files (HF or
  Megatron): the names and sizes of the weight files plus a sample of their bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional

from solopo_mcore.errors import UserError

CHECKSUMS = "checksums.json"
_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")
_BLOCK = 1 << 20


class IntegrityError(UserError, RuntimeError):
    """A checkpoint or weight set fails its integrity check (the message names the file)."""


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def sampled_sha256(path, num_samples: int = 16, sample_bytes: int = 1 << 16) -> str:
    """SHA-256 of the size and ``num_samples`` evenly spaced blocks of a file (a cheap identity
    for large files whose contents differ everywhere when they differ at all)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= num_samples * sample_bytes:
            digest.update(f.read())
        else:
            step = (size - sample_bytes) // (num_samples - 1)
            for k in range(num_samples):
                f.seek(k * step)
                digest.update(f.read(sample_bytes))
    return digest.hexdigest()


# ------------------------------------------------------------------------------ checksums

def _payload_files(directory: Path, exclude: tuple) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name not in exclude)


def files_written_by(directory: Path, rank: int, exclude: tuple) -> list[str]:
    """The files of a finished ``dist_checkpointing`` save this rank hashes: its own
    ``__RANK_*.distcp`` shards; rank 0 also every other file (metadata, common state)."""
    mine = []
    for name in _payload_files(directory, exclude):
        match = _SHARD.match(Path(name).name)
        if (match and int(match.group(1)) == rank) or (not match and rank == 0):
            mine.append(name)
    return mine


def hash_files(directory: Path, names: list[str]) -> dict:
    return {name: {"sha256": sha256_file(directory / name),
                   "num_bytes": os.path.getsize(directory / name)} for name in names}


def complete_checksums(directory: Path, gathered: dict, exclude: tuple) -> dict:
    """Add any file no rank claimed (a shard naming this code does not know) to ``gathered``."""
    missing = [n for n in _payload_files(directory, exclude) if n not in gathered]
    return {**gathered, **hash_files(directory, missing)}


def write_checksums(directory: Path, table: dict) -> None:
    (directory / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": table},
                                                  indent=1, sort_keys=True))


def read_checksums(directory: Path) -> Optional[dict]:
    path = Path(directory) / CHECKSUMS
    if not path.is_file():
        return None
    return json.loads(path.read_text())["files"]


def verify_files(directory: Path, table: dict, rank: int, world: int) -> list[str]:
    """This rank's share (round-robin) of ``table``: a problem line per bad file."""
    problems = []
    for k, name in enumerate(sorted(table)):
        if k % world != rank:
            continue
        path = Path(directory) / name
        expected = table[name]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = os.path.getsize(path)
        if size != expected["num_bytes"]:
            problems.append(f"{path}: {size} bytes, {expected['num_bytes']} when saved "
                            f"(truncated or overwritten)")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{path}: SHA-256 differs from the one recorded at save time "
                            f"(the file was modified or corrupted)")
    return problems


# ------------------------------------------------------------------------------ fingerprints

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp")


def weights_fingerprint(path) -> str:
    """Identity of the weights under ``path`` (an HF model directory or a Megatron checkpoint
    ``iter_N`` directory): names, sizes and sampled bytes of its weight files."""
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                   if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not names:
        raise IntegrityError(f"{directory}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{sampled_sha256(directory / name)}\0".encode())
    return digest.hexdigest()
