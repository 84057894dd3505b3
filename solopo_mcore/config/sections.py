"""The sections of a run's configuration: one dataclass per section, one docstring per field.

Allowed values are the ``Literal[...]`` annotations, checked on load and by
:func:`solopo_mcore.config.validation.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from solopo_mcore.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, with the dotted key that caused it."""


@dataclass
class RopeScalingConfig:
    """RoPE scaling applied on top of the model's ``config.json``: YaRN, Qwen2.5's documented way
    past its 32,768 trained positions (``{type: yarn, factor: 4.0,
    original_max_position_embeddings: 32768}`` for 131,072). Left null, the model's own RoPE is
    used as it is. Exported HF checkpoints carry it in their ``config.json``."""

    type: Optional[Literal["yarn"]] = None
    """null: config.json's RoPE unchanged; "yarn": YaRN with the values below, replacing any
    scaling config.json has."""
    factor: Optional[float] = None
    """YaRN factor (>= 1): usable positions = factor x original_max_position_embeddings."""
    original_max_position_embeddings: Optional[int] = None
    """Positions the model was pretrained at; null: config.json's max_position_embeddings."""
    beta_fast: Optional[float] = None
    """YaRN beta_fast (null: 32, as transformers)."""
    beta_slow: Optional[float] = None
    """YaRN beta_slow (null: 1, as transformers)."""
    attention_factor: Optional[float] = None
    """Factor on cos/sin (null: 0.1 ln(factor) + 1, as transformers)."""

    def as_hf(self) -> Optional[dict]:
        """The ``rope_scaling`` entry for config.json (only the keys that are set), or None."""
        if self.type is None:
            return None
        return {"type": self.type, **{k: getattr(self, k) for k in (
            "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
            "attention_factor") if getattr(self, k) is not None}}


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
    activation_memory: Literal["lean", "megatron"] = "lean"
    """What a layer keeps for backward. "lean" (the tested path, every device): Megatron's MLP
    with a SwiGLU that keeps only FC1's output, and the norm outputs, the SwiGLU output and the
    attention output rebuilt in backward from tensors kept anyway (models/rebuilt_saves.py);
    gradients bit for bit Megatron's unfused path. "megatron": Megatron's own (unfused on CPU,
    its torch.compile'd fused SwiGLU on CUDA), for comparison; CI checks its gradients only."""
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
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """RoPE scaling over config.json's (YaRN); unset: the model's own RoPE."""


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
    initial_loss_scale: float = 2.0**32
    """fp16 only (``model.params_dtype=fp16``): the dynamic loss scale to start from (Megatron's
    default); steps whose scaled gradients overflow are skipped and the scale is halved."""
    optimizer_cpu_offload: bool = False
    """Keep optimizer state on CPU (megatron-core hybrid offload; needs the distributed optimizer)."""
    override_lr_schedule: bool = False
    """On a resume whose training.train_steps differs from the checkpoint's: re-plan the warmup +
    cosine schedule over the new length from the current step (Megatron's
    --override-opt_param-scheduler). Off (default): the checkpoint's schedule is kept, so steps
    past its end run at min_lr; the resume says which, either way."""


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
class DistributedConfig:
    timeout_minutes: int = 30
    """Timeout of every process group's collectives (torch.distributed's and Megatron's groups):
    a collective waiting longer raises. The watchdog below names a hang sooner."""
    watchdog_minutes: float = 10.0
    """Stop the run, naming the late rank(s), their host, phase and step, when a rank sends no
    heartbeat (stopped, frozen) or no rank makes progress for this long (0: off). It must
    exceed the longest legitimate phase: a checkpoint save, an evaluation."""


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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Collective timeouts and the hang watchdog."""
