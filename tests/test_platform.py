"""The device boundary (solopo_mcore/platform.py) and the megatron-core version boundary
(solopo_mcore/compat.py).

* ``model.layer_spec=auto`` is the tested path (local spec + torch attention) even where
  Transformer Engine is importable and CUDA is present; ``te`` announces once what is unvalidated;
* gloo-only workarounds follow the communication backend, not the presence of a GPU;
* no module outside platform.py asks ``torch.cuda`` or the backend, and none outside compat.py
  reads megatron-core's version.
"""

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from solopo_mcore import platform
from solopo_mcore.config import ConfigError, ModelConfig
from solopo_mcore.data.packing import pack_triplets
from solopo_mcore.losses.objective import MODE_ROLES
from solopo_mcore.models import builder
from solopo_mcore.models.attention import TorchCoreAttention
from solopo_mcore.training import engine
from tests.helpers.hf_reference import random_examples

PACKAGE = Path(__file__).resolve().parents[1] / "solopo_mcore"


@pytest.fixture
def te_and_cuda_present(monkeypatch):
    """Pretend Transformer Engine is importable and a CUDA device is present."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "transformer_engine":
            return object()
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert platform.transformer_engine_available()


def test_auto_layer_spec_stays_local_with_te_and_cuda(te_and_cuda_present, monkeypatch):
    def te_spec(*args, **kwargs):
        raise AssertionError("auto selected the Transformer Engine spec, which no test runs")

    monkeypatch.setattr(builder, "get_gpt_layer_with_transformer_engine_spec", te_spec)
    cfg = ModelConfig()
    assert cfg.layer_spec == "auto"
    assert not builder.use_te_spec(cfg)
    spec = builder.build_layer_spec(cfg)
    core = spec.submodules.self_attention.submodules.core_attention
    assert issubclass(core, TorchCoreAttention)
    # No TE fusions either: RoPE / grad-accumulation fusion belong to the TE spec.
    fields = platform.transformer_config_overrides(transformer_engine=builder.use_te_spec(cfg))
    assert not fields["apply_rope_fusion"] and not fields["gradient_accumulation_fusion"]


def test_te_spec_is_announced_once_as_unvalidated(te_and_cuda_present, monkeypatch, capsys):
    sentinel = object()
    monkeypatch.setattr(builder, "get_gpt_layer_with_transformer_engine_spec", lambda: sentinel)
    monkeypatch.setattr(builder, "_TE_NOTICE_SHOWN", False)
    cfg = ModelConfig(layer_spec="te")
    assert builder.build_layer_spec(cfg) is sentinel
    assert builder.build_layer_spec(cfg) is sentinel
    out = capsys.readouterr().out
    assert out.count("NOT the tested path") == 1
    assert "THD + context-parallel attention" in out and "fused RoPE" in out


def test_te_spec_without_transformer_engine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="layer_spec=auto"):
        builder.use_te_spec(ModelConfig(layer_spec="te"))


def test_gloo_workarounds_follow_the_backend(monkeypatch):
    cpu = platform.transformer_config_overrides(transformer_engine=False)
    assert cpu["batch_p2p_comm"] is False and cpu["use_cpu_initialization"]
    assert not cpu["bias_activation_fusion"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert platform.distributed_backend() == "nccl"
    gpu = platform.transformer_config_overrides(transformer_engine=False)
    assert "batch_p2p_comm" not in gpu  # NCCL keeps megatron's batched p2p
    assert gpu["bias_activation_fusion"] and not gpu["use_cpu_initialization"]
    assert not gpu["apply_rope_fusion"]
    assert platform.transformer_config_overrides(transformer_engine=True)["apply_rope_fusion"]


class _Group:
    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size


class _Chunk:
    def zero_grad_buffer(self):
        pass


@pytest.mark.parametrize("gloo", [True, False])
def test_interleaved_microbatch_padding_only_on_gloo(gloo, monkeypatch):
    seen = {}

    def fake_schedule(**kwargs):
        def run(forward_step_func, data_iterator, **rest):
            seen["lengths"] = [int(mb.tokens.shape[1]) for mb in data_iterator[0]]
            return []
        return run

    monkeypatch.setattr(engine, "get_forward_backward_func", fake_schedule)
    monkeypatch.setattr(engine, "P2PCommunicator", lambda *a, **k: None)
    monkeypatch.setattr(engine, "get_model_config", lambda m: None)
    monkeypatch.setattr(engine, "is_gloo", lambda group: gloo)
    examples = random_examples(4, 100, seed=3)
    batches = [pack_triplets(examples[:1], MODE_ROLES["solo"], shared_prefix=True),
               pack_triplets(examples[1:], MODE_ROLES["solo"], shared_prefix=True)]
    lengths = [int(b.tokens.shape[1]) for b in batches]
    assert lengths[0] != lengths[1]
    pg_collection = type("PGs", (), {"pp": _Group(2)})()
    engine.run_global_batch([_Chunk(), _Chunk()], None, batches, pg_collection, forward_only=True)
    assert seen["lengths"] == ([max(lengths)] * 2 if gloo else lengths)


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_device_and_version_checks_live_in_one_module_each():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute):
                name = _dotted(node)
                if rel != "platform.py" and (name.startswith("torch.cuda.")
                                             or name.endswith("get_backend")):
                    offenders.append(f"{rel}:{node.lineno} {name}")
                if rel != "compat.py" and node.attr == "__version__" \
                        and not name.startswith("torch."):
                    offenders.append(f"{rel}:{node.lineno} {name}")
            if isinstance(node, ast.Constant) and node.value in ("gloo", "nccl", "cuda") \
                    and rel != "platform.py":
                offenders.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not offenders, "device/version checks outside platform.py/compat.py:\n" + \
        "\n".join(offenders)
