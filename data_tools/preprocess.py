"""Tokenize preference triplets into a Megatron indexed dataset (``PREFIX.bin/.idx/.meta.json``).

Each example becomes one *document* of four sequences, in this order:
``short prompt, long prompt, chosen response, rejected response``. Prompts are the chat template
applied to the user message with the assistant turn opened (``add_generation_prompt``);
responses are the answer's tokens plus the end-of-turn token. ``PREFIX.meta.json`` records
counts, length histograms, the tokenizer, a fingerprint of the token data, and the example ids;
it is written last, so a dataset without it is incomplete and is refused by the trainer.

Examples whose longest segment (a prompt plus a response) exceeds ``--max-seq-length`` are
skipped and counted, never truncated. With ``--model-config``, a tokenizer larger than the model's
vocabulary and a ``--max-seq-length`` above its usable positions are refused
(``max_position_embeddings``, or ``factor x original_max_position_embeddings`` with YaRN in
config.json or ``--yarn-factor``; the message gives the exact YaRN to add). Zero
examples written is an error (with the skip counts), and nothing is written.

    python -m data_tools.preprocess --input pairs.jsonl --output-prefix data/solopo \\
        --tokenizer builtin:qwen2.5 --max-seq-length 32768 --num-proc 8
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
from pathlib import Path
from typing import Optional

import numpy as np

from data_tools.common import (RowError, RunReport, commit_file_set, read_jsonl,
                               refuse_overwriting_inputs, require,
                               write_json)
from data_tools.tokenizer import BUILTIN_QWEN, load_tokenizer
from solopo_mcore.data.schema import FORMAT, SEQUENCES_PER_EXAMPLE, file_checks
from solopo_mcore.errors import entry_point
from solopo_mcore.processes import exit_with_parent

FIELDS = ("prompt_short", "prompt_long", "chosen", "rejected")


def _prompt_ids(tokenizer, text: str) -> list:
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def tokenize_row(row: dict, tokenizer) -> dict:
    eos = tokenizer.eos_token_id

    def response(text):
        return tokenizer(text, add_special_tokens=False).input_ids + [eos]

    return {"short_prompt": _prompt_ids(tokenizer, row["prompt_short"]),
            "long_prompt": _prompt_ids(tokenizer, row["prompt_long"]),
            "chosen": response(row["chosen"]), "rejected": response(row["rejected"])}


_FORKING_WORKERS = False


def _after_fork_in_child() -> None:
    """Every process ``datasets`` forks for ``--num-proc`` (the workers and the pool's manager)
    dies with preprocess: a ``kill -9`` of preprocess must not leave them behind."""
    if _FORKING_WORKERS:
        exit_with_parent(signal.SIGKILL)


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def _worker_pool_guard():
    """Around ``datasets``' ``map(num_proc=N)``. The processes forked meanwhile die with this
    one (:func:`_after_fork_in_child`). Ctrl-C surfaces from the pool as whatever it raises
    (``TimeoutError``): the signal is remembered and reported as the interrupt it was. The
    workers and the pool's manager (forked while this handler is set) ignore it: the main process
    stops them, and a worker or manager dying of it first left the pool waiting forever."""
    received = []
    main = os.getpid()

    def on_sigint(signum, frame):
        if os.getpid() != main:
            return
        received.append(signum)
        raise KeyboardInterrupt
    global _FORKING_WORKERS
    previous = signal.signal(signal.SIGINT, on_sigint)
    _FORKING_WORKERS = True
    try:
        yield
    except Exception:
        if received:
            raise KeyboardInterrupt from None
        raise
    finally:
        _FORKING_WORKERS = False
        signal.signal(signal.SIGINT, previous)


def _histogram(values: list, bins: int = 10) -> dict:
    if not values:
        return {}
    arr = np.asarray(values)
    counts, edges = np.histogram(arr, bins=bins)
    return {"min": int(arr.min()), "mean": round(float(arr.mean()), 1), "max": int(arr.max()),
            "bin_edges": [int(e) for e in edges], "counts": [int(c) for c in counts]}


def _sha256(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_model(tokenizer, model_config: Optional[str], max_seq_length: int,
                yarn_factor: Optional[float] = None) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding, and a --max-seq-length
    that would let through segments longer than the model's usable positions
    (``max_position_embeddings``, or YaRN's scaled limit with ``yarn_factor`` or a YaRN
    config.json); warn when config.json raised ``max_position_embeddings`` without scaling."""
    if model_config is None:
        if yarn_factor is not None:
            raise SystemExit("preprocess: --yarn-factor needs --model-config (the model whose "
                             "positions it scales)")
        return
    if yarn_factor is not None and not yarn_factor >= 1:
        raise SystemExit(f"preprocess: --yarn-factor {yarn_factor:g} must be at least 1 (the "
                         f"factor usable positions are multiplied by; Qwen2.5 documents 4)")
    from solopo_mcore.log import warn
    from solopo_mcore.models.positions import (model_shape, position_limit_fix,
                                               position_limit_text, unscaled_extension_warning)

    shape = model_shape(model_config, None if yarn_factor is None
                        else {"type": "yarn", "factor": float(yarn_factor)})
    if len(tokenizer) > shape.vocab_size:
        raise SystemExit(f"preprocess: the tokenizer has {len(tokenizer)} tokens but the model "
                         f"({model_config}) has vocab_size={shape.vocab_size}: ids would not "
                         f"fit its embedding. Use the model's own tokenizer.")
    warning = unscaled_extension_warning(shape, model_config)
    if warning:
        warn("preprocess", warning)
    if max_seq_length > shape.usable_positions:
        raise SystemExit(f"preprocess: --max-seq-length {max_seq_length} is longer than the "
                         f"model's {position_limit_text(shape)} ({model_config}): longer "
                         f"segments cannot be trained. Fix: " + position_limit_fix(
                             shape, max_seq_length, f"pass --max-seq-length "
                             f"{shape.usable_positions} or less"))


@contextlib.contextmanager
def _out_of_space_is_one_line(prefix: Path, tmp_prefix: Path):
    """A full disk while writing the dataset (however it arrives,
    :mod:`solopo_mcore.storage.space`): the partial ``.tmp.*`` files are removed, an existing
    dataset under the prefix is left as it was, and the error is one line."""
    try:
        yield
    except Exception as exc:  # the writer here is Megatron's IndexedDatasetBuilder: OSError
        from solopo_mcore.storage.space import free_text, is_out_of_space

        if not is_out_of_space(exc, prefix.parent):
            raise
        removed = []
        for ext in (".bin", ".idx", ".meta.json"):
            if os.path.exists(str(tmp_prefix) + ext):
                os.remove(str(tmp_prefix) + ext)
                removed.append(tmp_prefix.name + ext)
        existing = ("the dataset already there is unchanged"
                    if os.path.exists(str(prefix) + ".meta.json") else "nothing was written")
        raise SystemExit(f"preprocess: no space left on the device writing {prefix}.*: "
                         f"{free_text(prefix.parent)} after removing the partial files "
                         f"({', '.join(removed) or 'none'}); {existing}. Free space or choose "
                         f"an --output-prefix on a larger disk, and run again.") from None


def run(input_path: str, output_prefix: str, tokenizer_name: str, max_seq_length: int,
        num_proc: int = 1, model_config: Optional[str] = None, strict: bool = False,
        yarn_factor: Optional[float] = None) -> dict:
    import datasets
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    refuse_overwriting_inputs("preprocess", {"--input": input_path}, {
        f"--output-prefix ({ext})": str(output_prefix) + ext
        for ext in (".bin", ".idx", ".meta.json", ".tmp.bin", ".tmp.idx", ".tmp.meta.json",
                    ".bin.previous", ".idx.previous", ".meta.json.previous")})
    report = RunReport("preprocess", strict=strict)
    tokenizer = load_tokenizer(tokenizer_name)
    check_model(tokenizer, model_config, max_seq_length, yarn_factor)
    rows = []
    for line_number, row in read_jsonl(input_path, report):
        try:
            require(row, list(FIELDS))
            for field in FIELDS:
                if not isinstance(row[field], str) or not row[field].strip():
                    raise RowError("empty_field", f"{field!r} is empty or not a string")
        except RowError as exc:
            report.skip(f"{input_path}:{line_number}", exc.reason, str(exc))
            continue
        rows.append({"line": line_number, "id": str(row.get("id", line_number)),
                     **{f: row[f] for f in FIELDS}})

    datasets.disable_progress_bars()
    table = datasets.Dataset.from_list(rows) if rows else None
    if table is not None:
        with _worker_pool_guard():
            table = table.map(lambda r: tokenize_row(r, tokenizer), num_proc=max(1, num_proc),
                              remove_columns=list(FIELDS), desc="tokenizing")

    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = prefix.with_name(prefix.name + ".tmp")
    with _out_of_space_is_one_line(prefix, tmp_prefix):
        builder = IndexedDatasetBuilder(str(tmp_prefix) + ".bin", dtype=np.int32)
        ids, lengths = [], {k: [] for k in SEQUENCES_PER_EXAMPLE}
        num_tokens = 0
        for r in (table if table is not None else []):
            longest = max(len(r["short_prompt"]), len(r["long_prompt"])) + \
                max(len(r["chosen"]), len(r["rejected"]))
            if longest > max_seq_length:
                report.skip(f"{input_path}:{r['line']}", "too_long",
                            f"longest segment {longest} tokens > --max-seq-length {max_seq_length}")
                continue
            for key in SEQUENCES_PER_EXAMPLE:
                builder.add_item(torch.tensor(r[key], dtype=torch.int32))
                lengths[key].append(len(r[key]))
                num_tokens += len(r[key])
            builder.end_document()
            ids.append(r["id"])
            report.written += 1
        builder.finalize(str(tmp_prefix) + ".idx")
        if report.written == 0:
            for ext in (".bin", ".idx"):
                os.remove(str(tmp_prefix) + ext)
            report.print_summary()
            d = report.as_dict()
            reasons = ", ".join(f"{k}={v}" for k, v in d["skipped"].items()) or "none"
            raise SystemExit(f"preprocess: 0 examples written from {input_path} (read {d['read']}, "
                             f"skipped {d['skipped_total']}: {reasons}); nothing was written to "
                             f"{prefix}.*. Fix the input, or raise --max-seq-length if rows were "
                             f"too_long.")
        meta = {
            "format": FORMAT,
            "sequences_per_example": list(SEQUENCES_PER_EXAMPLE),
            "num_examples": report.written,
            "num_tokens": num_tokens,
            "tokenizer": tokenizer_name,
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            "max_seq_length": max_seq_length,
            "fingerprint": _sha256([str(tmp_prefix) + ".bin", str(tmp_prefix) + ".idx"]),
            "file_checks": file_checks(str(tmp_prefix)),  # sizes and hashes, not names
            "source": str(input_path),
            "source_sha256": _sha256([input_path]),
            "lengths": {k: _histogram(v) for k, v in lengths.items()},
            "report": report.as_dict(),
            "example_ids": ids,
        }
        write_json(str(tmp_prefix) + ".meta.json", meta)
        # .bin, .idx and .meta.json replace a previous dataset under this prefix as one set
        if os.path.exists(str(prefix) + ".meta.json"):
            print(f"preprocess: replacing the dataset at {prefix} (a run reading it will see new "
                  f"data: a training run that resumes on it refuses the changed fingerprint)",
                  flush=True)
        commit_file_set({str(tmp_prefix) + ext: str(prefix) + ext
                         for ext in (".bin", ".idx", ".meta.json")})
    report.extra.update(num_tokens=num_tokens, output=str(prefix) + ".{bin,idx,meta.json}")
    report.print_summary()
    return meta


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="pairs JSONL (sample_pairs output)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json")
    parser.add_argument("--tokenizer", default=BUILTIN_QWEN,
                        help=f"HF tokenizer/model directory or {BUILTIN_QWEN}")
    parser.add_argument("--max-seq-length", type=int, default=32768,
                        help="longest allowed segment (prompt + response), in tokens")
    parser.add_argument("--num-proc", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="tokenizer processes (default: CPU count - 1)")
    parser.add_argument("--model-config", help="HF model dir: refuse a larger tokenizer vocab "
                        "and a --max-seq-length above its usable positions "
                        "(max_position_embeddings, or YaRN's factor x original positions)")
    parser.add_argument("--yarn-factor", type=float,
                        help="the run will add YaRN with this factor over config.json "
                        "(model.rope_scaling={type: yarn, factor: F}): segments may be F x the "
                        "model's trained positions (Qwen2.5: 4 -> 131072)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row")
    args = parser.parse_args(argv)
    run(args.input, args.output_prefix, args.tokenizer, args.max_seq_length, args.num_proc,
        args.model_config, args.strict, args.yarn_factor)


if __name__ == "__main__":
    with entry_point("preprocess"):
        main()
