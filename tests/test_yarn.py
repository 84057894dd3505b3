"""YaRN RoPE (Qwen2.5's way past its 32K positions) against transformers, and the position limit.

* inverse frequencies and the attention factor equal transformers' own ``rope_init_fn`` for
  every YaRN variant config.json can hold;
* a tiny Qwen2 with 256 trained positions and YaRN factor 4, run at 1,000 tokens: logits,
  response log-probs and shared-prefix packed segments equal transformers (the layouts are in
  tests/test_layouts.py, the converter in tests/test_convert.py);
* the same check fails with the attention factor dropped, and with unscaled frequencies;
* segments past the usable positions are refused before any process group, naming YaRN and
  shorter data; a config.json that raised max_position_embeddings without scaling is warned of.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from solopo_mcore.config import ModelConfig, ParallelConfig
from solopo_mcore.models.hf_config import read_hf_config, shape_from_dict
from solopo_mcore.models.reference_configs import QWEN25_7B_INSTRUCT
from solopo_mcore.models.rope import inverse_frequencies
from tests.helpers.hf_reference import assert_close, hf_logp_sum, random_examples

SEQ_TOKENS = 1000  # past the tiny model's 256 trained positions, within its 1,024 usable


@pytest.mark.parametrize("scaling", [
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
     "beta_fast": 16, "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 3.0, "attention_factor": 1.25, "truncate": False},
    {"type": "yarn", "factor": 2.0},  # original defaults to max_position_embeddings
], ids=["qwen-form", "mscale", "explicit-factor-untruncated", "no-original"])
def test_yarn_frequencies_and_attention_factor_equal_transformers(scaling, tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from solopo_mcore.models.rope import attention_factor
    from solopo_mcore.models.tiny import build_tiny_hf_model

    build_tiny_hf_model(tmp_path, "qwen2", overrides={"rope_scaling": scaling,
                                                      "max_position_embeddings": 1024})
    hf_config = AutoConfig.from_pretrained(tmp_path)
    ref_inv_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    shape = read_hf_config(tmp_path)  # as saved by transformers 5: rope_parameters
    ours = inverse_frequencies(shape.rope_theta, shape.kv_channels, shape.rope_scaling)
    assert torch.equal(ours, ref_inv_freq.float())
    assert attention_factor(shape.rope_scaling) == pytest.approx(ref_factor, rel=1e-12)
    # the classic rope_scaling key reads the same
    classic = dict(json.loads((Path(tmp_path) / "config.json").read_text()))
    classic.pop("rope_parameters")
    classic.update(rope_scaling=scaling, rope_theta=shape.rope_theta)
    assert shape_from_dict(classic).rope_scaling == shape.rope_scaling


@pytest.fixture(scope="module")
def groups():
    """A one-process group for this module, torn down after it with the environment it set
    (RANK, MASTER_PORT, ...), so later tests' subprocesses start their own."""
    import os

    from solopo_mcore.parallel.layout import destroy_parallel, initialize_parallel
    saved = dict(os.environ)
    yield initialize_parallel(ParallelConfig(), seed=5)
    destroy_parallel()
    os.environ.clear()
    os.environ.update(saved)


def _build(hf_dir, groups, shape=None):
    from transformers import AutoModelForCausalLM

    from solopo_mcore.convert.tables import load_hf_tensors_into_chunks
    from solopo_mcore.models.builder import build_model_chunks

    shape = shape or read_hf_config(hf_dir)
    model = build_model_chunks(shape, ModelConfig(params_dtype="fp32"), ParallelConfig(),
                               groups)[0]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state = hf.state_dict()
    load_hf_tensors_into_chunks([model], lambda n: state[n], shape, groups.tp)
    return shape, model, hf


def _check_against_transformers(hf_dir, groups):
    """Logits at SEQ_TOKENS positions, response log-probs, and shared-prefix packed segments
    with ~800-token contexts, each against transformers on unpacked sequences."""
    from solopo_mcore.data.packing import pack_triplets
    from solopo_mcore.losses.objective import MODE_ROLES
    from solopo_mcore.roles import Role

    shape, model, hf = _build(hf_dir, groups)
    ids = torch.randint(0, shape.vocab_size, (1, SEQ_TOKENS),
                        generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, dims=1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 900:SEQ_TOKENS - 1] = True
    with torch.no_grad():
        logits = model(ids, None, None)[..., :shape.vocab_size]
        ref = hf(ids).logits
        assert_close(logits, ref, 1e-4, "YaRN logits past the trained positions")
        logp = model(ids, None, None, labels=labels, loss_mask=mask)
        ref_logp = torch.log_softmax(ref.float(), -1).gather(-1, labels[..., None])[..., 0][mask]
        assert_close(logp, ref_logp, 1e-5, "YaRN response log-probs")
        examples = random_examples(2, shape.vocab_size, 3, long=(700, 800))
        roles = MODE_ROLES["long"]  # both answers share their long context
        packed = pack_triplets(examples, roles, shared_prefix=True)
        assert packed.hidden_keys is not None
        out = model(packed.tokens, None, None, labels=packed.labels, loss_mask=packed.loss_mask,
                    packed_seq_params=packed.packed_seq_params(groups.cp))
        sums = torch.zeros(packed.num_responses).index_add(0, packed.loss_token_response, out)
        expected = torch.stack([
            hf_logp_sum(hf, *examples[slot].segment(Role(role)))
            for slot, role in zip(packed.response_example.tolist(),
                                  packed.response_role.tolist())])
        assert_close(sums, expected, 1e-5, "YaRN shared-prefix response log-prob sums")


