"""Checks of a whole configuration that need no process group and no model file."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Literal, Optional

from solopo_mcore.config.sections import ConfigError, RunConfig
from solopo_mcore.config.values import coerce
from solopo_mcore.storage.paths import overlap, refuse_overlaps


def _check_choices(section, prefix: str) -> None:
    """Every ``Literal[...]`` field holds one of its values (the annotation is the only list of
    allowed values; this also covers configs built in code rather than loaded)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
            continue
        hint = hints[f.name]
        options = [a for a in typing.get_args(hint) if a is not type(None)] \
            if typing.get_origin(hint) is typing.Union else [hint]
        for option in options:
            if typing.get_origin(option) is Literal:
                coerce(value, hint, prefix + f.name)


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_rope_scaling(rope) -> None:
    key = "model.rope_scaling"
    set_keys = [f.name for f in dataclasses.fields(rope)
                if f.name != "type" and getattr(rope, f.name) is not None]
    if rope.type is None:
        if set_keys:
            raise ConfigError(f"{key}.{set_keys[0]} is set but {key}.type is null; set "
                              f"{key}.type=yarn to use YaRN, or remove {key}.{set_keys[0]}")
        return
    if rope.factor is None or rope.factor < 1:
        raise ConfigError(f"{key}.factor must be a number >= 1 with {key}.type={rope.type}, got "
                          f"{rope.factor}; Qwen2.5 documents 4.0 (32,768 -> 131,072 positions)")
    if rope.original_max_position_embeddings is not None:
        _positive(f"{key}.original_max_position_embeddings",
                  rope.original_max_position_embeddings)
    if rope.attention_factor is not None:
        _positive(f"{key}.attention_factor", rope.attention_factor)


def validate(config: RunConfig) -> None:
    """Checks that need no process group or model file. Layout checks against the model's shape
    and the world size are in :func:`solopo_mcore.parallel.layout.validate_layout`."""
    p, d, o, opt, t = (config.parallel, config.data, config.objective, config.optimizer,
                       config.training)
    _check_choices(config, "")
    _check_rope_scaling(config.model.rope_scaling)
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                "context_parallel_size"):
        _positive(f"parallel.{key}", getattr(p, key))
    if p.virtual_pipeline_model_parallel_size is not None:
        _positive("parallel.virtual_pipeline_model_parallel_size",
                  p.virtual_pipeline_model_parallel_size)
        if p.pipeline_model_parallel_size < 2:
            raise ConfigError("parallel.virtual_pipeline_model_parallel_size needs "
                              "parallel.pipeline_model_parallel_size >= 2")
    _positive("distributed.timeout_minutes", config.distributed.timeout_minutes)
    _positive("distributed.watchdog_minutes", config.distributed.watchdog_minutes,
              allow_zero=True)
    if not math.isfinite(config.distributed.watchdog_minutes):
        raise ConfigError(f"distributed.watchdog_minutes must be a number of minutes (0: off), "
                          f"got {config.distributed.watchdog_minutes}")
    if config.distributed.watchdog_minutes >= config.distributed.timeout_minutes:
        raise ConfigError(f"distributed.watchdog_minutes={config.distributed.watchdog_minutes} "
                          f"must be below distributed.timeout_minutes="
                          f"{config.distributed.timeout_minutes}: a hung collective would time "
                          f"out before the watchdog could name the late rank")
    _positive("data.micro_batch_size", d.micro_batch_size)
    _positive("data.global_batch_size", d.global_batch_size)
    _positive("data.num_eval_examples", d.num_eval_examples, allow_zero=True)
    _positive("objective.alpha", o.alpha, allow_zero=True)
    _positive("objective.beta", o.beta)
    if not 0.0 <= o.label_smoothing < 0.5:
        raise ConfigError(f"objective.label_smoothing: must be in [0, 0.5), got {o.label_smoothing}")
    _positive("optimizer.lr", opt.lr, allow_zero=True)
    _positive("optimizer.min_lr", opt.min_lr, allow_zero=True)
    if opt.min_lr > opt.lr:
        raise ConfigError(f"optimizer.min_lr={opt.min_lr} is above optimizer.lr={opt.lr}: the "
                          f"cosine decays from lr to min_lr; set min_lr <= lr (a recipe's "
                          f"min_lr stays when only lr is overridden)")
    _positive("optimizer.clip_grad", opt.clip_grad, allow_zero=True)
    _positive("optimizer.initial_loss_scale", opt.initial_loss_scale)
    if opt.optimizer_cpu_offload and not p.use_distributed_optimizer:
        raise ConfigError("optimizer.optimizer_cpu_offload needs parallel.use_distributed_optimizer")
    _positive("training.train_steps", t.train_steps)
    _positive("training.max_consecutive_nonfinite_steps", t.max_consecutive_nonfinite_steps)
    _positive("checkpoint.keep_last", config.checkpoint.keep_last)
    _positive("logging.log_interval", config.logging.log_interval)
    tags = config.logging.wandb_tags
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ConfigError(f"logging.wandb_tags: expected a list of strings, got {tags!r}")
    if d.shared_prefix and config.model.layer_spec == "te":
        raise ConfigError("data.shared_prefix=true needs our attention (model.layer_spec=auto or "
                          "local): Transformer Engine's THD attention cannot hide y_w from y_l. "
                          "Set data.shared_prefix=false to use model.layer_spec=te.")
    check_outputs_apart_from_inputs(config)
    if o.algorithm == "dpo" and d.data_path and not d.ref_logprobs_path:
        raise ConfigError("objective.algorithm=dpo needs data.ref_logprobs_path (run "
                          "examples/precompute_ref_logprobs.py first)")


