"""Typed run configuration: dataclasses, YAML recipes, dotted overrides, validation.

A run is described by :class:`RunConfig`. Recipes are YAML files whose top-level keys are the
sections below; ``key.sub=value`` overrides on the command line are applied on top. Every unknown
key and every badly typed value fails here, before any process group starts, naming the key.

Parallel sizes use Megatron's own names and are passed into Megatron's ``TransformerConfig``
(which subclasses ``ModelParallelConfig``) by :mod:`solopo_mcore.models.builder`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from solopo_mcore.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, with the dotted key that caused it."""


@dataclass
class ModelConfig:
    hf_config_path: Optional[str] = None
    """Directory (or config.json) of a Hugging Face model whose architecture is built."""
    params_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Parameter/compute dtype. Tests and CPU runs use fp32."""
    layer_spec: Literal["auto", "te", "local"] = "auto"
    """"auto" (= "local": Megatron's local spec with our torch SDPA attention, the path CI tests,
    on every device and whether or not Transformer Engine is importable), "local", or "te"
    (Transformer Engine's spec; needs TE and CUDA; its THD + context-parallel attention on packed
    triplets and fused RoPE are not validated, and it says so at start-up)."""
    attention_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = "auto"
    """SDPA backend order for the torch core attention: "auto" is cuDNN>flash>efficient>math on
    CUDA, flash>math on CPU; any other value puts that backend first."""
    recompute_granularity: Optional[Literal["selective", "full"]] = None
    """Activation recompute: none (null), core attention only ("selective") or whole layers."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """With full recompute: Megatron's meaning of "uniform" and "block"."""
    recompute_num_layers: int = 1
    """With full recompute: layers per recompute unit (uniform) or recomputed layers (block)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times the tensor-parallel size."""
    attention_dropout: float = 0.0
    """Attention dropout probability."""
    hidden_dropout: float = 0.0
    """Hidden-state dropout probability."""


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """TP: shards attention heads, MLP and vocabulary."""
    pipeline_model_parallel_size: int = 1
    """PP: layer stages."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Virtual PP: model chunks per pipeline rank (interleaved schedule)."""
    context_parallel_size: int = 1
    """CP: splits every sequence into 2*CP zigzag chunks."""
    sequence_parallel: Optional[bool] = None
    """Megatron sequence parallelism: norms, residual stream and dropout hold only 1/TP of the
    sequence on each TP rank. ``null`` (default) means on whenever TP > 1; ``false`` turns it off.
    Has no effect at TP = 1."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce with backward."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with forward."""

    @property
    def sequence_parallel_enabled(self) -> bool:
        """Whether sequence parallelism is on: TP > 1 and not switched off."""
        return self.tensor_model_parallel_size > 1 and self.sequence_parallel is not False


@dataclass
class DataConfig:
    data_path: Optional[str] = None
    """Prefix of the preprocessed triplet dataset (``PREFIX.bin/.idx/.meta.json``)."""
    micro_batch_size: int = 1
    """Examples (triplets) packed into one microbatch."""
    global_batch_size: int = 8
    """Examples per optimizer step, over all data-parallel ranks and microbatches."""
    num_eval_examples: int = 0
    """Examples held out from the end of the dataset for evaluation."""
    ref_logprobs_path: Optional[str] = None
    """Reference log-prob sidecar (DPO), written by examples/precompute_ref_logprobs.py."""
    shuffle: bool = True
    """Shuffle training examples every epoch (deterministic in seed and epoch)."""
    shared_prefix: bool = True
    """Run a context once for both answers that share it: ``[x, y_w, x[-1], y_l]`` in one
    segment, ``y_l`` never attending to ``y_w`` (docs/design.md, "Shared-prefix pairs"). Same
    log-probs as separate segments; off packs every answer with its own copy of the context."""


@dataclass
class ObjectiveConfig:
    algorithm: Literal["dpo", "simpo", "orpo"] = "orpo"
    """Preference algorithm (L_PO and its reward r)."""
    mode: Literal["solo", "solo_both", "short", "long"] = "solo"
    """"solo": SoLoPO (PO on the short pair, alignment of the chosen answer); "solo_both":
    alignment of both answers; "short": short-only PO; "long": PO on the long pair."""
    alpha: float = 1.0
    """Weight of the short-to-long reward alignment term (SoLo-RA)."""
    distance: Literal["abs", "squared"] = "abs"
    """Reward distance d(r_short, r_long)."""
    beta: float = 0.1
    """Reward scale (DPO, SimPO)."""
    gamma: float = 0.5
    """SimPO target margin."""
    orpo_lambda: float = 0.1
    """ORPO weight of the odds-ratio term."""
    label_smoothing: float = 0.0
    """DPO label smoothing (conservative DPO)."""


@dataclass
class OptimizerConfig:
    lr: float = 5e-7
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    lr_warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Gradient norm clip (0 disables)."""
    optimizer_cpu_offload: bool = False
    """Keep optimizer state on CPU (megatron-core hybrid offload; needs the distributed optimizer)."""


@dataclass
class TrainingConfig:
    train_steps: int = 100
    """Optimizer steps."""
    seed: int = 1234
    """Seed for weights, data order and dropout."""
    deterministic: bool = False
    """Deterministic algorithms (bitwise resume on CPU)."""
    max_consecutive_nonfinite_steps: int = 5
    """A NaN/Inf loss or grad skips the step; this many in a row stops the run (with a save)."""
    eval_interval: int = 0
    """Evaluate every N steps (0: never)."""
    eval_at_start: bool = True
    """With eval_interval > 0: also evaluate before the first step of a new run (logged at
    step 0), so eval curves start from the initial model."""
    exit_interval: int = 0
    """Save and exit after this many steps of this invocation (0: run to train_steps); for
    schedulers with time limits, like Megatron's --exit-interval."""


