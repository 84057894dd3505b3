"""Checks of the code paths that run only on a GPU (docs/design.md, "Runs only on GPU, untested
here"), in one process on one device. Each check prints one JSON line (and appends it to
``--out``): what ran, the figures, and ``ok``. Exit status 1 when any check failed.

    python benchmarks/device_checks.py --out $OUT/device_checks.jsonl          # on a GPU (bf16)
    python benchmarks/device_checks.py --out /tmp/checks.jsonl --tiny          # CPU dry run (fp32)

Checks: environment (versions, device name, peak TFLOP/s lookup, NCCL world of one); SDPA backend
choice (which kernel ``attention_backend=auto`` runs, and each backend against the math one,
causal and lower-right causal); the model in the run's dtype with Megatron's fused SwiGLU on
packed triplets (shared prefixes) against transformers; fused against unfused SwiGLU (log-probs and
gradients); long-PO with shared prefixes against separate segments (sums, gradients, time); a
DDP + distributed-optimizer training step with the CUDA allocator's peaks and NVML; a checkpoint
round trip of the CUDA RNG state; and the Transformer Engine spec against the local one when TE
is importable.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

RESULTS: list = []


def record(name: str, ok: bool, out: str, **figures) -> None:
    line = {"check": name, "ok": bool(ok), **figures}
    RESULTS.append(line)
    print(json.dumps(line, default=str), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(line, default=str) + "\n")


def run_check(name: str, fn, out: str) -> None:
    start = time.time()
    try:
        ok, figures = fn()
    except Exception as exc:  # noqa: BLE001 - reported, the other checks still run
        ok, figures = False, {"error": f"{type(exc).__name__}: {exc}",
                              "traceback": traceback.format_exc(limit=6)}
    record(name, ok, out, seconds=round(time.time() - start, 2), **figures)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


class Checks:
    def __init__(self, tiny: bool, workdir: Path):
        from solopo_mcore import platform
        from solopo_mcore.config import ParallelConfig
        from solopo_mcore.models.tiny import build_tiny_hf_model
        from solopo_mcore.parallel.layout import initialize_parallel

        self.platform = platform
        self.tiny = tiny
        self.device = platform.default_device()
        self.dtype_name = "fp32" if tiny or not platform.on_cuda() else "bf16"
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype_name]
        self.workdir = workdir
        self.parallel = ParallelConfig()
        # an NCCL world of one on a GPU
        self.pg_collection = initialize_parallel(self.parallel, seed=7)
        overrides = None if tiny else dict(hidden_size=512, intermediate_size=1408,
                                           num_attention_heads=8, num_key_value_heads=2,
                                           num_hidden_layers=4)
        self.hf_dir = workdir / "hf"
        build_tiny_hf_model(self.hf_dir, "qwen2", vocab_size=4096 if not tiny else 1000, seed=0,
                            overrides=overrides)
        from solopo_mcore.models.hf_config import read_hf_config
        self.shape = read_hf_config(str(self.hf_dir))
        self.examples = self._examples(num=4, long_tokens=(200, 300) if tiny else (1500, 2500))

    # -- helpers --------------------------------------------------------------------------------
    def _examples(self, num, long_tokens):
        from solopo_mcore.data.packing import TripletTokens
        rng = random.Random(0)

        def toks(lo, hi):
            return [rng.randrange(1, self.shape.vocab_size) for _ in range(rng.randint(lo, hi))]
        return [TripletTokens(short_prompt=toks(20, 60), long_prompt=toks(*long_tokens),
                              chosen=toks(10, 30), rejected=toks(10, 30), index=i,
                              ref_logp_sum=[-50.0] * 4) for i in range(num)]

    def _batch(self, mode="solo", on_device=True, shared_prefix=True):
        from solopo_mcore.data.packing import pack_triplets
        from solopo_mcore.losses.objective import MODE_ROLES
        batch = pack_triplets(self.examples, MODE_ROLES[mode], shared_prefix=shared_prefix)
        return (batch.to(self.device) if on_device else batch), MODE_ROLES[mode]

    def _model(self, layer_spec="local", activation_memory="lean", **config_overrides):
        from safetensors.torch import load_file
        from solopo_mcore.config import ModelConfig
        from solopo_mcore.convert.tables import load_hf_tensors_into_chunks
        from solopo_mcore.models.builder import build_model_chunks, build_transformer_config

        cfg = ModelConfig(params_dtype=self.dtype_name, layer_spec=layer_spec,
                          activation_memory=activation_memory)
        tcfg = build_transformer_config(self.shape, cfg, self.parallel, **config_overrides)
        chunks = build_model_chunks(self.shape, cfg, self.parallel, self.pg_collection, tcfg)
        state = load_file(str(self.hf_dir / "model.safetensors"))
        load_hf_tensors_into_chunks(chunks, state.__getitem__, self.shape, self.pg_collection.tp)
        return tcfg, chunks

    def _segment_sums(self, model, batch):
        token_logps = model(batch.tokens, None, None, labels=batch.labels,
                            loss_mask=batch.loss_mask, packed_seq_params=batch.packed_seq_params())
        sums = torch.zeros(batch.num_responses, device=token_logps.device)
        return sums.index_add(0, batch.loss_token_response, token_logps.float())

    def _hf_segment_sums(self, dtype, batch):
        """transformers' response log-prob sums, each ``[x, y]`` alone, in ``batch``'s order."""
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(self.hf_dir, dtype=dtype,
                                                  attn_implementation="sdpa").to(self.device)
        out = []
        with torch.no_grad():
            for slot, role in zip(batch.response_example.tolist(), batch.response_role.tolist()):
                prompt, response = self.examples[slot].segment(role)
                ids = torch.tensor([list(prompt) + list(response)], device=self.device)
                logp = torch.log_softmax(hf(ids).logits.float(), dim=-1)[0, :-1]
                picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
                out.append(picked[len(prompt) - 1:].sum())
        return torch.stack(out)

    # -- checks ---------------------------------------------------------------------------------
    def environment(self):
        from solopo_mcore.compat import MEGATRON_CORE_VERSION
        from solopo_mcore.profiling.flops import device_peak_tflops
        p = self.platform
        figures = {"python": sys.version.split()[0], "torch": torch.__version__,
                   "megatron_core": MEGATRON_CORE_VERSION, "device": p.device_name(),
                   "backend": torch.distributed.get_backend(), "dtype": self.dtype_name,
                   "peak_tflops": device_peak_tflops(),
                   "transformer_engine": p.transformer_engine_available(),
                   "cudnn": torch.backends.cudnn.version() if p.on_cuda() else None}
        ok = figures["backend"] == p.distributed_backend()
        if p.on_cuda():
            ok &= figures["peak_tflops"] is not None  # the device is in the MFU table
        return ok, figures

    def sdpa(self):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        heads, seq, dim = (4, 256, 64) if self.tiny else (28, 4096, 128)
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, heads, seq, dim, generator=gen).to(self.device, self.dtype)
                   for _ in range(3))
        sq = seq // 2  # a CP chunk: the last sq queries over all keys, lower-right causal
        cases = {"causal": (q, k, v, dict(is_causal=True)),
                 "lower_right": (q[:, :, -sq:], k, v, dict(attn_mask=causal_lower_right(sq, seq)))}
        figures = {}
        ok = True
        for case, (qq, kk, vv, kw) in cases.items():
            with sdpa_kernel([SDPBackend.MATH]):
                ref = F.scaled_dot_product_attention(qq.float(), kk.float(), vv.float(), **kw)
            for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
                try:
                    with sdpa_kernel([backend]):
                        got = F.scaled_dot_product_attention(qq, kk, vv, **kw)
                    figures[f"{case}/{backend.name}"] = round(max_abs(got, ref), 6)
                except RuntimeError as exc:
                    first_line = str(exc).splitlines()[0][:80]
                    figures[f"{case}/{backend.name}"] = f"unavailable: {first_line}"
            order = self.platform.sdpa_backend_order("auto", self.device)
            with torch.profiler.profile(activities=self.platform.profiler_activities()) as prof:
                with sdpa_kernel(order, set_priority=True):
                    got = F.scaled_dot_product_attention(qq, kk, vv, **kw)
                self.platform.synchronize()
            ops = sorted({e.key for e in prof.key_averages()
                          if "scaled_dot_product" in e.key and "_attention" in e.key})
            figures[f"{case}/auto_ran"] = ops
            err = max_abs(got, ref)
            figures[f"{case}/auto_err"] = round(err, 6)
            ok &= err < (2e-2 if self.dtype == torch.bfloat16 else 1e-4)
        return ok, figures

    def model_vs_transformers(self):
        tcfg, chunks = self._model()
        model = chunks[0].to(self.device).eval()
        batch, _ = self._batch()
        with torch.no_grad():
            ours = self._segment_sums(model, batch)
        ref32 = self._hf_segment_sums(torch.float32, batch)
        figures = {"dtype": self.dtype_name, "lean_mlp": not tcfg.bias_activation_fusion,
                   "responses": int(ours.numel()), "ours_vs_hf_fp32": round(max_abs(ours, ref32), 5)}
        if self.dtype == torch.float32:
            return figures["ours_vs_hf_fp32"] < 1e-3, figures
        # bf16: our error against the fp32 reference may not exceed HF's own bf16 error by much.
        ref16 = self._hf_segment_sums(self.dtype, batch)
        figures["hf_bf16_vs_hf_fp32"] = round(max_abs(ref16, ref32), 5)
        limit = max(2.0 * figures["hf_bf16_vs_hf_fp32"], 0.05)
        return figures["ours_vs_hf_fp32"] <= limit, figures

    def lean_mlp(self):
        """The default lean activations (models/mlp.py: eager SwiGLU keeping FC1's output, FC2's
        input rebuilt in backward) against Megatron's torch.compile'd fused SwiGLU on this
        device: log-prob sums and gradients."""
        batch, _ = self._batch()
        results = []
        for setting, fused in (("lean", False), ("megatron", True)):
            _, chunks = self._model(activation_memory=setting, bias_activation_fusion=fused)
            model = chunks[0].to(self.device)
            sums = self._segment_sums(model, batch)
            sums.sum().backward()
            grads = torch.cat([p.grad.float().flatten() for p in model.parameters()
                               if p.grad is not None])
            results.append((sums.detach(), grads))
        (s0, g0), (s1, g1) = results
        figures = {"logp_sum_diff": round(max_abs(s0, s1), 6),
                   "grad_rel_diff": float((g0 - g1).norm() / g0.norm())}
        tol = 2e-2 if self.dtype == torch.bfloat16 else 1e-5
        return figures["grad_rel_diff"] < tol, figures

    def shared_prefix(self):
        """long-PO packed with shared prefixes (the default) against separate segments on this
        device and dtype: response sums, gradients, and fwd+bwd time of each."""
        _, chunks = self._model()
        model = chunks[0].to(self.device)
        figures, results = {}, {}
        for shared in (False, True, False, True):  # alternate; the second of each is timed
            batch, _ = self._batch(mode="long", shared_prefix=shared)
            model.zero_grad()
            self.platform.synchronize()
            start = time.time()
            sums = self._segment_sums(model, batch)
            sums.sum().backward()
            self.platform.synchronize()
            name = "shared" if shared else "unshared"
            figures[f"{name}_fwd_bwd_sec"] = round(time.time() - start, 4)
            figures[f"{name}_tokens"] = int(batch.tokens.shape[1])
            grads = torch.cat([p.grad.float().flatten() for p in model.parameters()
                               if p.grad is not None])
            results[name] = (sums.detach(), grads)
        (s0, g0), (s1, g1) = results["unshared"], results["shared"]
        figures["logp_sum_diff"] = round(max_abs(s0, s1), 6)
        figures["grad_rel_diff"] = float((g0 - g1).norm() / g0.norm())
        figures["time_shared_over_unshared"] = round(
            figures["shared_fwd_bwd_sec"] / figures["unshared_fwd_bwd_sec"], 3)
        tol = 2e-2 if self.dtype == torch.bfloat16 else 1e-5
        return figures["grad_rel_diff"] < tol, figures

    def train_step_and_checkpoint(self):
        from solopo_mcore.config import ObjectiveConfig, OptimizerConfig
        from solopo_mcore.profiling.memory import memory_stats, reset_peak
        from solopo_mcore.storage.checkpoint import CheckpointManager
        from solopo_mcore.stack import wrap_ddp
        from solopo_mcore.training.engine import run_global_batch
        from solopo_mcore.training.forward_step import make_forward_step
        from solopo_mcore.training.optim import build_optimizer
        from megatron.core import tensor_parallel

        tcfg, chunks = self._model()
        model = wrap_ddp(chunks, tcfg, self.parallel, self.pg_collection)
        optimizer = build_optimizer(model, OptimizerConfig(lr=1e-5), self.parallel, self.dtype,
                                    self.pg_collection)
        batch, _ = self._batch(on_device=False)  # run_global_batch moves it
        reset_peak()
        step = make_forward_step(ObjectiveConfig(), "solo", self.pg_collection.cp)
        outputs = run_global_batch(model, step, [batch], self.pg_collection)
        updated, grad_norm, _ = optimizer.step()
        stats = memory_stats()
        figures = {"updated": bool(updated), "grad_norm": grad_norm,
                   "loss_keys": sorted(k for k in outputs[0] if not k.startswith("_")),
                   **{k: round(v, 4) for k, v in stats.items()}}
        ok = bool(updated) and grad_norm is not None and grad_norm > 0
        if self.platform.on_cuda():
            ok &= stats.get("memory/max_allocated_gib", 0) > 0
            ok &= stats.get("memory/nvml_used_gib", 0) > 0
        # checkpoint round trip of the device RNG state and megatron's tracker states
        manager = CheckpointManager(str(self.workdir / "ckpt"), keep_last=1)
        path = manager.save(1, model, optimizer, None, {})
        saved_rng = self.platform.device_rng_state()
        saved_cpu = torch.get_rng_state()
        saved_tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
        torch.rand(1000, device=self.device)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            torch.rand(1000, device=self.device)
        CheckpointManager.load(path, model, optimizer)
        tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
        same_tracker = all(torch.equal(tracker[k], saved_tracker[k]) for k in saved_tracker)
        same_device = saved_rng is None or torch.equal(self.platform.device_rng_state(), saved_rng)
        figures.update(rng_restored=same_device, cpu_rng_restored=torch.equal(
            torch.get_rng_state(), saved_cpu), tracker_restored=same_tracker)
        return ok and same_device and same_tracker, figures

    def transformer_engine(self):
        if not self.platform.transformer_engine_available():
            return True, {"skipped": "Transformer Engine not importable (or no CUDA device)"}
        batch, _ = self._batch(shared_prefix=False)  # TE cannot hide y_w from y_l
        sums = {}
        for spec in ("local", "te"):
            _, chunks = self._model(layer_spec=spec)
            with torch.no_grad():
                sums[spec] = self._segment_sums(chunks[0].to(self.device).eval(), batch)
        figures = {"te_vs_local_logp_sum": round(max_abs(sums["te"], sums["local"]), 5)}
        return figures["te_vs_local_logp_sum"] < (0.05 if self.dtype == torch.bfloat16 else 1e-3), \
            figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="device_checks.jsonl")
    parser.add_argument("--tiny", action="store_true", help="tiny model, fp32 (CPU dry run)")
    args = parser.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("")
    from solopo_mcore.parallel.layout import destroy_parallel
    with tempfile.TemporaryDirectory() as tmp:
        checks = Checks(args.tiny, Path(tmp))
        try:
            for name in ("environment", "sdpa", "model_vs_transformers", "lean_mlp",
                         "shared_prefix", "train_step_and_checkpoint", "transformer_engine"):
                run_check(name, getattr(checks, name), args.out)
        finally:
            destroy_parallel()
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    print(f"[device_checks] {len(RESULTS) - len(failed)}/{len(RESULTS)} ok"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
