"""examples/convert_checkpoint.py: HF <-> Megatron for Qwen2 (QKV bias, tied/untied) and Llama 3.1
(GQA, rope scaling), proven by logits parity with transformers and bitwise round trips."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.launch import REPO, run_script, run_torchrun


def convert(*args, check=True, real=False):
    """examples/convert_checkpoint.py ARGS. Its ranks come from the warm launcher
    (tests/helpers/warm_launch.py) unless ``real``: the real command relaunches itself under
    torchrun at --tp x --pp > 1, after its layout check (test_a_layout_the_model_cannot_split...,
    test_trained_checkpoint_exports...)."""
    args = [str(a) for a in args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    world = 1
    for flag in ("--tp", "--pp"):
        if flag in args:
            world *= int(args[args.index(flag) + 1])
    if not real:
        result = run_script(world, "examples/convert_checkpoint.py", args, env=env)
    else:
        result = subprocess.run([sys.executable, "examples/convert_checkpoint.py", *args],
                                cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def _hf_tensors(directory):
    out = {}
    for f in Path(directory).glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("fixture,tp,pp", [
    ("tiny_qwen2", 2, 2), ("tiny_qwen2_untied", 1, 1), ("tiny_llama", 1, 2),
])
def test_round_trip_verified_and_bitwise(fixture, tp, pp, request, tmp_path):
    src = request.getfixturevalue(fixture)
    out = convert("hf-to-mcore", "--src", src, "--dst", tmp_path / "mcore", "--tp", tp,
                  "--pp", pp, "--verify", "--tolerance", "1e-4")
    assert "max |logit diff| vs transformers" in out.stdout
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report["max_abs_logit_diff"] < 1e-4
    # export at another layout than the one converted at
    # (in files of at most 200 kB: several per pipeline stage, streamed tensor by tensor)
    convert("mcore-to-hf", "--src", tmp_path / "mcore", "--dst", tmp_path / "hf",
            "--tp", pp, "--pp", tp, "--max-shard-gb", "0.0002")
    files = sorted((tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 3 and files[-1].name == f"model-{len(files):05d}-of-{len(files):05d}" \
        ".safetensors", [f.name for f in files]
    original, exported = _hf_tensors(src), _hf_tensors(tmp_path / "hf")
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == \
        json.loads((Path(src) / "config.json").read_text())["architectures"]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_bad_inputs_name_the_tensor_or_key(tiny_qwen2, tmp_path):
    bad_arch = tmp_path / "mistral"
    shutil.copytree(tiny_qwen2, bad_arch)
    cfg = json.loads((bad_arch / "config.json").read_text())
    (bad_arch / "config.json").write_text(json.dumps({**cfg, "architectures":
                                                      ["MistralForCausalLM"]}))
    r = convert("hf-to-mcore", "--src", bad_arch, "--dst", tmp_path / "o1", check=False)
    assert r.returncode != 0 and "MistralForCausalLM" in r.stderr and "is not supported" in r.stderr



def test_bad_tensors_layouts_and_destinations_are_named(tiny_qwen2, tmp_path):
    """The same checks the CLI runs, called in-process (a subprocess each would cost ~10 s)."""
    from solopo_mcore.config import ParallelConfig
    from solopo_mcore.convert.destination import StagedDestination
    from solopo_mcore.convert.hf_io import HFCheckpointReader
    from solopo_mcore.convert.tables import ConversionError, load_hf_tensors_into_chunks
    from solopo_mcore.models.hf_config import read_hf_config
    from solopo_mcore.models.layout_fit import check_model_fits_layout
    from solopo_mcore.parallel.layout import LayoutError

    shape = read_hf_config(tiny_qwen2)
    tensors = _hf_tensors(tiny_qwen2)
    for case, mutate, message in [
        ("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
         "missing tensor(s) ['model.layers.1.mlp.up_proj.weight']"),
        ("extra", lambda t: t.__setitem__("model.layers.9.foo.weight", torch.zeros(2)),
         "unexpected tensor(s) ['model.layers.9.foo.weight']"),
    ]:
        d = tmp_path / case
        shutil.copytree(tiny_qwen2, d)
        t = dict(tensors)
        mutate(t)
        save_file(t, str(d / "model.safetensors"))
        with pytest.raises(ConversionError) as err:
            HFCheckpointReader(str(d)).check_names(shape)
        assert message in str(err.value)

    class Chunk(torch.nn.Module):  # the parameter names of a one-layer local-spec model
        def __init__(self):
            super().__init__()
            self.decoder = torch.nn.Module()
            layer = torch.nn.Module()
            layer.layer_number = 1
            layer.self_attention = torch.nn.Module()
            layer.self_attention.linear_proj = torch.nn.Module()
            layer.self_attention.linear_proj.weight = torch.nn.Parameter(torch.zeros(64, 32))
            self.decoder.layers = torch.nn.ModuleList([layer])
    with pytest.raises(ConversionError, match=r"model.layers.0.self_attn.o_proj.weight has shape "
                       r"\(\d+, \d+\); decoder.layers.0.self_attention.linear_proj.weight needs "
                       r"\(64, 32\)"):
        load_hf_tensors_into_chunks([Chunk()], tensors.__getitem__, shape, None)

    with pytest.raises(LayoutError, match="does not divide the 2 KV groups"):
        check_model_fits_layout(shape, ParallelConfig(tensor_model_parallel_size=4))

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ConversionError, match="exists and is not empty; pass --overwrite"):
        StagedDestination(str(tmp_path / "taken"), overwrite=False).check()
    # --overwrite replaces a model folder, never a folder of other files
    with pytest.raises(ConversionError, match="holds neither a Megatron checkpoint nor an HF "
                                              "model; --overwrite would delete its files"):
        StagedDestination(str(tmp_path / "taken"), overwrite=True).check()
    (tmp_path / "taken" / "config.json").write_text("{}")
    StagedDestination(str(tmp_path / "taken"), overwrite=True).check()
    assert (tmp_path / "taken" / "file").read_text() == "x"  # nothing deleted before the swap
    # siblings the converter would replace, made by someone else, are refused by name
    for sibling in ("taken.partial", "taken.failed-verify", "taken.old"):
        (tmp_path / sibling).mkdir()
        with pytest.raises(ConversionError, match=f"{tmp_path / sibling} exists"):
            StagedDestination(str(tmp_path / "taken"), overwrite=True).check()
        (tmp_path / sibling).rmdir()
    # and a --src named after --dst's siblings (the converter would delete it)
    from solopo_mcore.convert.destination import check_source_and_destination
    with pytest.raises(ConversionError, match=r"--dst.partial .* is the same path as --src"):
        check_source_and_destination(str(tmp_path / "m.partial"), str(tmp_path / "m"))


def test_trained_checkpoint_exports_and_verifies(run_data, tmp_path):
    """A checkpoint after a few training steps exports to HF whose logits match it."""
    run_torchrun(1, [f"model.hf_config_path={run_data['model']}",
                     f"checkpoint.hf_init_dir={run_data['model']}",
                     f"data.data_path={run_data['prefix']}",
                     "parallel.tensor_model_parallel_size=1", "training.train_steps=3",
                     "data.num_eval_examples=0", f"checkpoint.save_dir={tmp_path / 'ckpt'}"])
    # the real command: it relaunches itself under torchrun for its 2 ranks
    out = convert("mcore-to-hf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "hf", "--tp", 2,
                  "--verify", "--tolerance", "1e-4", real=True)
    assert "max |logit diff| vs transformers" in out.stdout
    exported, initial = _hf_tensors(tmp_path / "hf"), _hf_tensors(run_data["model"])
    assert not torch.equal(exported["model.norm.weight"], initial["model.norm.weight"])
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for shard in (tmp_path / "hf").glob("*.safetensors"):  # as any new file: not 0600
        assert shard.stat().st_mode & 0o777 == 0o666 & ~umask, oct(shard.stat().st_mode)
    # a reader outside the trainer verifies too: 1 MiB overwritten inside a shard is refused,
    # naming the shard, and nothing is exported
    shard = sorted((tmp_path / "ckpt" / "iter_0000003").glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.seek(max(0, shard.stat().st_size // 2 - (1 << 19)))
        f.write(os.urandom(min(1 << 20, shard.stat().st_size)))
    bad = convert("mcore-to-hf", "--src", tmp_path / "ckpt", "--dst", tmp_path / "hf_bad",
                  check=False)
    assert bad.returncode != 0 and f"{shard}: SHA-256 differs" in bad.stderr, bad.stderr[-3000:]
    assert "unexpected" not in bad.stderr
    assert not list(tmp_path.glob("hf_bad*"))  # no DST, DST.partial or DST.config_tmp left


def test_conversion_holds_one_layer_not_the_model(tmp_path):
    """Both directions at TP1: the peak RSS of converting a 16-layer model exceeds that of a
    2-layer model of the same width by far less than the weights (a converter that builds
    the whole model, or keeps every layer it reads, adds at least 1x the weights).

    Warm launches: a forked rank does not inherit the server's peak RSS (VmHWM), and both models
    start from the same ~0.4 GiB of imports, which the difference cancels. Checked: a converter
    that keeps each shard it reads (hf-to-mcore) or reads every layer before writing
    (mcore-to-hf), or that leaves glibc's dynamic mmap threshold on (the freed layers stay in
    its heap), fails here: +0.19 / +0.28 / +0.12 GB against a bound of 0.10."""
    from solopo_mcore.models.tiny import build_tiny_hf_model

    wide = {"hidden_size": 512, "intermediate_size": 2816, "num_attention_heads": 8,
            "num_key_value_heads": 2}
    peaks, weights = {}, {}
    for name, layers in (("short", 2), ("deep", 16)):
        hf = tmp_path / name
        build_tiny_hf_model(hf, "qwen2", vocab_size=1000, seed=0,
                            overrides=dict(wide, num_hidden_layers=layers))
        weights[name] = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
        there = convert("hf-to-mcore", "--src", hf, "--dst", tmp_path / f"{name}_mcore")
        back = convert("mcore-to-hf", "--src", tmp_path / f"{name}_mcore",
                       "--dst", tmp_path / f"{name}_hf")
        peaks[name] = [json.loads(r.stdout[r.stdout.index("{"):])["peak_rss_gib_rank0"] * 2**30
                       for r in (there, back)]
    added_weights = weights["deep"] - weights["short"]  # 14 layers, ~300 MB in fp32
    for direction, short, deep in zip(("hf-to-mcore", "mcore-to-hf"), *peaks.values()):
        assert deep - short < 0.35 * added_weights, (direction, deep - short, added_weights)


def test_training_from_a_converted_checkpoint_equals_training_from_hf(run_data, tmp_path):
    """The converter's dist checkpoint, written at TP2 (another vocabulary padding), loads
    through training's own loader at TP1: step-1 loss and rewards equal the run from HF."""
    from tests.helpers.launch import read_metrics, tiny_run_overrides

    convert("hf-to-mcore", "--src", run_data["model"], "--dst", tmp_path / "mcore", "--tp", 2)
    quiet = ["data.num_eval_examples=0"]
    run_torchrun(1, tiny_run_overrides(run_data, tmp_path / "from_hf", 1, extra=quiet))
    result = run_torchrun(1, tiny_run_overrides(run_data, tmp_path / "from_mcore", 1, extra=[
        *quiet, f"checkpoint.load_dir={tmp_path / 'mcore'}", "checkpoint.finetune=true"]))
    assert "initialised weights from" in result.stdout
    (hf_row,), _ = read_metrics(tmp_path / "from_hf" / "metrics.jsonl")
    (mcore_row,), _ = read_metrics(tmp_path / "from_mcore" / "metrics.jsonl")
    for key in ("loss/total", "reward/chosen_short", "reward/margin_short"):
        assert abs(hf_row[key] - mcore_row[key]) <= 1e-6 * max(1.0, abs(hf_row[key])), key