@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None
    """Where dist_checkpointing checkpoints go (``iter_NNNNNNN`` + ``latest``)."""
    save_interval: int = 0
    """Save every N steps (0: only at the end and on SIGTERM)."""
    keep_last: int = 2
    """Complete checkpoints to keep."""
    load_dir: Optional[str] = None
    """Start from this Megatron checkpoint dir (its ``latest``) unless save_dir already holds a
    checkpoint, which is then resumed."""
    finetune: bool = False
    """With load_dir: load its weights only and start a new run at step 0 (fresh optimizer, LR
    schedule and data position). A checkpoint in save_dir is always resumed, never finetuned."""
    strict_load: bool = False
    """A checkpoint whose files fail their checksums is an error, instead of a warning and a
    fallback to the previous intact checkpoint."""
    hf_init_dir: Optional[str] = None
    """Initialise weights from this Hugging Face model directory (converted on the fly)."""
    export_hf_dir: Optional[str] = None
    """At the end, export an HF checkpoint here."""


@dataclass
class LoggingConfig:
    log_interval: int = 1
    """Steps between console/metrics lines."""
    tensorboard_dir: Optional[str] = None
    """TensorBoard event dir (None: no TensorBoard)."""
    metrics_path: Optional[str] = None
    """metrics.jsonl path (rank 0); None: none."""
    progress_bar: bool = True
    """Show a progress bar when stdout is a terminal."""
    peak_tflops: Optional[float] = None
    """Per-device dense peak TFLOP/s for MFU; None: looked up from the device name."""
    wandb_project: Optional[str] = None
    """Weights & Biases project (None: no W&B). Needs ``pip install solopo-mcore[wandb]``;
    logs the same keys as metrics.jsonl, from the logging rank; ``WANDB_MODE=offline`` works."""
    wandb_entity: Optional[str] = None
    """W&B entity (team or user); None: the account's default."""
    wandb_run_name: Optional[str] = None
    """W&B display name; None: W&B picks one."""
    wandb_tags: list = field(default_factory=list)
    """W&B tags, a list of strings."""
    wandb_run_id: Optional[str] = None
    """Resume (or create) the W&B run with this id, e.g. after a restart; None: a new run."""
    wandb_dir: Optional[str] = None
    """Folder for W&B's local files; None: W&B's default (./wandb or $WANDB_DIR)."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture and numerics."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset and batch sizes."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """SoLoPO objective and its baselines."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and LR schedule."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Loop length, seed, fault handling."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, loading, HF init and export."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console, metrics.jsonl and TensorBoard."""


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _coerce(value: Any, annotation: Any, key: str) -> Any:
    hint = annotation
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = options[0]
    if value is None:
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(hint, '__name__', hint)})")
    if origin is Literal or typing.get_origin(hint) is Literal:
        options = typing.get_args(hint)
        if value in options:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, options))}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _from_dict(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
"""Named recipes ship inside the package (``solopo_mcore/recipes/*.yaml``, package data), so a
wheel install finds them too; ``examples/recipes`` in a checkout is a link to the same folder."""


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe file path, or the name of a shipped recipe (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / name_or_path, RECIPES_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise ConfigError(f"recipe {name_or_path!r} is neither a file nor a named recipe "
                      f"({', '.join(names)})")


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load a YAML recipe (a file or a recipe name; optional) and apply ``key.sub=value``
    overrides, then validate."""
    tree: dict = {}
    if path is not None:
        path = resolve_recipe(path)
        text = Path(path).read_text()
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    config = _from_dict(RunConfig, tree, "")
    validate(config)
    return config


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


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
                _coerce(value, hint, prefix + f.name)


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(config: RunConfig) -> None:
    """Checks that need no process group or model file. Layout checks against the model's shape
    and the world size are in :func:`solopo_mcore.parallel.layout.validate_layout`."""
    p, d, o, opt, t = (config.parallel, config.data, config.objective, config.optimizer,
                       config.training)
    _check_choices(config, "")
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                "context_parallel_size"):
        _positive(f"parallel.{key}", getattr(p, key))
    if p.virtual_pipeline_model_parallel_size is not None:
        _positive("parallel.virtual_pipeline_model_parallel_size",
                  p.virtual_pipeline_model_parallel_size)
        if p.pipeline_model_parallel_size < 2:
            raise ConfigError("parallel.virtual_pipeline_model_parallel_size needs "
                              "parallel.pipeline_model_parallel_size >= 2")
    _positive("data.micro_batch_size", d.micro_batch_size)
    _positive("data.global_batch_size", d.global_batch_size)
    _positive("data.num_eval_examples", d.num_eval_examples, allow_zero=True)
    _positive("objective.alpha", o.alpha, allow_zero=True)
    _positive("objective.beta", o.beta)
    if not 0.0 <= o.label_smoothing < 0.5:
        raise ConfigError(f"objective.label_smoothing: must be in [0, 0.5), got {o.label_smoothing}")
    _positive("optimizer.lr", opt.lr, allow_zero=True)
    _positive("optimizer.clip_grad", opt.clip_grad, allow_zero=True)
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
    if o.algorithm == "dpo" and d.data_path and not d.ref_logprobs_path:
        raise ConfigError("objective.algorithm=dpo needs data.ref_logprobs_path (run "
                          "examples/precompute_ref_logprobs.py first)")


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
