"""Our objective keys as TRL 1.16 arguments: the one place the mapping is written down.

docs/trl.md explains each row and where the two differ; :func:`trl_setup` is what
bench_vs_trl.py feeds TRL, so the table and the benchmark cannot drift apart.

================  ===============================  =========================================
ours              TRL 1.16                         note
================  ===============================  =========================================
dpo  beta         DPOConfig.beta                   same ``beta * (S - S_ref)`` reward
dpo  label_smooth DPOConfig.label_smoothing        TRL's ``sigmoid`` loss ignores it (cDPO is
                                                   not in TRL 1.16; ``robust`` is rDPO)
simpo beta        CPOConfig.beta (loss_type=simpo) same ``beta * S / n`` reward
simpo gamma       CPOConfig.simpo_gamma            TRL divides by beta, then multiplies back:
                                                   ``-logsig(beta*(S_w/n_w - S_l/n_l) - gamma)``
(none)            CPOConfig.cpo_alpha = 0          CPO's NLL term off: plain SimPO
orpo orpo_lambda  ORPOConfig.beta                  TRL's NLL term averages over prompt AND
                                                   chosen tokens; ours over the chosen
                                                   response only (the ORPO paper's)
orpo (cap)        (none)                           our mean log-prob is capped at -1e-6
================  ===============================  =========================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from solopo_mcore.config.sections import ObjectiveConfig, OptimizerConfig

#: TRL version the mapping was checked against (setup.py's ``compare`` extra pins it).
TRL_VERSION = "1.16.0"


def constant_lr(lr: float = 1e-4) -> OptimizerConfig:
    """AdamW at a constant ``lr`` (no warm-up, no decay), betas (0.9, 0.95), no weight decay."""
    return OptimizerConfig(lr=lr, min_lr=lr, lr_warmup_steps=0, weight_decay=0.0)


@dataclass
class Hyper:
    """One setting of the objective and optimizer, as our config sections; both trainers get
    it (ours as dotted overrides, TRL through :func:`trl_setup`)."""

    objective: ObjectiveConfig
    """``mode`` is the worker's (long for TRL's counterpart, solo for SoLoPO)."""
    optimizer: OptimizerConfig = field(default_factory=constant_lr)
    """Must be a constant learning rate: TRL gets ``lr_scheduler_type="constant"``."""
    seed: int = 1234
    """Weights are the HF model's on both sides; the seed covers dropout and sampling."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Hyper":
        return cls(ObjectiveConfig(**data["objective"]), OptimizerConfig(**data["optimizer"]),
                   data["seed"])


def our_overrides(hyper: Hyper, model_dir, data_prefix) -> list:
    """Dotted overrides of our recipe: the HF model (architecture and start weights) and dataset
    in fp32, one pair per step, then every objective (but ``mode``) and optimizer key of
    ``hyper``."""
    out = [f"model.hf_config_path={model_dir}", f"checkpoint.hf_init_dir={model_dir}",
           "model.params_dtype=fp32", f"data.data_path={data_prefix}",
           "data.micro_batch_size=1", "data.global_batch_size=1"]
    out += [f"objective.{f.name}={getattr(hyper.objective, f.name)}"
           for f in fields(ObjectiveConfig) if f.name != "mode"]
    out += [f"optimizer.{f.name}={getattr(hyper.optimizer, f.name)}"
            for f in fields(OptimizerConfig)]
    return out + [f"training.seed={hyper.seed}"]


def trl_setup(hyper: Hyper, max_length: int, common: dict):
    """``(TrainerClass, ConfigClass, config kwargs)`` of TRL for ``hyper``'s algorithm on the
    long context (mode=long). ``common``: the TrainingArguments both trainers share."""
    opt, obj = hyper.optimizer, hyper.objective
    if opt.min_lr != opt.lr or opt.lr_warmup_steps:
        raise ValueError("the comparison needs a constant learning rate (min_lr = lr, no warm-up)")
    shared = dict(common, learning_rate=opt.lr, lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=opt.weight_decay, adam_beta1=opt.adam_beta1,
                  adam_beta2=opt.adam_beta2, adam_epsilon=opt.adam_eps,
                  max_grad_norm=opt.clip_grad, seed=hyper.seed, data_seed=hyper.seed,
                  max_length=max_length)
    if obj.algorithm == "dpo":
        from trl import DPOConfig, DPOTrainer
        return DPOTrainer, DPOConfig, dict(shared, beta=obj.beta, loss_type=["sigmoid"],
                                           label_smoothing=obj.label_smoothing,
                                           precompute_ref_log_probs=True)
    if obj.algorithm == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        return CPOTrainer, CPOConfig, dict(shared, loss_type="simpo", beta=obj.beta,
                                           simpo_gamma=obj.gamma, cpo_alpha=0.0,
                                           label_smoothing=0.0)
    if obj.algorithm == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        return ORPOTrainer, ORPOConfig, dict(shared, beta=obj.orpo_lambda)
    raise ValueError(f"algorithm {obj.algorithm!r}: expected dpo, simpo or orpo")


def trl_losses(algorithm: str, logged: dict) -> tuple:
    """``(as shipped, in our convention)``: TRL's logged step loss, and the same restated in
    our convention from TRL's own logged figures.

    Only ORPO differs: TRL's NLL term averages the cross-entropy over the prompt and the chosen
    answer; ours is the chosen answer's mean NLL, ``-logps/chosen`` in TRL's log (its mean
    log-prob over the chosen response tokens). A run of the check's ORPO trainer (worker.py,
    which optimises our NLL) logs TRL's own as ``nll_loss_as_shipped``. DPO and SimPO are the
    same formula on both sides."""
    loss = logged["loss"]
    if algorithm != "orpo":
        return loss, loss
    if "nll_loss_as_shipped" in logged:  # the loss is already ours
        return loss - logged["nll_loss"] + logged["nll_loss_as_shipped"], loss
    return loss, loss - logged["nll_loss"] - logged["logps/chosen"]
