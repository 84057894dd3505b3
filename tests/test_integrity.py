"""Nothing lost, nothing silent: datasets, checkpoints, reference sidecars and resumes are checked
for being what they claim to be, and each refusal names the file or key and the fix."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.dist import run_distributed
from tests.helpers.launch import read_metrics, run_python, run_torchrun, tiny_run_overrides

REPO = Path(__file__).resolve().parent.parent


def _copy_dataset(prefix: str, dst: Path) -> str:
    dst.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(prefix + ext, str(dst / "data") + ext)
    return str(dst / "data")


# ------------------------------------------------------------------ items 2, 9: dataset files

def test_idx_from_another_dataset_of_the_same_size_is_refused(demo_data, tmp_path):
    from data_tools import preprocess
    from solopo_mcore.data.dataset import DatasetError, TripletDataset

    rows = (Path(demo_data["pairs"])).read_text().splitlines()
    (tmp_path / "reversed.jsonl").write_text("\n".join(reversed(rows)) + "\n")
    preprocess.run(str(tmp_path / "reversed.jsonl"), str(tmp_path / "other"), "builtin:qwen2.5",
                   1024, num_proc=1)
    mine = _copy_dataset(demo_data["prefix"], tmp_path / "mine")
    other = TripletDataset(str(tmp_path / "other"))
    assert len(other) == len(TripletDataset(mine))  # same example count, same .bin size
    assert os.path.getsize(str(tmp_path / "other.bin")) == os.path.getsize(mine + ".bin")
    shutil.copy(str(tmp_path / "other.idx"), mine + ".idx")
    with pytest.raises(DatasetError, match=f"{mine}.idx is not the index {mine}.meta.json"):
        TripletDataset(mine)


def _truncated_copy(demo_data, tmp_path, ext: str, old_meta: bool) -> tuple:
    """A copy of the demo dataset with ``PREFIX{ext}`` 100 bytes short (and, ``old_meta``, a
    meta.json written before file_checks existed); returns (prefix, the file's full size)."""
    prefix = _copy_dataset(demo_data["prefix"], tmp_path)
    size = os.path.getsize(prefix + ext)
    with open(prefix + ext, "r+b") as f:
        f.truncate(size - 100)
    if old_meta:
        meta = json.loads(Path(prefix + ".meta.json").read_text())
        del meta["file_checks"]
        Path(prefix + ".meta.json").write_text(json.dumps(meta))
    return prefix, size


@pytest.mark.parametrize("old_meta", [False, True], ids=["meta", "meta-without-file-checks"])
def test_truncated_idx_is_named_as_truncated(demo_data, tmp_path, old_meta):
    from solopo_mcore.data.dataset import DatasetError, TripletDataset

    prefix, size = _truncated_copy(demo_data, tmp_path, ".idx", old_meta)
    with pytest.raises(DatasetError, match=rf"{prefix}.idx is truncated: {size - 100} bytes, its "
                                           rf"header describes {size} \(\d+ sequences"):
        TripletDataset(prefix)


@pytest.mark.parametrize("old_meta", [False, True], ids=["meta", "meta-without-file-checks"])
def test_short_bin_is_refused_at_load_naming_the_file(demo_data, tmp_path, old_meta):
    from solopo_mcore.data.dataset import DatasetError, TripletDataset

    # old_meta: written before file_checks existed, the .idx still gives the size
    prefix, size = _truncated_copy(demo_data, tmp_path, ".bin", old_meta)
    with pytest.raises(DatasetError, match=f"{prefix}.bin holds {size - 100} bytes"):
        TripletDataset(prefix)


# ------------------------------------------------------------------ item 6: max positions

def test_segment_longer_than_max_position_embeddings_is_refused(demo_data, tmp_path):
    from data_tools import preprocess
    from solopo_mcore.config import RunConfig
    from solopo_mcore.data.dataset import DatasetError
    from solopo_mcore.models.hf_config import read_hf_config
    from solopo_mcore.training import build

    model = tmp_path / "short_model"
    model.mkdir()
    config = json.loads((Path(demo_data["model"]) / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=300)))
    with pytest.raises(SystemExit, match="--max-seq-length 1024 is longer than the model's "
                                         "max_position_embeddings 300"):
        preprocess.run(str(demo_data["pairs"]), str(tmp_path / "out"), "builtin:qwen2.5", 1024,
                       num_proc=1, model_config=str(model))
    assert not list(tmp_path.glob("out*"))
    # a dataset preprocessed for a longer model, loaded for this one
    shape = dataclasses.replace(read_hf_config(demo_data["model"]), max_position_embeddings=300)
    cfg = RunConfig()
    cfg.data.data_path = demo_data["prefix"]
    meta = json.loads(Path(demo_data["prefix"] + ".meta.json").read_text())
    longest = max(meta["lengths"]["long_prompt"]["max"], 0)
    assert longest > 300
    with pytest.raises(DatasetError, match=r"example \d+ \(id '.+'\) has a \d+-token segment, "
                                           r"longer than the model's max_position_embeddings 300"):
        build.open_dataset(cfg, shape, need_reference=False)


