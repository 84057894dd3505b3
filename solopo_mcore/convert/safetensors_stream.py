"""Write safetensors files one tensor at a time.

``safetensors.torch.save_file`` needs a file's every tensor in memory at once, so an exporter
using it holds a whole output shard (gigabytes). A safetensors file is an 8-byte little-endian
header length, a JSON header naming each tensor's dtype, shape and byte range, then the raw
bytes. When every tensor's name, shape and dtype is known before any value is (the exporter
plans them from the meta-device model), the header can be written first and each tensor
written at its offset as it is produced, holding nothing. The files are read back by the
``safetensors`` library and ``transformers`` in the tests.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

#: safetensors' dtype names.
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
               torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class StreamedSafetensorsFile:
    """One safetensors file whose layout is fixed up front; tensors may arrive in any order."""

    def __init__(self, path: Path, layout: list):
        """``layout``: ``[(name, shape, dtype)]``, the file's tensors in storage order."""
        self.path = Path(path)
        self.entries, header, offset = {}, {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in layout:
            num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + num_bytes]}
            self.entries[name] = (tuple(shape), dtype, offset)
            offset += num_bytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format aligns the data on 8 bytes
        self.data_start = 8 + len(text)
        self.num_bytes = offset
        self.missing = set(self.entries)
        self.handle = open(self.path, "wb")
        self.handle.write(struct.pack("<Q", len(text)) + text)
        self.handle.truncate(self.data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> bool:
        """Write one planned tensor; returns True once the file is complete (and closed)."""
        if name not in self.missing:
            raise ValueError(f"{self.path.name}: {name!r} is not planned here or written twice")
        shape, dtype, offset = self.entries[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{self.path.name}: {name!r} is {tuple(tensor.shape)} "
                             f"{tensor.dtype}, planned {shape} {dtype}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.handle.seek(self.data_start + offset)
        self.handle.write(memoryview(data))
        self.missing.discard(name)
        if not self.missing:
            self.handle.close()
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(self.path, 0o666 & ~mask)
        return not self.missing