def test_yarn_model_equals_transformers_past_its_trained_positions(tiny_qwen2_yarn, groups):
    shape = read_hf_config(tiny_qwen2_yarn)
    assert shape.max_position_embeddings == 256 and shape.usable_positions == 1024
    _check_against_transformers(tiny_qwen2_yarn, groups)


@pytest.mark.parametrize("planted", ["attention_factor_dropped", "frequencies_unscaled"])
def test_the_yarn_check_fails_on_each_planted_bug(planted, tiny_qwen2_yarn, groups,
                                                  monkeypatch):
    from solopo_mcore.models import builder

    if planted == "attention_factor_dropped":
        monkeypatch.setattr(builder, "softmax_scale", lambda kv_channels, scaling: None)
    else:
        monkeypatch.setattr(builder, "inverse_frequencies",
                            lambda theta, dim, scaling: inverse_frequencies(theta, dim, None))
    with pytest.raises(AssertionError, match="YaRN"):
        _check_against_transformers(tiny_qwen2_yarn, groups)


# ------------------------------------------------------------------ the position limit

def _qwen_like(tmp_path, **changes):
    """A config.json of Qwen2.5-7B's shape (no weights needed for the checks)."""
    folder = tmp_path / "qwen"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**QWEN25_7B_INSTRUCT, **changes}))
    return folder


def test_yarn_from_the_recipe_scales_the_limit_and_is_exported_in_config_json(tmp_path):
    from solopo_mcore.config import load_config
    from solopo_mcore.models.positions import model_shape

    plain = read_hf_config(_qwen_like(tmp_path))
    assert plain.usable_positions == 32768 and plain.rope_scaling is None
    for recipe, length in (("qwen2.5-7b_solo-orpo_64k_4node", 65536),
                           ("qwen2.5-7b_solo-orpo_128k_4node", 131072)):
        cfg = load_config(recipe)
        shape = model_shape(str(_qwen_like(tmp_path)), cfg.model.rope_scaling.as_hf())
        assert shape.rope_scaling["rope_type"] == "yarn" and shape.rope_scaling["factor"] == 4.0
        assert shape.usable_positions == 131072 >= length
        # exported config.json carries Qwen's documented entry, max positions unchanged
        assert shape.raw["rope_scaling"] == {"type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 32768}
        assert shape.raw["max_position_embeddings"] == 32768
    # transformers-5 configs get it in their own format
    five = dict(QWEN25_7B_INSTRUCT)
    five["rope_parameters"] = {"rope_type": "default", "rope_theta": five.pop("rope_theta")}
    folder = tmp_path / "five"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(five))
    shape = model_shape(str(folder), {"type": "yarn", "factor": 4.0})
    assert shape.raw["rope_parameters"]["rope_type"] == "yarn"
    assert shape.usable_positions == 131072


def test_data_past_the_positions_is_refused_before_any_process_group(demo_data, tmp_path):
    import torch.distributed as dist

    from data_tools import preprocess
    from solopo_mcore.config import RunConfig
    from solopo_mcore.data.dataset import DatasetError
    from solopo_mcore.training import build

    short = tmp_path / "short_model"
    short.mkdir()
    config = json.loads((Path(demo_data["model"]) / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=300)))
    cfg = RunConfig()
    cfg.data.data_path = demo_data["prefix"]
    cfg.model.hf_config_path = str(short)
    was_initialized = dist.is_initialized()
    with pytest.raises(DatasetError) as refused:
        build.check_positions(cfg)
    message = str(refused.value)
    assert "longer than the model's max_position_embeddings 300" in message
    assert "model.rope_scaling={type: yarn, factor: 4, original_max_position_embeddings: " \
           "300}" in message and '"rope_scaling": {"type": "yarn"' in message
    assert "--yarn-factor 4" in message and "--max-seq-length 300" in message
    assert dist.is_initialized() == was_initialized  # refused before any process group
    # YaRN too small for the data: the fix is a larger factor, not "add YaRN"
    cfg.model.rope_scaling.type, cfg.model.rope_scaling.factor = "yarn", 2.0
    with pytest.raises(DatasetError, match=r"600 usable positions \(YaRN factor 2 x 300\).*"
                                           r"Fix: either raise the YaRN factor from 2 to 4 for "
                                           r"the longest segment"):
        build.check_positions(cfg)
    # the fix it names works: the same data with YaRN from the recipe
    cfg.model.rope_scaling.factor = 4.0
    assert build.check_positions(cfg).usable_positions == 1200
    # preprocess says the same, and takes --yarn-factor
    with pytest.raises(SystemExit, match=r"max_position_embeddings 300 .*Fix: either add YaRN"):
        preprocess.run(str(demo_data["pairs"]), str(tmp_path / "out"), "builtin:qwen2.5", 1024,
                       num_proc=1, model_config=str(short))
    preprocess.check_model(_FakeTokenizer(), str(short), 1024, yarn_factor=4.0)
    with pytest.raises(SystemExit, match=r"1200 usable positions \(YaRN factor 4 x 300\)"):
        preprocess.check_model(_FakeTokenizer(), str(short), 2048, yarn_factor=4.0)


