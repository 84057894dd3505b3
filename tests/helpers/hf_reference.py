"""Independent references: HF transformers on unpacked sequences, single process, and the
paper's formulas written out with plain torch (nothing imported from solopo_mcore.losses)."""

from __future__ import annotations

import random
from typing import Optional

import torch

from solopo_mcore.data.packing import TripletTokens

ROLE_NAMES = ("short_chosen", "short_rejected", "long_chosen", "long_rejected")
MODE_ROLE_IDS = {"solo": (0, 1, 2), "solo_both": (0, 1, 2, 3), "short": (0, 1), "long": (2, 3)}


def random_examples(num: int, vocab_size: int, seed: int, short=(5, 12), long=(20, 40),
                    response=(2, 7), with_ref: bool = False) -> list:
    rng = random.Random(seed)

    def toks(lo, hi):
        return [rng.randrange(1, vocab_size) for _ in range(rng.randint(lo, hi))]

    out = []
    for i in range(num):
        ex = TripletTokens(short_prompt=toks(*short), long_prompt=toks(*long),
                           chosen=toks(*response), rejected=toks(*response), index=i)
        if with_ref:
            ex.ref_logp_sum = [-rng.uniform(5.0, 40.0) for _ in range(4)]
        out.append(ex)
    return out


def hf_logp_sum(hf_model, prompt, response) -> torch.Tensor:
    """``sum_t log p(response_t | prompt, response_<t)`` from one unpacked HF forward."""
    ids = torch.tensor([list(prompt) + list(response)])
    logits = hf_model(ids).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = ids[0, 1:]
    per_token = logp.gather(-1, targets[:, None])[:, 0]
    return per_token[len(prompt) - 1:].sum()


def hf_role_table(hf_model, examples, roles) -> tuple[torch.Tensor, torch.Tensor]:
    """``S [E, 4]`` (with grad) and ``n [E, 4]`` for the given role ids; other roles 0."""
    S = [[torch.zeros(()) for _ in range(4)] for _ in examples]
    n = torch.zeros(len(examples), 4)
    for e, ex in enumerate(examples):
        for role in roles:
            prompt = ex.short_prompt if role in (0, 1) else ex.long_prompt
            resp = ex.chosen if role in (0, 2) else ex.rejected
            S[e][role] = hf_logp_sum(hf_model, prompt, resp)
            n[e, role] = len(resp)
    return torch.stack([torch.stack(row) for row in S]), n


def written_reward(alg: str, S, n, S_ref, beta):
    if alg == "dpo":
        return beta * (S - S_ref)
    if alg == "simpo":
        return beta * S / n
    p = torch.exp(S / n)
    return torch.log(p / (1 - p))


def written_pair_loss(alg: str, rw, rl, Sw, nw, cfg):
    m = rw - rl
    if alg == "dpo":
        eps = cfg.label_smoothing
        return -(1 - eps) * torch.log(torch.sigmoid(m)) - eps * torch.log(torch.sigmoid(-m))
    if alg == "simpo":
        return -torch.log(torch.sigmoid(m - cfg.gamma))
    return -Sw / nw - cfg.orpo_lambda * torch.log(torch.sigmoid(m))


def written_objective(S, n, S_ref: Optional[torch.Tensor], cfg, mode: str) -> torch.Tensor:
    """Per-example loss from the paper's formulas, one example at a time."""
    losses = []
    dist = (lambda a, b: (a - b).abs()) if cfg.distance == "abs" else (lambda a, b: (a - b) ** 2)
    for e in range(S.shape[0]):
        def r(role):
            ref = S_ref[e, role] if S_ref is not None else None
            return written_reward(cfg.algorithm, S[e, role], n[e, role], ref, cfg.beta)
        if mode == "long":
            loss = written_pair_loss(cfg.algorithm, r(2), r(3), S[e, 2], n[e, 2], cfg)
        else:
            loss = written_pair_loss(cfg.algorithm, r(0), r(1), S[e, 0], n[e, 0], cfg)
        if mode == "solo":
            loss = loss + cfg.alpha * dist(r(0), r(2))
        elif mode == "solo_both":
            loss = loss + cfg.alpha * (dist(r(0), r(2)) + dist(r(1), r(3)))
        losses.append(loss)
    return torch.stack(losses)


def reference_loss_and_grads(hf_model, examples, cfg, mode: str):
    """Mean loss over ``examples``, the ``S`` table and HF parameter grads (single process)."""
    hf_model.zero_grad(set_to_none=True)
    S, n = hf_role_table(hf_model, examples, MODE_ROLE_IDS[mode])
    S_ref = None
    if cfg.algorithm == "dpo":
        S_ref = torch.tensor([ex.ref_logp_sum for ex in examples])
    loss = written_objective(S, n, S_ref, cfg, mode).mean()
    loss.backward()
    grads = {k: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for k, p in hf_model.named_parameters()}
    if getattr(hf_model.config, "tie_word_embeddings", False):
        grads.setdefault("lm_head.weight", grads["model.embed_tokens.weight"])
    return loss.detach(), S.detach(), grads


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str,
                 atol: float = 1e-7) -> float:
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    if err > rel * scale + atol:
        raise AssertionError(f"{what}: max |diff| {err:.3e} > {rel:g} x max |ref| {scale:.3e}")
    return err / max(scale, 1e-30)