INPUT_KEYS = ("model.hf_config_path", "checkpoint.hf_init_dir", "checkpoint.load_dir")
OUTPUT_KEYS = ("checkpoint.save_dir", "checkpoint.export_hf_dir", "logging.tensorboard_dir",
               "logging.metrics_path", "logging.wandb_dir")


def _get(config: RunConfig, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def check_outputs_apart_from_inputs(config: RunConfig) -> None:
    """No output key may be, contain or lie inside an input key's path (the dataset's and the
    reference sidecar's files count as inputs). ``checkpoint.load_dir`` equal to
    ``checkpoint.save_dir`` is allowed (Megatron's ``--load`` = ``--save`` idiom: the folder's
    own checkpoint is resumed)."""
    inputs = {key: _get(config, key) for key in INPUT_KEYS}
    if config.data.data_path:
        for ext in (".bin", ".idx", ".meta.json"):
            inputs[f"data.data_path ({ext})"] = config.data.data_path + ext
    ref = config.data.ref_logprobs_path
    if ref:
        base = ref
        for suffix in (".npy", ".json"):
            base = base[:-len(suffix)] if base.endswith(suffix) else base
        for ext in (".npy", ".json"):
            inputs[f"data.ref_logprobs_path ({ext})"] = base + ext
    save, load = config.checkpoint.save_dir, config.checkpoint.load_dir
    if save and load and overlap(save, load) == "is":
        inputs.pop("checkpoint.load_dir")
    refuse_overlaps("config", inputs, {key: _get(config, key) for key in OUTPUT_KEYS},
                    "Point each output key at its own folder, outside every input.",
                    error=ConfigError)


def check_launch(config: RunConfig, world_size: int) -> int:
    """The layout and the batch against the number of processes launched (``WORLD_SIZE`` from
    torchrun, before any process group): TP x PP x CP divides it, and the global batch divides
    into micro batches over the data-parallel ranks. Returns the data-parallel size."""
    p, d = config.parallel, config.data
    model_parallel = (p.tensor_model_parallel_size * p.pipeline_model_parallel_size *
                      p.context_parallel_size)
    if world_size % model_parallel:
        raise ConfigError(
            f"{world_size} processes were launched, not a multiple of TP x PP x CP = "
            f"{p.tensor_model_parallel_size} x {p.pipeline_model_parallel_size} x "
            f"{p.context_parallel_size} = {model_parallel}; launch a multiple of "
            f"{model_parallel} (torchrun --nproc-per-node x --nnodes) or change parallel.*")
    dp = world_size // model_parallel
    if d.global_batch_size % (d.micro_batch_size * dp):
        raise ConfigError(
            f"data.global_batch_size={d.global_batch_size} is not divisible by "
            f"data.micro_batch_size x data-parallel size = {d.micro_batch_size} x {dp} "
            f"({world_size} processes / TP x PP x CP = {model_parallel}); choose a global batch "
            f"that is a multiple of {d.micro_batch_size * dp}")
    return dp


def _architecture_config(config: RunConfig) -> Optional[tuple[str, dict]]:
    path = config.model.hf_config_path or config.checkpoint.hf_init_dir
    if not path:
        return None
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        key = "model.hf_config_path" if config.model.hf_config_path else "checkpoint.hf_init_dir"
        raise ConfigError(f"{key}={path}: no config.json there; point it at a Hugging Face "
                          f"model folder (or its config.json)")
    try:
        return str(file), json.loads(file.read_text())
    except ValueError as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None


def check_dataset_fits(config: RunConfig) -> None:
    """The dataset's header (``.meta.json``) against the config and the model, before any
    process group: held-out examples leave a global batch to train on, and the token ids fit
    the model's vocabulary."""
    prefix = config.data.data_path
    meta_path = Path(prefix + ".meta.json")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{meta_path}: not valid JSON ({exc}); rebuild the dataset with "
                          f"python -m data_tools.preprocess") from None
    num_examples = meta.get("num_examples")
    d = config.data
    if isinstance(num_examples, int):
        if d.num_eval_examples >= num_examples:
            raise ConfigError(f"data.num_eval_examples={d.num_eval_examples} leaves no training "
                              f"examples: {prefix} has {num_examples}; hold out fewer")
        if num_examples - d.num_eval_examples < d.global_batch_size:
            raise ConfigError(
                f"{num_examples - d.num_eval_examples} training examples ({num_examples} in "
                f"{prefix} minus data.num_eval_examples={d.num_eval_examples}) are fewer than "
                f"data.global_batch_size={d.global_batch_size}; lower one of them")
    arch = _architecture_config(config)
    vocab = meta.get("vocab_size")
    if arch is not None and isinstance(vocab, int):
        file, hf = arch
        model_vocab = hf.get("vocab_size", (hf.get("text_config") or {}).get("vocab_size"))
        if isinstance(model_vocab, int) and vocab > model_vocab:
            raise ConfigError(
                f"{prefix} was tokenized with {meta.get('tokenizer', 'a tokenizer')} "
                f"({vocab} tokens), more than the model's vocab_size {model_vocab} ({file}); "
                f"either preprocess again with the model's tokenizer (python -m "
                f"data_tools.preprocess --tokenizer MODEL_DIR --model-config MODEL_DIR), or set "
                f"model.hf_config_path / checkpoint.hf_init_dir to the model the data was "
                f"tokenized for")