def test_export_follows_the_checkpoint_not_the_source_folder(tiny_qwen2, tmp_path):
    """mcore-to-hf writes config.json from the architecture the checkpoint records, in the
    dtype it was saved in (bf16 here), even after the source folder changed."""
    src = tmp_path / "src"
    shutil.copytree(tiny_qwen2, src)
    convert("hf-to-mcore", "--src", src, "--dst", tmp_path / "mcore", "--dtype", "bf16")
    cfg = json.loads((src / "config.json").read_text())
    eps = cfg["rms_norm_eps"]
    (src / "config.json").write_text(json.dumps(dict(cfg, rms_norm_eps=eps * 2)))
    convert("mcore-to-hf", "--src", tmp_path / "mcore", "--dst", tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["rms_norm_eps"] == eps
    assert exported.get("dtype", exported.get("torch_dtype")) == "bfloat16"
    tensors = _hf_tensors(tmp_path / "hf")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    original = _hf_tensors(tiny_qwen2)
    for name, tensor in original.items():
        assert torch.equal(tensor.to(torch.bfloat16), tensors[name]), name


def test_wrong_config_or_truncated_file_is_refused_before_any_work(tiny_qwen2, tmp_path):
    from solopo_mcore.convert.hf_io import HFCheckpointReader
    from solopo_mcore.convert.tables import ConversionError

    src = tmp_path / "src"
    shutil.copytree(tiny_qwen2, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=2 *
                                                     cfg["intermediate_size"])))
    out = convert("hf-to-mcore", "--src", src, "--dst", tmp_path / "mcore", check=False)
    assert out.returncode != 0 and "ConversionError" in out.stderr and \
        "needs" in out.stderr and "is the config.json that of these weights?" in out.stderr, \
        out.stderr[-2000:]
    assert "unexpected" not in out.stderr
    assert not list(tmp_path.glob("mcore*"))  # nothing staged
    shard = src / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ConversionError, match=f"{shard}: not a readable safetensors file"):
        HFCheckpointReader(str(src))