# ------------------------------------------------------------------ item 11: empty dataset

def test_empty_dataset_fails_preprocess_and_is_named_by_the_trainer(demo_data, tmp_path, capsys):
    import numpy as np_
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from data_tools import preprocess
    from solopo_mcore.data.dataset import DatasetError, TripletDataset

    with pytest.raises(SystemExit, match=r"0 examples written from .*skipped \d+: too_long=\d+"):
        preprocess.run(str(demo_data["pairs"]), str(tmp_path / "none"), "builtin:qwen2.5", 10,
                       num_proc=1)
    assert not list(tmp_path.glob("none*"))  # nothing half-written
    # an empty dataset (as older versions wrote it) is named, with how it was built
    prefix = str(tmp_path / "empty")
    IndexedDatasetBuilder(prefix + ".bin", dtype=np_.int32).finalize(prefix + ".idx")
    meta = json.loads(Path(demo_data["prefix"] + ".meta.json").read_text())
    meta.update(num_examples=0, report={"read": 5, "skipped": {"too_long": 5}}, source="x.jsonl")
    meta.pop("file_checks")
    Path(prefix + ".meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=rf"dataset '{prefix}' is empty: 0 examples \(built by "
                                           r"data_tools.preprocess from x.jsonl, which read 5"):
        TripletDataset(prefix)


# ------------------------------------------------------------------ item 12: data_path

def test_missing_data_path_fails_before_any_process_group(demo_data, tmp_path):
    from solopo_mcore.config import ConfigError, load_config
    from solopo_mcore.training.trainer import Trainer

    base = [f"model.hf_config_path={demo_data['model']}"]
    with pytest.raises(ConfigError, match="data.data_path is not set"):
        Trainer(load_config("tiny_cpu", base))
    with pytest.raises(ConfigError, match=f"data.data_path={tmp_path}/nope: "
                                          f"{tmp_path}/nope.bin, .*nope.meta.json do not exist"):
        Trainer(load_config("tiny_cpu", base + [f"data.data_path={tmp_path}/nope"]))
    import torch.distributed as dist
    assert not dist.is_initialized()


# ------------------------------------------------------------------ item 4: reference weights

def test_reference_sidecar_from_other_weights_is_refused(demo_data, tiny_qwen2, tmp_path):
    from solopo_mcore.config import RunConfig
    from solopo_mcore.data.dataset import DatasetError, TripletDataset, save_reference_sidecar
    from solopo_mcore.models.hf_config import read_hf_config
    from solopo_mcore.training import build
    from solopo_mcore.storage.integrity import weights_fingerprint

    dataset = TripletDataset(demo_data["prefix"])
    sidecar = str(tmp_path / "ref")
    save_reference_sidecar(sidecar, np.zeros((len(dataset), 4)), {
        "dataset_fingerprint": dataset.fingerprint, "model": {"hf_checkpoint": tiny_qwen2},
        "model_fingerprint": weights_fingerprint(tiny_qwen2)})
    cfg = RunConfig()
    cfg.data.data_path, cfg.data.ref_logprobs_path = demo_data["prefix"], sidecar
    shape = read_hf_config(demo_data["model"])
    other, mine = weights_fingerprint(demo_data["model"]), weights_fingerprint(tiny_qwen2)
    assert other != mine
    with pytest.raises(DatasetError, match=rf"computed with the weights of .*{tiny_qwen2}.* "
                                           rf"\(fingerprint {mine[:12]}\.\.\.\), but this run "
                                           rf"starts from {demo_data['model']} \(fingerprint "
                                           rf"{other[:12]}"):
        build.open_dataset(cfg, shape, True, start_weights=str(demo_data["model"]))
    with pytest.raises(DatasetError, match="starts from random initialisation"):
        build.open_dataset(cfg, shape, True, start_weights=build.RANDOM_INIT)
    # the matching weights pass, and the sidecar's own fingerprint is recorded for resumes
    ok = build.open_dataset(cfg, shape, True, start_weights=tiny_qwen2)
    assert ok.reference_fingerprint and ok.ref_logp.shape == (len(dataset), 4)


# ------------------------------------------------------------------ items 3, 10: checksums

def test_corrupt_or_truncated_shard_is_named_and_the_previous_checkpoint_used(tiny_qwen2,
                                                                             tmp_path):
    root = tmp_path / "ckpt"
    out = run_distributed(1, "tests.helpers.integrity_checks:check_checksums_and_fallback",
                          hf_dir=tiny_qwen2, root=str(root))[0]
    assert "checksums.json" in out["saved"] and "solopo_state.json" in out["saved"]
    assert f"{out['shard']}: SHA-256 differs from the one recorded at save time" in \
        out["strict_error"] and "checkpoint.strict_load=true" in out["strict_error"]
    assert "iter_0000004" in out["after_strict"]  # strict: nothing moved
    assert f"{out['shard']}: SHA-256 differs" in out["direct_load_error"]
    assert out["fallback"] == "iter_0000002" and out["loaded_step2_weights"]
    assert "iter_0000004.corrupt" in out["after_fallback"]  # moved aside, never deleted
    # the next save prunes with keep_last=2: the intact step 2 survives, the corrupt one is kept
    assert out["after_save6"] == ["iter_0000002", "iter_0000004.corrupt", "iter_0000006",
                                  "latest"]
    assert f"{out['shard6']}: " in out["truncated_error"] and "(truncated or overwritten)" in \
        out["truncated_error"]
    assert out["truncated_fallback"] == "iter_0000002"


def test_full_disk_during_a_save_is_one_clear_error_and_keeps_the_last_checkpoint(tiny_qwen2,
                                                                               tmp_path):
    root = tmp_path / "ckpt"
    out = run_distributed(1, "tests.helpers.integrity_checks:check_disk_full_during_save",
                          hf_dir=tiny_qwen2, root=str(root))[0]
    assert out["error"].startswith(f"no space left on the device while saving step 4 to "
                                   f"{root}/iter_0000004: about ")
    assert "GiB needed (the size of iter_0000002)" in out["error"]
    assert f"the last good checkpoint {root}/iter_0000002 is intact and stays latest" in \
        out["error"] and "run the same command again to resume" in out["error"]
    assert out["after"] == ["iter_0000002", "latest"]  # the partial save is gone
    assert out["latest"] == "2" and out["loads"] == 2


def test_too_little_free_space_for_the_next_checkpoint_is_warned(tmp_path, monkeypatch):
    import collections

    from solopo_mcore.storage import checkpoint as storage
    step = tmp_path / "iter_0000002"
    step.mkdir()
    for name, size in (("metadata.json", 10), ("solopo_state.json", 10), ("__0_0.distcp", 3000)):
        (step / name).write_bytes(b"x" * size)
    (tmp_path / "latest").write_text("2")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage(10**9, 0, 10**6))
    assert storage.CheckpointManager(str(tmp_path), 2).space_problem() is None
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage(10**9, 0, 2000))
    problem = storage.CheckpointManager(str(tmp_path), 2).space_problem()
    assert problem.startswith(f"{tmp_path}: 0.00 GiB free, the next checkpoint needs about") \
        and "(the size of iter_0000002)" in problem and "checkpoint.keep_last" in problem


