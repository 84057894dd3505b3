"""Stream HF safetensors checkpoints in, and write them out, one tensor at a time.

Reading never holds more than one tensor beyond the model itself; writing is done per pipeline
stage (each stage writes its own shard file) after an all-gather over tensor-parallel ranks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from solopo_mcore.convert.tables import (OUTPUT_HF_NAME, ConversionError, expected_hf_names,
                                         global_param_names, hf_tensors_from_shards)
from solopo_mcore.models.hf_config import ModelShape

#: Files copied from the source HF directory on export (those that exist).
CARRIED_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "tokenizer.model", "chat_template.jinja", "added_tokens.json")


class HFCheckpointReader:
    """Lazy access to the tensors of an HF model directory (sharded or single safetensors)."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / "model.safetensors").is_file():
            with safe_open(self.directory / "model.safetensors", framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ConversionError(f"{directory}: no model.safetensors or "
                                  f"model.safetensors.index.json")
        self.weight_map = weight_map
        self._open = {}
        self._safe_open = safe_open

    def names(self) -> set:
        return set(self.weight_map)

    def check_names(self, shape: ModelShape) -> None:
        """Refuse missing or unexpected tensors, naming them."""
        expected = expected_hf_names(shape)
        have = {n for n in self.names() if not n.endswith("rotary_emb.inv_freq")}
        if shape.tie_word_embeddings:
            have.discard(OUTPUT_HF_NAME)  # some tied checkpoints still store it
        missing, extra = sorted(expected - have), sorted(have - expected)
        if missing:
            raise ConversionError(f"{self.directory}: missing tensor(s) {missing[:5]}"
                                  f"{' ...' if len(missing) > 5 else ''}")
        if extra:
            raise ConversionError(f"{self.directory}: unexpected tensor(s) {extra[:5]}"
                                  f"{' ...' if len(extra) > 5 else ''} for {shape.architecture}")

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"{self.directory}: tensor {name!r} not found")
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = self._safe_open(self.directory / file, framework="pt")
        return self._open[file].get_tensor(name)


def _gather_tp(tensor: torch.Tensor, tp_group) -> list:
    if tp_group is None or tp_group.size() == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(tp_group.size())]
    dist.all_gather(parts, tensor.contiguous(), group=tp_group)
    return parts


def _follow_umask(path: Path) -> None:
    """Give ``path`` the mode an ordinary new file gets (0666 less the umask, e.g. 0644)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def export_hf(chunks: list, shape: ModelShape, out_dir: str, pg_collection,
              source_dir: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> None:
    """Write an HF checkpoint: one safetensors shard per pipeline stage plus the index.

    Collective over the model-parallel group; only DP/CP rank 0 of each stage writes."""
    from safetensors.torch import save_file

    tp, pp, dp, cp = pg_collection.tp, pg_collection.pp, pg_collection.dp, pg_collection.cp
    out = Path(out_dir)
    writer = dp.rank() == 0 and cp.rank() == 0
    tensors = {}
    for chunk in chunks:
        module = chunk.module if hasattr(chunk, "module") else chunk
        names = global_param_names(module)
        for local, param in module.named_parameters():
            shards = _gather_tp(param.detach(), tp)
            for name, value in hf_tensors_from_shards(names[local], shards, shape).items():
                tensors[name] = value.to(dtype or value.dtype).contiguous().cpu()
    num_stages, stage = pp.size(), pp.rank()
    file = f"model-{stage + 1:05d}-of-{num_stages:05d}.safetensors"
    if writer and tp.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        _follow_umask(out / file)  # safetensors creates its file 0600
    names_by_stage = [None] * num_stages
    stage_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    dist.all_gather_object(names_by_stage, (file, sorted(tensors), stage_bytes), group=pp)
    if writer and tp.rank() == 0 and stage == 0:
        weight_map = {n: f for f, names, _ in names_by_stage for n in names}
        total = sum(b for _, _, b in names_by_stage)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if source_dir is not None:
            for name in CARRIED_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copy2(Path(source_dir) / name, out / name)
        if not (out / "config.json").is_file():
            (out / "config.json").write_text(json.dumps(shape.raw, indent=2))
    dist.barrier()
