"""HF safetensors checkpoints in and out in bounded memory.

Reading opens a file for each slice it reads (a rank reads only the rows or columns of its TP
shard); writing streams each tensor into its planned place in its file
(``safetensors_stream``), each pipeline stage writing its own files after a per-parameter
all-gather over tensor-parallel ranks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from solopo_mcore.convert.tables import (OUTPUT_HF_NAME, ConversionError, expected_hf_names,
                                         global_param_names, hf_tensors_from_shards)
from solopo_mcore.convert.safetensors_stream import StreamedSafetensorsFile
from solopo_mcore.log import warn
from solopo_mcore.models.hf_config import ModelShape

#: Files copied from the source HF directory on export (those that exist). config.json is not
#: among them: it is written from the architecture the checkpoint records.
CARRIED_FILES = ("generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "tokenizer.model", "chat_template.jinja", "added_tokens.json")


class SafetensorsSource:
    """One tensor of a safetensors file, read in slices: the file is opened for each read and
    closed after it, so no mapping of the file outlives the slice it was opened for."""

    def __init__(self, path: Path, name: str, shape: tuple):
        self.path, self.name, self.shape = path, name, tuple(shape)

    def _read(self, index) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as handle:
            return handle.get_slice(self.name)[index]

    def full(self) -> torch.Tensor:
        return self._read(slice(None))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self._read(slice(start, stop))

    def cols(self, start: int, stop: int) -> torch.Tensor:
        return self._read((slice(None), slice(start, stop)))


class HFCheckpointReader:
    """Lazy access to the tensors of an HF model directory (sharded or single safetensors):
    only the headers are read up front; :meth:`source` reads a tensor's slices on demand."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ConversionError(f"{directory}: no model.safetensors or "
                                  f"model.safetensors.index.json")
        self.shapes, self.weight_map = {}, {}
        for file in files:
            if not (self.directory / file).is_file():
                raise ConversionError(f"{self.directory}: {file} is named in "
                                      f"model.safetensors.index.json but missing")
            try:
                with safe_open(self.directory / file, framework="pt") as handle:
                    for name in handle.keys():
                        self.weight_map[name] = file
                        self.shapes[name] = tuple(handle.get_slice(name).get_shape())
            except Exception as exc:  # noqa: BLE001 - safetensors' errors name no file
                raise ConversionError(f"{self.directory / file}: not a readable safetensors "
                                      f"file ({exc}); is it truncated? Download or export it "
                                      f"again") from None

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

    def source(self, name: str) -> SafetensorsSource:
        if name not in self.weight_map:
            raise ConversionError(f"{self.directory}: tensor {name!r} not found")
        return SafetensorsSource(self.directory / self.weight_map[name], name, self.shapes[name])

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor (in memory; prefer :meth:`source` for a slice)."""
        return self.source(name).full()


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


#: The dtype names config.json uses.
DTYPE_CONFIG_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                      torch.float16: "float16"}

#: Largest HF safetensors file the exporter writes (files are streamed: this is not memory).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def _chunk_params(chunks: list):
    """``(global Megatron name, parameter)`` over (possibly DDP-wrapped) chunks, in order."""
    for chunk in chunks:
        module = chunk.module if hasattr(chunk, "module") else chunk
        names = global_param_names(module)
        for local, param in module.named_parameters():
            yield names[local], param


def plan_hf_files(chunks: list, shape: ModelShape, tp: int, dtype: Optional[torch.dtype],
                  max_shard_bytes: int) -> list:
    """The HF tensors this pipeline stage writes, as ``[[(name, shape, dtype)], ...]`` per
    file of at most ``max_shard_bytes`` (a larger single tensor gets its own file): computed
    on the meta device from the parameters' shapes, before any value exists."""
    files, current, current_bytes = [], [], 0
    for global_name, param in _chunk_params(chunks):
        shards = [torch.empty(param.shape, dtype=param.dtype, device="meta")] * tp
        for name, value in hf_tensors_from_shards(global_name, shards, shape).items():
            out_dtype = dtype or value.dtype
            num_bytes = value.numel() * torch.empty((), dtype=out_dtype).element_size()
            if current and current_bytes + num_bytes > max_shard_bytes:
                files.append(current)
                current, current_bytes = [], 0
            current.append((name, tuple(value.shape), out_dtype))
            current_bytes += num_bytes
    return files + ([current] if current else [])


