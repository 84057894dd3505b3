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

from dataclasses import dataclass

#: TRL version the mapping was checked against (setup.py's ``compare`` extra pins it).
TRL_VERSION = "1.16.0"


@dataclass
class Hyper:
    """One setting of the objective and optimizer, in our names."""

    algorithm: str = "orpo"
    """dpo, simpo or orpo."""
    beta: float = 0.1
    """DPO / SimPO reward scale."""
    gamma: float = 0.5
    """SimPO target margin."""
    orpo_lambda: float = 0.1
    """ORPO weight of the odds-ratio term."""
    label_smoothing: float = 0.0
    """DPO label smoothing (cDPO)."""
    alpha: float = 1.0
    """SoLo-RA weight (ours, mode=solo; TRL has no such term)."""
    lr: float = 1e-4
    """Constant learning rate (no warm-up, no decay) on both sides."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip on both sides."""
    seed: int = 1234


def our_overrides(hyper: Hyper) -> list:
    """Dotted overrides of our recipe for ``hyper`` (objective and optimizer only)."""
    return [f"objective.algorithm={hyper.algorithm}", f"objective.beta={hyper.beta}",
            f"objective.gamma={hyper.gamma}", f"objective.orpo_lambda={hyper.orpo_lambda}",
            f"objective.label_smoothing={hyper.label_smoothing}", f"objective.alpha={hyper.alpha}",
            f"optimizer.lr={hyper.lr}", f"optimizer.min_lr={hyper.lr}",
            "optimizer.lr_warmup_steps=0", "optimizer.weight_decay=0.0",
            f"optimizer.adam_beta1={hyper.adam_beta1}", f"optimizer.adam_beta2={hyper.adam_beta2}",
            f"optimizer.adam_eps={hyper.adam_eps}", f"optimizer.clip_grad={hyper.clip_grad}",
            f"training.seed={hyper.seed}"]


def trl_setup(hyper: Hyper, max_length: int, common: dict):
    """``(TrainerClass, ConfigClass, config kwargs)`` of TRL for ``hyper``'s algorithm on the
    long context (mode=long). ``common``: the TrainingArguments both trainers share."""
    shared = dict(common, learning_rate=hyper.lr, lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, adam_beta1=hyper.adam_beta1, adam_beta2=hyper.adam_beta2,
                  adam_epsilon=hyper.adam_eps, max_grad_norm=hyper.clip_grad, seed=hyper.seed,
                  data_seed=hyper.seed, max_length=max_length)
    if hyper.algorithm == "dpo":
        from trl import DPOConfig, DPOTrainer
        return DPOTrainer, DPOConfig, dict(shared, beta=hyper.beta, loss_type=["sigmoid"],
                                           label_smoothing=hyper.label_smoothing,
                                           precompute_ref_log_probs=True)
    if hyper.algorithm == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        return CPOTrainer, CPOConfig, dict(shared, loss_type="simpo", beta=hyper.beta,
                                           simpo_gamma=hyper.gamma, cpo_alpha=0.0,
                                           label_smoothing=0.0)
    if hyper.algorithm == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        return ORPOTrainer, ORPOConfig, dict(shared, beta=hyper.orpo_lambda)
    raise ValueError(f"algorithm {hyper.algorithm!r}: expected dpo, simpo or orpo")


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