# ------------------------------------------------------------------ item 1: resume

def test_demo_variants_get_their_own_output_folders():
    import importlib.util
    spec = importlib.util.spec_from_file_location("demo_cpu", REPO / "examples" / "demo_cpu.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    folders = {demo.default_out(demo.variant_name(m, a, cp)) for m in ("tiny", "smollm2-135m")
               for a in ("orpo", "dpo", "simpo") for cp in (False, True)}
    assert len(folders) == 12


def test_run_fingerprint_names_each_difference(demo_data):
    from solopo_mcore.config import load_config
    from solopo_mcore.models.hf_config import read_hf_config
    from solopo_mcore.training.run_fingerprint import compare_run_fingerprints, run_fingerprint

    shape = read_hf_config(demo_data["model"])
    base = load_config("tiny_cpu")
    same_run = load_config("tiny_cpu", ["training.train_steps=99", "parallel."
                                        "tensor_model_parallel_size=1", "logging.log_interval=5",
                                        "data.global_batch_size=8", "checkpoint.save_interval=1"])
    other = load_config("tiny_cpu", ["objective.algorithm=simpo", "objective.alpha=3.0",
                                     "training.seed=1"])
    saved = run_fingerprint(base, shape, "data-a", None)
    assert compare_run_fingerprints(saved, run_fingerprint(same_run, shape, "data-a", None)) == []
    assert compare_run_fingerprints(saved, run_fingerprint(other, shape, "data-b", "ref")) == [
        ("data.fingerprint", "data-a", "data-b"), ("data.reference_fingerprint", None, "ref"),
        ("objective.algorithm", "orpo", "simpo"), ("objective.alpha", 1.0, 3.0),
        ("training.seed", 1234, 1)]