class HFStreamWriter:
    """Writes the planned files of one pipeline stage (temporary names; :func:`finish_hf_dir`
    numbers them), each tensor at its place as it arrives."""

    def __init__(self, out_dir: Path, tag: str, files: list):
        self.out, self.files = Path(out_dir), []
        self.file_of = {}
        for number, layout in enumerate(files):
            temp = f"part-{tag}-{number:05d}.safetensors"
            self.files.append((temp, layout))
            self.file_of.update({name: number for name, _, _ in layout})
        self.open = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.file_of:
            raise ConversionError(f"HF export: {name!r} was not planned")
        number = self.file_of[name]
        if number not in self.open:
            temp, layout = self.files[number]
            self.out.mkdir(parents=True, exist_ok=True)
            self.open[number] = StreamedSafetensorsFile(self.out / temp, layout)
        if self.open[number].write(name, tensor):
            self.open.pop(number)

    def close(self) -> list:
        """``[(file, tensor names, bytes)]`` in order; refuses a file left incomplete."""
        incomplete = [self.files[n][0] for n in self.open] + [
            temp for n, (temp, _) in enumerate(self.files) if not (self.out / temp).exists()]
        if incomplete:
            raise ConversionError(f"HF export: {incomplete[:3]} not completely written")
        return [(temp, sorted(n for n, _, _ in layout),
                 sum(math.prod(s) * torch.empty((), dtype=d).element_size()
                     for _, s, d in layout)) for temp, layout in self.files]


def finish_hf_dir(out: Path, files: list, shape: ModelShape, source_dir: Optional[str] = None,
                  dtype_name: Optional[str] = None) -> None:
    """Name the shard files ``model-0000i-of-0000N.safetensors`` (in the order given), write
    the index, copy the tokenizer files of ``source_dir`` and write config.json from the
    recorded architecture, with ``dtype_name`` as its dtype (rank 0's job)."""
    total = len(files)
    weight_map, total_bytes = {}, 0
    for number, (temp, names, num_bytes) in enumerate(files, start=1):
        final = f"model-{number:05d}-of-{total:05d}.safetensors"
        os.replace(out / temp, out / final)
        weight_map.update({name: final for name in names})
        total_bytes += num_bytes
    index = {"metadata": {"total_size": total_bytes},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if source_dir is not None:
        if Path(source_dir).is_dir():
            for name in CARRIED_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copy2(Path(source_dir) / name, out / name)
        else:
            warn("export", f"{source_dir} (the model's source folder) no longer exists: the "
                           f"tokenizer and generation config were not copied into {out}; copy "
                           f"them yourself ({', '.join(CARRIED_FILES[:3])}, ...)")
    config = dict(shape.raw)
    if dtype_name is not None:  # say what the files hold, or transformers loads another dtype
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        config.update({k: dtype_name for k in keys})
    (out / "config.json").write_text(json.dumps(config, indent=2))


def write_hf_checkpoint(chunks: list, shape: ModelShape, out_dir: str, pg_collection,
                        params: Optional[Iterable] = None, source_dir: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write an HF checkpoint of ``chunks`` (live, or on the meta device with ``params``
    supplying the values: ``(global Megatron name, this rank's TP shard)`` pairs, which may be
    produced one layer at a time).

    Collective over the whole world. Each pipeline stage's DP/CP/TP rank 0 writes its own
    files, streamed tensor by tensor; TP shards are gathered one parameter at a time, so a
    rank holds one parameter's full HF tensors beyond what the caller holds."""
    tp, pp, dp, cp = pg_collection.tp, pg_collection.pp, pg_collection.dp, pg_collection.cp
    out = Path(out_dir)
    writer = dp.rank() == 0 and cp.rank() == 0 and tp.rank() == 0
    plan = plan_hf_files(chunks, shape, tp.size(), dtype, max_shard_bytes)
    files = HFStreamWriter(out, f"{pp.rank():05d}", plan)
    for name, tensor in (params if params is not None else _chunk_params(chunks)):
        gathered = _gather_tp(tensor.detach(), tp)
        if writer:
            for hf_name, value in hf_tensors_from_shards(name, gathered, shape).items():
                files.write(hf_name, value.to(dtype or value.dtype))
        del gathered
    files_by_stage = [None] * pp.size()
    dist.all_gather_object(files_by_stage, files.close() if writer else [], group=pp)
    if writer and pp.rank() == 0:
        written = [d for layout in plan for _, _, d in layout[:1]]
        finish_hf_dir(out, [f for stage in files_by_stage for f in stage], shape, source_dir,
                      DTYPE_CONFIG_NAMES.get(written[0]) if written else None)
    dist.barrier()


def export_hf(chunks: list, shape: ModelShape, out_dir: str, pg_collection,
              source_dir: Optional[str] = None, dtype: Optional[torch.dtype] = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write the HF checkpoint of a live (possibly DDP-wrapped) model. Collective."""
    write_hf_checkpoint(chunks, shape, out_dir, pg_collection, source_dir=source_dir,
                        dtype=dtype, max_shard_bytes=max_shard_bytes)
