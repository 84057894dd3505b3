"""The preprocessed triplet dataset (``data_tools.preprocess`` output) and its reference sidecar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from solopo_mcore.data.packing import TripletTokens
from solopo_mcore.errors import UserError

FORMAT = "solopo-triplets-v1"


class DatasetError(UserError, ValueError):
    pass


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
        if self.meta.get("format") != FORMAT:
            raise DatasetError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT}")
        self.indexed = IndexedDataset(self.prefix, multimodal=False, mmap=True)
        documents = self.indexed.document_indices
        if len(documents) - 1 != self.meta["num_examples"]:
            raise DatasetError(f"dataset {self.prefix!r}: {len(documents) - 1} documents but meta "
                               f"says {self.meta['num_examples']} examples")
        if not np.all(np.diff(documents) == 4):
            raise DatasetError(f"dataset {self.prefix!r}: every document must hold 4 sequences")
        self.ref_logp: Optional[np.ndarray] = None

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def pad_token_id(self) -> int:
        return int(self.meta.get("pad_token_id", 0))

    def __len__(self) -> int:
        return int(self.meta["num_examples"])

    def __getitem__(self, index: int) -> TripletTokens:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range [0, {len(self)})")
        base = 4 * index
        short, long_, chosen, rejected = (self.indexed[base + k].tolist() for k in range(4))
        ref = None if self.ref_logp is None else self.ref_logp[index].tolist()
        return TripletTokens(short, long_, chosen, rejected, index=index, ref_logp_sum=ref)

    def segment_lengths(self, index: int) -> tuple[int, int, int, int]:
        lengths = self.indexed.sequence_lengths[4 * index: 4 * index + 4]
        return tuple(int(x) for x in lengths)

    def attach_reference(self, path: str) -> None:
        """Load a reference log-prob sidecar, refusing one made for another dataset."""
        ref, meta = load_reference_sidecar(path)
        if meta.get("dataset_fingerprint") != self.fingerprint:
            raise DatasetError(
                f"reference sidecar {path!r} was computed for dataset fingerprint "
                f"{meta.get('dataset_fingerprint', '?')[:12]}..., but {self.prefix!r} has "
                f"{self.fingerprint[:12]}...; recompute it with examples/precompute_ref_logprobs.py")
        if ref.shape != (len(self), 4):
            raise DatasetError(f"reference sidecar {path!r} holds {ref.shape[0]} examples, the "
                               f"dataset {len(self)}")
        self.ref_logp = ref


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


def load_reference_sidecar(path: str) -> tuple[np.ndarray, dict]:
    path = str(path)
    if path.endswith(".npy") or path.endswith(".json"):
        path = path.rsplit(".", 1)[0]
    if not Path(path + ".json").is_file() or not Path(path + ".npy").is_file():
        raise DatasetError(f"reference sidecar {path!r}: {path}.npy and {path}.json are both "
                           f"needed (run examples/precompute_ref_logprobs.py)")
    meta = json.loads(Path(path + ".json").read_text())
    return np.load(path + ".npy"), meta