class _FakeTokenizer:
    def __len__(self):
        return 10


def test_raised_max_positions_without_scaling_is_warned_of(tmp_path, capsys):
    from solopo_mcore.models.positions import trained_positions, unscaled_extension_warning

    raised = read_hf_config(_qwen_like(tmp_path, max_position_embeddings=131072))
    assert trained_positions(raised) == 32768  # a known reference shape
    warning = unscaled_extension_warning(raised, "qwen/config.json")
    assert "max_position_embeddings=131072 exceeds the 32768 positions" in warning
    assert '"factor": 4.0' in warning
    # an explicit top-level original length is honoured for any model
    other = shape_from_dict({**QWEN25_7B_INSTRUCT, "hidden_size": 512,
                             "max_position_embeddings": 8192,
                             "original_max_position_embeddings": 4096})
    assert "exceeds the 4096 positions" in unscaled_extension_warning(other, "x")
    # nothing to say for the stock config, a YaRN config or an unknown model
    assert unscaled_extension_warning(read_hf_config(_qwen_like(tmp_path)), "x") is None
    yarn = _qwen_like(tmp_path, rope_scaling={"type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 32768})
    assert unscaled_extension_warning(read_hf_config(yarn), "x") is None
    unknown = shape_from_dict({**QWEN25_7B_INSTRUCT, "hidden_size": 512,
                               "max_position_embeddings": 131072})
    assert unscaled_extension_warning(unknown, "x") is None
    # preprocess prints it
    from data_tools import preprocess
    preprocess.check_model(_FakeTokenizer(), str(_qwen_like(tmp_path,
                                                            max_position_embeddings=131072)),
                           65536)
    assert "untrained RoPE" in capsys.readouterr().out + capsys.readouterr().err


def test_rope_scaling_keys_are_checked(tmp_path):
    from solopo_mcore.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.rope_scaling.factor is set but "
                                          r"model.rope_scaling.type is null"):
        load_config("tiny_cpu", ["model.rope_scaling.factor=4"])
    with pytest.raises(ConfigError, match=r"model.rope_scaling.factor must be a number >= 1"):
        load_config("tiny_cpu", ["model.rope_scaling.type=yarn"])
    with pytest.raises(ConfigError, match=r"'linear' is not one of yarn"):
        load_config("tiny_cpu", ["model.rope_scaling.type=linear"])
    unsupported = dict(QWEN25_7B_INSTRUCT, rope_scaling={"type": "dynamic", "factor": 2.0})
    from solopo_mcore.models.hf_config import UnsupportedModelError
    with pytest.raises(UnsupportedModelError, match="rope scaling type 'dynamic' is not "
                                                    "supported"):
        shape_from_dict(unsupported, "cfg")


def test_unscaled_shape_is_untouched():
    shape = shape_from_dict(QWEN25_7B_INSTRUCT)
    from solopo_mcore.models.positions import with_rope_scaling
    assert with_rope_scaling(shape, None) is shape
    assert dataclasses.replace(shape).usable_positions == 32768


def test_a_llama3_checkpoint_from_before_yarn_support_still_resumes(tiny_llama):
    """Checkpoints recorded llama3 scaling without ``rope_type``; the same model now reads with
    it. The resume check must see the same shape, and still see a real difference."""
    from solopo_mcore.training.run_fingerprint import compare_run_fingerprints

    now = read_hf_config(tiny_llama).rope_scaling
    before = {k: v for k, v in now.items() if k != "rope_type"}
    key = "model_shape.rope_scaling"
    assert compare_run_fingerprints({key: before}, {key: now}) == []
    assert compare_run_fingerprints({key: dict(before, factor=4.0)}, {key: now})