def require_training_data(config: RunConfig, need_reference: bool = True) -> None:
    """Training and the reference pre-pass need a dataset: check ``data.data_path`` names one
    whose files exist, before any process group or model is built; and, for DPO training
    (``need_reference``; not the pre-pass that writes it), the reference sidecar."""
    prefix = config.data.data_path
    if not prefix:
        raise ConfigError("data.data_path is not set: pass data.data_path=PREFIX, the "
                          "--output-prefix given to python -m data_tools.preprocess")
    missing = [prefix + ext for ext in (".bin", ".idx", ".meta.json")
               if not Path(prefix + ext).is_file()]
    if missing:
        raise ConfigError(f"data.data_path={prefix}: {', '.join(missing)} "
                          f"{'does' if len(missing) == 1 else 'do'} not exist; build the dataset "
                          f"with python -m data_tools.preprocess --output-prefix {prefix}")
    ref = config.data.ref_logprobs_path
    if need_reference and config.objective.algorithm == "dpo" and ref:
        base = ref
        for suffix in (".npy", ".json"):
            base = base[:-len(suffix)] if base.endswith(suffix) else base
        gone = [base + ext for ext in (".npy", ".json") if not Path(base + ext).is_file()]
        if gone:
            raise ConfigError(f"data.ref_logprobs_path={ref}: {', '.join(gone)} missing; run "
                              f"examples/precompute_ref_logprobs.py --output {base}")
    check_dataset_fits(config)