@pytest.mark.e2e
def test_resume_refuses_other_settings_and_a_finished_run_rewrites_nothing(run_data, tmp_path):
    common = ["data.num_eval_examples=0", f"checkpoint.export_hf_dir={tmp_path / 'hf'}"]
    run_torchrun(1, tiny_run_overrides(run_data, tmp_path, 2, extra=common))
    ckpt = tmp_path / "ckpt"
    state = json.loads((ckpt / "iter_0000002" / "solopo_state.json").read_text())
    assert state["run_fingerprint"]["objective.algorithm"] == "orpo"
    # another algorithm into the same save_dir: refused, both values and the fix named
    with pytest.raises(AssertionError) as info:
        run_torchrun(1, tiny_run_overrides(run_data, tmp_path, 4, extra=common + ["objective.algorithm=simpo"]))
    text = str(info.value)
    assert "refusing to resume" in text and \
        "objective.algorithm: checkpoint 'orpo', this run 'simpo'" in text
    assert f"checkpoint.load_dir={ckpt} checkpoint.finetune=true" in text
    # the finished run again: says so, rewrites neither checkpoints nor the export
    stamps = {p: p.stat().st_mtime_ns for p in [*(tmp_path / "hf").iterdir(),
                                                 *(ckpt / "iter_0000002").iterdir()]}
    result = run_torchrun(1, tiny_run_overrides(run_data, tmp_path, 2, extra=common))
    assert "nothing to train: the checkpoint is at step 2 and training.train_steps=2" in \
        result.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000002", "latest"]
    # finetune: a new run from those weights, in its own save_dir, at step 0
    new = tmp_path / "finetune"
    result = run_torchrun(1, tiny_run_overrides(run_data, new, 1, extra=[
        "data.num_eval_examples=0", "objective.algorithm=simpo", f"checkpoint.load_dir={ckpt}",
        "checkpoint.finetune=true"]))
    assert f"initialised weights from {ckpt / 'iter_0000002'}" in result.stdout
    train, _ = read_metrics(new / "metrics.jsonl")
    assert [r["step"] for r in train] == [1]
    assert json.loads((new / "ckpt" / "iter_0000001" / "solopo_state.json").read_text())[
        "run_fingerprint"]["objective.algorithm"] == "simpo"
    # extended from 2 to 6 steps: the schedule (warmup 3, so it spanned 4 steps) is re-planned
    # over 6 on request, and the resume says so; written out, step 5 (4 steps done, 1 of 3 into
    # the cosine) runs at min_lr + 0.75 (lr - min_lr), not at min_lr
    result = run_torchrun(1, tiny_run_overrides(run_data, tmp_path, 6, extra=common + [
        "optimizer.override_lr_schedule=true"]))
    assert "training.train_steps=6, but the checkpoint's LR schedule spans 4: optimizer." \
           "override_lr_schedule=true re-planned warmup + cosine over 6 steps" in result.stdout
    train, _ = read_metrics(tmp_path / "metrics.jsonl")
    lr = {r["step"]: r["optimizer/lr"] for r in train}
    assert lr[5] == pytest.approx(3e-4 + 0.75 * (3e-3 - 3e-4), rel=1e-6)


def test_a_finished_demo_of_another_variant_is_refused_and_the_same_one_named(tmp_path):
    """``demo_cpu.py --algorithm dpo --out F`` where F holds a finished ORPO demo: exit 1 naming
    both variants and --out; asked for ORPO, it reports ORPO's figures under that name. Demos from
    before the variant was recorded are read from their checkpoint's config."""
    report = {"num_eval_examples": 4, "pairwise": {}, "variant": "orpo", "answer": {
        when: {ctx: {"value": 0.5, "ci95": [0.1, 0.9], "n": 4} for ctx in ("short", "long")}
        for when in ("before", "after")}}
    (tmp_path / "learning.json").write_text(json.dumps(report))

    def demo(*args):
        return run_python("examples/demo_cpu.py", ["--out", tmp_path, *args], timeout=300)
    other = demo("--algorithm", "dpo")
    assert other.returncode == 1
    assert f"{tmp_path} holds a finished demo of variant orpo, not dpo as asked" in other.stderr
    assert "--out NEW_FOLDER (its default is runs/demo/dpo)" in other.stderr
    assert "Greedy answer accuracy" not in other.stdout
    same = demo("--algorithm", "orpo")
    assert same.returncode == 0, same.stderr
    assert "finished demo of variant orpo" in same.stdout and \
        "What the model learned (orpo):" in same.stdout
    # an older learning.json without the variant: the checkpoint's config says it
    del report["variant"]
    (tmp_path / "learning.json").write_text(json.dumps(report))
    iteration = tmp_path / "run" / "checkpoints" / "iter_0000010"
    iteration.mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("10")
    (iteration / "metadata.json").write_text("{}")
    (iteration / "solopo_state.json").write_text(json.dumps({"config": {
        "objective": {"algorithm": "simpo"}, "parallel": {"context_parallel_size": 2}}}))
    cp = demo("--algorithm", "simpo")
    assert cp.returncode == 1 and "variant simpo-cp, not simpo as asked" in cp.stderr
