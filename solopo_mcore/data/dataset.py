"""The preprocessed triplet dataset (``data_tools.preprocess`` output) and its reference sidecar."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from solopo_mcore.data.packing import TripletTokens
from solopo_mcore.errors import UserError
from solopo_mcore.data.schema import (FORMAT, META_EXAMPLE_IDS, META_FILE_CHECKS,
                                      META_FINGERPRINT, META_FORMAT, META_NUM_EXAMPLES,
                                      META_PAD_TOKEN_ID, META_SEQUENCES, SEQUENCES_PER_EXAMPLE)
from solopo_mcore.log import warn
from solopo_mcore.storage.integrity import sampled_sha256, sha256_file


class DatasetError(UserError, ValueError):
    pass


def check_files_against_meta(prefix: str, meta: dict) -> None:
    """Refuse a ``.bin``/``.idx`` that is not the one its ``.meta.json`` was written for."""
    recorded = meta.get(META_FILE_CHECKS)
    truncated = idx_truncation(prefix + ".idx")
    if truncated:
        raise DatasetError(f"{prefix}.idx is truncated: {truncated}; it was cut short (an "
                           f"interrupted copy or a full disk). Copy it again from where the "
                           f"dataset was built, or preprocess again.")
    if recorded is None:
        warn("data", f"{prefix}.meta.json has no file_checks (written by an older "
                     f"preprocess): .bin/.idx identity not verified")
        return
    fix = "Copy the three files of one preprocess run together, or preprocess again."
    if any(os.path.exists(prefix + ext + ".previous") for ext in (".bin", ".idx", ".meta.json")):
        fix += (f" A preprocess run stopped while replacing this dataset: {prefix}.*.previous "
                f"are the whole previous set (rename them back to use it).")
    size = os.path.getsize(prefix + ".bin")
    if size != recorded["bin_num_bytes"]:
        raise DatasetError(f"{prefix}.bin holds {size} bytes, but {prefix}.meta.json records "
                           f"{recorded['bin_num_bytes']}: the .bin is truncated or from another "
                           f"dataset. {fix}")
    if sha256_file(prefix + ".idx") != recorded["idx_sha256"]:
        raise DatasetError(f"{prefix}.idx is not the index {prefix}.meta.json was written with "
                           f"(SHA-256 differs): it belongs to another dataset. {fix}")
    if sampled_sha256(prefix + ".bin") != recorded["bin_sampled_sha256"]:
        raise DatasetError(f"{prefix}.bin does not match {prefix}.meta.json (sampled SHA-256 "
                           f"differs): it was modified or belongs to another dataset. {fix}")


def idx_truncation(path: str) -> Optional[str]:
    """How a Megatron ``.idx`` is shorter than its own header says (``"N bytes, its header
    describes M"``), or None when it is whole. Layout (megatron-core's ``_IndexReader``): a 9-byte
    magic, version (8), dtype code (1), sequence count (8), document count (8), then int32
    lengths and int64 pointers per sequence and int64 document indices."""
    size = os.path.getsize(path)
    header = 9 + 8 + 1 + 8 + 8
    if size < header:
        return f"{size} bytes, shorter than the {header}-byte header"
    with open(path, "rb") as f:
        if f.read(9) != b"MMIDIDX\x00\x00":
            return None  # not a truncation: the SHA-256 check names it
        f.seek(9 + 8 + 1)
        num_sequences, num_documents = struct.unpack("<QQ", f.read(16))
    expected = header + 12 * num_sequences + 8 * num_documents
    if size < expected:
        return (f"{size} bytes, its header describes {expected} ({num_sequences} sequences, "
                f"{num_documents} document offsets)")
    return None


class TripletDataset:
    """Random access to examples of ``PREFIX.bin/.idx`` (Megatron ``IndexedDataset``, mmap).

    Example ``i`` is document ``i``: four sequences (short prompt, long prompt, chosen,
    rejected). ``ref_logp`` ([N, 4] float32, by Role) is attached when a sidecar is loaded."""

    def __init__(self, prefix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        meta_path = Path(self.prefix + ".meta.json")
        for ext in (".bin", ".idx"):
            if not Path(self.prefix + ext).is_file():
                raise DatasetError(f"dataset {self.prefix!r}: {self.prefix + ext} is missing")
        if not meta_path.is_file():
            raise DatasetError(f"dataset {self.prefix!r}: {meta_path} is missing (preprocess "
                               f"writes it last; the dataset is incomplete)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get(META_FORMAT) != FORMAT:
            raise DatasetError(f"{meta_path}: format {self.meta.get(META_FORMAT)!r}, expected "
                               f"{FORMAT}; preprocess the data again with this version")
        order = tuple(self.meta.get(META_SEQUENCES, SEQUENCES_PER_EXAMPLE))
        if order != SEQUENCES_PER_EXAMPLE:
            raise DatasetError(f"{meta_path}: sequences {order}, expected {SEQUENCES_PER_EXAMPLE}")
        if not self.meta.get(META_NUM_EXAMPLES) or not os.path.getsize(self.prefix + ".bin"):
            report = self.meta.get("report", {})
            raise DatasetError(
                f"dataset {self.prefix!r} is empty: 0 examples (built by data_tools.preprocess "
                f"from {self.meta.get('source', '?')}, which read {report.get('read', '?')} rows "
                f"and skipped {report.get('skipped', '?')}). Fix the input or preprocess's "
                f"--max-seq-length, and preprocess again.")
        check_files_against_meta(self.prefix, self.meta)
        self.indexed = IndexedDataset(self.prefix, multimodal=False, mmap=True)
        documents = self.indexed.document_indices
        if len(documents) - 1 != self.meta[META_NUM_EXAMPLES]:
            raise DatasetError(f"dataset {self.prefix!r}: {len(documents) - 1} documents but meta "
                               f"says {self.meta[META_NUM_EXAMPLES]} examples")
        if not np.all(np.diff(documents) == len(SEQUENCES_PER_EXAMPLE)):
            raise DatasetError(f"dataset {self.prefix!r}: every document must hold "
                               f"{len(SEQUENCES_PER_EXAMPLE)} sequences")
        index = self.indexed.index
        expected = int(index.sequence_pointers[-1]) + \
            int(index.sequence_lengths[-1]) * index.dtype_size
        actual = os.path.getsize(self.prefix + ".bin")
        if actual != expected:
            raise DatasetError(f"{self.prefix}.bin holds {actual} bytes but {self.prefix}.idx "
                               f"describes {expected}: the .bin is truncated or from another "
                               f"dataset. Preprocess again.")
        self.ref_logp: Optional[np.ndarray] = None
        self.reference_fingerprint: Optional[str] = None

    def check_max_length(self, shape) -> None:
        """Refuse an example whose longest segment (prompt + response) the model cannot
        position (``shape.usable_positions``: max_position_embeddings, or YaRN's scaled limit),
        naming the first such example and both fixes (YaRN, or shorter data)."""
        from solopo_mcore.models.positions import position_limit_fix, position_limit_text

        limit = shape.usable_positions
        lengths = np.asarray(self.indexed.sequence_lengths, dtype=np.int64).reshape(-1, 4)
        longest = np.maximum(lengths[:, 0], lengths[:, 1]) + np.maximum(lengths[:, 2],
                                                                         lengths[:, 3])
        over = np.flatnonzero(longest > limit)
        if len(over):
            i = int(over[0])
            ids = self.meta.get(META_EXAMPLE_IDS) or []
            name = f"example {i}" + (f" (id {ids[i]!r})" if i < len(ids) else "")
            raise DatasetError(
                f"dataset {self.prefix!r}: {name} has a {int(longest[i])}-token segment, longer "
                f"than the model's {position_limit_text(shape)} ({len(over)} examples are). "
                f"Fix: " + position_limit_fix(
                    shape, int(longest.max()), f"preprocess again with --model-config and "
                    f"--max-seq-length {limit}"))

    @property
    def fingerprint(self) -> str:
        return self.meta[META_FINGERPRINT]

    @property
    def pad_token_id(self) -> int:
        return int(self.meta.get(META_PAD_TOKEN_ID, 0))

    def __len__(self) -> int:
        return int(self.meta[META_NUM_EXAMPLES])

    def __getitem__(self, index: int) -> TripletTokens:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range [0, {len(self)})")
        n = len(SEQUENCES_PER_EXAMPLE)
        short, long_, chosen, rejected = (self.indexed[n * index + k].tolist() for k in range(n))
        ref = None if self.ref_logp is None else self.ref_logp[index].tolist()
        return TripletTokens(short, long_, chosen, rejected, index=index, ref_logp_sum=ref)

    def attach_reference(self, path: str, start_weights: Optional[str] = None,
                         start_fingerprint: Optional[str] = None) -> None:
        """Load a reference log-prob sidecar, refusing one made for another dataset, or (when
        ``start_fingerprint`` is given: a run starting from ``start_weights``) one computed with
        other reference weights."""
        ref, meta = load_reference_sidecar(path)
        if start_fingerprint is not None:
            recorded = meta.get("model_fingerprint")
            if recorded is None:
                warn("data", f"reference sidecar {path!r} records no model fingerprint "
                             f"(older version): not checked against {start_weights}")
            elif recorded != start_fingerprint:
                raise DatasetError(
                    f"reference sidecar {path!r} was computed with the weights of "
                    f"{meta.get('model', '?')} (fingerprint {recorded[:12]}...), but this run "
                    f"starts from {start_weights} (fingerprint {start_fingerprint[:12]}...): DPO's "
                    f"reference must be the policy's starting point. Recompute it with "
                    f"examples/precompute_ref_logprobs.py from {start_weights}.")
        if meta.get("dataset_fingerprint") != self.fingerprint:
            raise DatasetError(
                f"reference sidecar {path!r} was computed for dataset fingerprint "
                f"{meta.get('dataset_fingerprint', '?')[:12]}..., but {self.prefix!r} has "
                f"{self.fingerprint[:12]}...; recompute it with examples/precompute_ref_logprobs.py")
        if ref.shape != (len(self), 4):
            raise DatasetError(f"reference sidecar {path!r} holds {ref.shape[0]} examples, the "
                               f"dataset {len(self)}")
        self.ref_logp = ref
        self.reference_fingerprint = sha256_file(_sidecar_base(path) + ".npy")


def save_reference_sidecar(path: str, ref_logp: np.ndarray, meta: dict) -> None:
    """Write ``PATH.npy`` ([N, 4] float32; NaN where a role was not computed) and
    ``PATH.json`` (provenance). The JSON is written last and atomically."""
    import os
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path + ".tmp.npy"
    np.save(tmp, ref_logp.astype(np.float32))
    os.replace(tmp, path + ".npy")
    tmp_json = path + ".json.tmp"
    Path(tmp_json).write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_json, path + ".json")


def _sidecar_base(path: str) -> str:
    path = str(path)
    if path.endswith(".npy") or path.endswith(".json"):
        path = path.rsplit(".", 1)[0]
    return path


def load_reference_sidecar(path: str) -> tuple[np.ndarray, dict]:
    path = _sidecar_base(path)
    if not Path(path + ".json").is_file() or not Path(path + ".npy").is_file():
        raise DatasetError(f"reference sidecar {path!r}: {path}.npy and {path}.json are both "
                           f"needed (run examples/precompute_ref_logprobs.py)")
    meta = json.loads(Path(path + ".json").read_text())
    return np.load(path + ".npy"), meta