def test_yarn_model_round_trip_carries_rope_scaling_and_verifies_past_its_positions(
        tiny_qwen2_yarn, tmp_path):
    """Qwen2.5's YaRN (scaled down: 256 trained positions, factor 4): --verify at 1,000 tokens
    both ways, rope_scaling in the recorded and the exported config.json, weights bitwise."""
    src_config = json.loads((Path(tiny_qwen2_yarn) / "config.json").read_text())
    out = convert("hf-to-mcore", "--src", tiny_qwen2_yarn, "--dst", tmp_path / "mcore",
                  "--verify", "--verify-tokens", "1000", "--tolerance", "1e-4")
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report["verify_tokens"] == 1000 and report["max_abs_logit_diff"] < 1e-4
    out = convert("mcore-to-hf", "--src", tmp_path / "mcore", "--dst", tmp_path / "hf",
                  "--verify", "--verify-tokens", "1000", "--tolerance", "1e-4")
    assert json.loads(out.stdout[out.stdout.index("{"):])["verify_tokens"] == 1000
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    key = "rope_parameters" if "rope_parameters" in src_config else "rope_scaling"
    assert exported[key] == src_config[key] and exported[key]["rope_type"] == "yarn"
    original, back = _hf_tensors(tiny_qwen2_yarn), _hf_tensors(tmp_path / "hf")
    assert all(torch.equal(t, back[n]) for n, t in original.items())
    # past the usable positions is refused before anything is written
    r = convert("hf-to-mcore", "--src", tiny_qwen2_yarn, "--dst", tmp_path / "again",
                "--verify", "--verify-tokens", "2000", check=False)
    assert r.returncode != 0 and "more than the model's 1024 usable positions" in r.stderr
    assert not (tmp_path / "again").exists()


def test_a_layout_the_model_cannot_split_is_refused_before_torchrun(tiny_qwen2, tmp_path):
    """--tp that does not divide the heads, --pp that does not divide the layers: one line
    naming the option, from the first process (no torchrun relaunch, no traceback)."""
    r = convert("hf-to-mcore", "--src", tiny_qwen2, "--dst", tmp_path / "o", "--tp", "3",
                check=False, real=True)
    assert r.returncode != 0
    assert "--tp=3 does not divide num_attention_heads=4; choose a TP that divides the heads " \
           "and the 2 KV groups: 1, 2" in r.stderr
    assert "torch.distributed" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    convert("hf-to-mcore", "--src", tiny_qwen2, "--dst", tmp_path / "m")
    r = convert("mcore-to-hf", "--src", tmp_path / "m", "--dst", tmp_path / "h", "--pp", "3",
                check=False, real=True)
    assert r.returncode != 0 and "num_layers=4 is not divisible by --pp" in r.stderr
    assert "torch.distributed" not in r.stderr
