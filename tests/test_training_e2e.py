"""End-to-end CPU training runs through torchrun (gloo): the trainer, its logs and checkpoints."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests.helpers.launch import (REPO, TINY_RECIPE, read_metrics, run_python, run_script,
                                  run_torchrun, smollm2_shape_config, tiny_run_overrides,
                                  torchrun_cmd)

pytestmark = pytest.mark.e2e


def test_tp2_training_loss_decreases_and_logs_every_metric(run_data, tmp_path):
    """Also with YaRN from the recipe (model.rope_scaling, as the Qwen2.5 long recipes set it;
    the ~200-token long contexts run past its 128 'trained' positions): the exported
    config.json carries it and transformers loads it."""
    result = run_torchrun(2, tiny_run_overrides(run_data, tmp_path, 10, tp=2, extra=[
        f"logging.tensorboard_dir={tmp_path / 'tb'}", "training.eval_interval=5",
        "checkpoint.save_interval=5", f"checkpoint.export_hf_dir={tmp_path / 'hf'}",
        "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
        "model.rope_scaling.original_max_position_embeddings=128"]),
        show_warnings=True)
    # a user's bare torchrun command: no page of third-party warnings from every rank
    warned = [line for line in result.stderr.splitlines() if "Warning:" in line]
    assert not warned, "\n".join(warned)
    train, evals = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in train] == list(range(1, 11))
    first = sum(r["loss/total"] for r in train[:3]) / 3
    last = sum(r["loss/total"] for r in train[-3:]) / 3
    assert last < first - 0.5, (first, last)
    keys = {"loss/total", "loss/po", "loss/solo_ra", "reward/chosen_short",
            "reward/rejected_short", "reward/chosen_long", "reward/margin_short",
            "accuracy/short", "reward/distance_chosen", "length/chosen_tokens",
            "optimizer/lr", "optimizer/grad_norm", "throughput/tokens_per_sec_per_gpu",
            "throughput/tflops_per_gpu", "memory/max_rss_gib", "time/step_sec"}
    assert keys <= set(train[-1]), keys - set(train[-1])
    assert [r["step"] for r in evals] == [0, 5, 10]  # step 0: the initial model
    # the held-out split it evaluates, beside the metrics, ready for evaluate_qa --input
    meta = json.loads(open(run_data["prefix"] + ".meta.json").read())
    heldout = [json.loads(line) for line in open(tmp_path / "heldout.jsonl")]
    assert [r["id"] for r in heldout] == meta["example_ids"][-8:]  # tiny_cpu: 8 held out
    assert all(r["prompt_long"] and r["answers"] for r in heldout)
    from solopo_mcore.evaluation.items import TRIPLET_FIELDS, read_heldout, triplet_items
    assert len(triplet_items(read_heldout(str(tmp_path / "heldout.jsonl"),
                                          TRIPLET_FIELDS))) == 2 * 8  # short and long
    assert {"eval/accuracy/short", "eval/accuracy/long",
            "eval/reward/distance_chosen"} <= set(evals[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert keys | {"eval/accuracy/long"} <= set(acc.Tags()["scalars"])
    # checkpoints: keep_last=2 of {5, 10}; HF export loads in transformers
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == \
        ["iter_0000005", "iter_0000010", "latest"]
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    rope = exported.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == \
        ("yarn", 4.0, 128)


def test_solo_reward_distance_shrinks(run_data, tmp_path):
    """Full-batch SoLo-SimPO with a strong alignment weight: |r(x_short,y_w) - r(x_long,y_w)|
    on the same batch falls."""
    run_torchrun(1, tiny_run_overrides(run_data, tmp_path, 8, extra=[
        "data.global_batch_size=8", "data.micro_batch_size=4", "data.shuffle=false",
        "data.num_eval_examples=0", "objective.algorithm=simpo", "objective.beta=10.0",
        "objective.alpha=20.0", "optimizer.lr=1e-3", "optimizer.lr_warmup_steps=0",
        "checkpoint.save_dir=null"]))
    train, _ = read_metrics(tmp_path / "metrics.jsonl")
    # 8 examples, batch 8, no shuffle: every step sees the same batch
    distances = [r["reward/distance_chosen"] for r in train]
    assert distances[-1] < 0.5 * distances[0], distances


def test_resume_equals_uninterrupted_run_bitwise(run_data, tmp_path):
    """The uninterrupted run under the real torchrun, the interrupted one from the warm
    launcher (tests/helpers/warm_launch.py): bitwise equal also shows that the warm launcher
    runs the trainer as torchrun does."""
    common = ["training.deterministic=true", "checkpoint.save_interval=3",
              "data.num_eval_examples=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_torchrun(1, tiny_run_overrides(run_data, straight, 6, extra=common), real=True)
    run_torchrun(1, tiny_run_overrides(run_data, resumed, 6, extra=common + ["training.exit_interval=3"]))
    assert (resumed / "ckpt" / "latest").read_text() == "3"
    run_torchrun(1, tiny_run_overrides(run_data, resumed, 6, extra=common))
    a, _ = read_metrics(straight / "metrics.jsonl")
    b, _ = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss/total", "loss/po", "loss/solo_ra", "optimizer/grad_norm",
                    "optimizer/lr"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])


def test_resume_at_a_different_tensor_parallel_layout(run_data, tmp_path):
    common = ["checkpoint.save_interval=3", "data.num_eval_examples=0"]
    run_torchrun(1, tiny_run_overrides(run_data, tmp_path, 6, extra=common + ["training.exit_interval=3"]))
    run_torchrun(2, tiny_run_overrides(run_data, tmp_path, 6, tp=2, extra=common))
    train, _ = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[3]["loss/total"] < train[0]["loss/total"]


def test_sigterm_saves_a_loadable_checkpoint(run_data, tmp_path):
    """SIGTERM to the launcher's whole process group (as torchrun and Slurm deliver it) after
    earlier saves: the save the signal asks for completes (dist_checkpointing's writer server,
    started by the earlier saves, must survive the same signal). While it trains, a second run
    into the same checkpoint.save_dir, and a third into the same logging.metrics_path, are
    refused, naming the first; after the first exits, its lock is gone and the folder resumes."""
    cmd = torchrun_cmd(1, "examples/pretrain_solopo.py", "--config", TINY_RECIPE,
                       *tiny_run_overrides(run_data, tmp_path, 500,
                                           extra=["data.num_eval_examples=0",
                                                  "checkpoint.save_interval=1"]))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or
                                      len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.5)
    def another_run(run_dir, override):  # a second trainer beside the live one
        return run_script(1, "examples/pretrain_solopo.py", [
            "--config", TINY_RECIPE, *tiny_run_overrides(run_data, run_dir, 500,
                                                         extra=[override])],
            env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    second = another_run(tmp_path / "second", f"checkpoint.save_dir={tmp_path / 'ckpt'}")
    assert second.returncode != 0 and "is in use by another run" in second.stderr, \
        second.stderr[-3000:]
    # a run with its own save_dir but the first's metrics file: refused too, naming the key
    # and the first run's id, which every record of the (never renamed) file carries
    third = another_run(tmp_path / "third", f"logging.metrics_path={metrics}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    run_ids = {r["run_id"] for r in records}
    assert len(run_ids) == 1 and not list(tmp_path.glob("metrics.jsonl.before-*"))
    assert third.returncode != 0 and f"logging.metrics_path={metrics} is in use by another " \
        f"run" in third.stderr and f"run id {run_ids.pop()}" in third.stderr, \
        third.stderr[-3000:]
    assert proc.poll() is None  # the first run went on
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    announced = re.search(r"SIGTERM: saving at step (\d+)", output)
    assert announced, output[-3000:]
    step = int((tmp_path / "ckpt" / "latest").read_text())
    assert step == int(announced.group(1)), output[-3000:]
    assert "BrokenPipeError" not in output, output[-3000:]
    assert step >= 2 and (tmp_path / "ckpt" / f"iter_{step:07d}" / "solopo_state.json").is_file()
    assert not (tmp_path / "ckpt" / ".solopo-run.lock").exists()
    result = run_torchrun(1, tiny_run_overrides(run_data, tmp_path, step + 1,
                                extra=["data.num_eval_examples=0"]))
    assert f"resumed from {tmp_path / 'ckpt'}/iter_{step:07d} at step {step}" in result.stdout


def test_sigterm_in_a_step_longer_than_torchruns_grace_period_is_named(run_data, tmp_path):
    """A step longer than torchrun's shutdown grace period (here --shutdown-timeout 1; 30 s by
    default, a 5-minute bf16 step on CPU in the trial): the run warns after its first step,
    naming the grace period and the --shutdown-timeout that fits; a SIGTERM to torchrun during
    a step says the save will not be reached; torchrun's SIGKILL then ends the ranks.

    The step must outlast the 1 s grace period on any CI machine, with room: the tiny model's
    60-example step took 2 s here and about 1.4 s on a faster CI machine, where a SIGTERM 0.5 s
    into the step left less than the grace period and the test failed. A SmolLM2-shaped model
    (49,152-way logits) on 24 examples takes about 7 s here."""
    model = smollm2_shape_config(tmp_path / "model", 2)
    cmd = torchrun_cmd(1, "examples/pretrain_solopo.py", "--config", TINY_RECIPE,
                       *tiny_run_overrides(run_data, tmp_path, 50, extra=[
                           f"model.hf_config_path={model}", "checkpoint.hf_init_dir=null",
                           "data.num_eval_examples=0", "checkpoint.save_interval=0",
                           "data.global_batch_size=24", "data.shared_prefix=false",
                           "model.recompute_granularity=full", "logging.progress_bar=false"]))
    cmd[cmd.index("--master-port"):cmd.index("--master-port")] = ["--shutdown-timeout", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = []
    try:
        for line in proc.stdout:  # the warning comes after step 1, then step 2 starts
            lines.append(line)
            if "longer than torchrun's shutdown grace period" in line:
                break
        time.sleep(0.2)  # step 2 has started: the warning is printed as step 1 ends
        proc.send_signal(signal.SIGTERM)  # to torchrun's agent, as srun or scancel would
        lines += proc.stdout.readlines()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines)
    warning = re.search(r"a step takes up to (\d+) s and a save 0 s, longer than torchrun's "
                        r"shutdown grace period \(1 s, torchrun --shutdown-timeout 1\).*Launch "
                        r"torchrun with --shutdown-timeout (\d+)", output)
    assert warning, output[-3000:]
    assert int(warning.group(2)) >= int(warning.group(1)) + 1
    assert re.search(r"SIGTERM during step 2: saving when it ends .*torchrun's grace period is "
                     r"1 s \(torchrun --shutdown-timeout 1\), so the save will probably not be "
                     r"reached", output), output[-3000:]
    assert proc.returncode != 0, output  # killed by torchrun after the grace period, no save
    assert not list((tmp_path / "ckpt").glob("iter_*[0-9]")), output[-3000:]


def test_corrupt_checkpoint_is_refused_and_the_previous_one_used(run_data, tmp_path):
    run_torchrun(1, tiny_run_overrides(run_data, tmp_path, 4, extra=["checkpoint.save_interval=2",
                                                      "data.num_eval_examples=0"]))
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000004" / "solopo_state.json").unlink()  # an interrupted save
    result = run_torchrun(1, tiny_run_overrides(run_data, tmp_path, 5, extra=["data.num_eval_examples=0"]))
    assert "is not a complete checkpoint" in result.stdout
    assert f"resumed from {ckpt}/iter_0000002 at step 2" in result.stdout


def test_bad_config_names_the_key_before_any_process_group(tmp_path):
    for override, message in [("objective.alpah=3", "unknown config key 'objective.alpah'"),
                              ("training.train_steps=ten", "training.train_steps: expected an "
                                                           "integer"),
                              ("objective.mode=medium", "objective.mode: 'medium' is not one of")]:
        result = run_python("examples/pretrain_solopo.py", [
            "--config", "examples/recipes/tiny_cpu.yaml", override],
            env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        assert "init_process_group" not in result.stderr


def test_dpo_reference_sidecar_matches_on_the_fly_and_is_checked(run_data, tmp_path):
    """The precomputed reference (TP=2) equals the policy's own log-probs at step 1 (DPO rewards
    are exactly 0 there) and a sidecar for another dataset is refused."""
    ref = tmp_path / "ref"
    run_torchrun(2, [f"model.hf_config_path={run_data['model']}",
                  f"checkpoint.hf_init_dir={run_data['model']}",
                  f"data.data_path={run_data['prefix']}", "--output", str(ref)],
              script="examples/precompute_ref_logprobs.py")
    meta = json.loads((tmp_path / "ref.json").read_text())
    from solopo_mcore.data.dataset import TripletDataset
    dataset = TripletDataset(run_data["prefix"])
    assert meta["dataset_fingerprint"] == dataset.fingerprint
    from solopo_mcore.storage.integrity import weights_fingerprint
    assert meta["model_fingerprint"] == weights_fingerprint(run_data["model"])
    run_torchrun(1, tiny_run_overrides(run_data, tmp_path, 1, extra=[
        "objective.algorithm=dpo", f"data.ref_logprobs_path={ref}", "checkpoint.save_dir=null",
        "data.num_eval_examples=0"]))
    train, _ = read_metrics(tmp_path / "metrics.jsonl")
    for key in ("reward/chosen_short", "reward/rejected_short", "reward/chosen_long"):
        assert abs(train[0][key]) < 1e-5, (key, train[0][key])
    # the sidecar against the HF model, computed separately
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    from tests.helpers.hf_reference import hf_role_table
    hf = AutoModelForCausalLM.from_pretrained(run_data["model"], dtype=torch.float32)
    with torch.no_grad():
        S, _ = hf_role_table(hf, [dataset[0], dataset[1]], (0, 1, 2, 3))
    np.testing.assert_allclose(np.load(tmp_path / "ref.npy")[:2], S.numpy(), rtol=1e-5)
    # a sidecar whose fingerprint does not match is refused with a clear error
    bad = dict(meta, dataset_fingerprint="0" * 64)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "bad.npy").write_bytes((tmp_path / "ref.npy").read_bytes())
    from solopo_mcore.data.dataset import DatasetError
    with pytest.raises(DatasetError, match="was computed for dataset fingerprint"):
        dataset.attach_reference(str(tmp_path / "bad"))


def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_save(run_data, tmp_path):
    """An absurd learning rate blows the weights up after step 1: later steps have a non-finite
    loss, are skipped and counted, and the second in a row stops the run with a checkpoint."""
    result = run_script(1, "examples/pretrain_solopo.py", [
        "--config", TINY_RECIPE, *tiny_run_overrides(run_data, tmp_path, 10, extra=[
            "data.num_eval_examples=0", "optimizer.lr=1e30", "optimizer.lr_warmup_steps=0",
            "optimizer.clip_grad=0", "training.max_consecutive_nonfinite_steps=2"])],
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "non-finite loss or gradient, step skipped (1 in a row)" in output
    assert "2 consecutive steps had a non-finite loss or gradient" in output
    step = int((tmp_path / "ckpt" / "latest").read_text())
    state = json.loads((tmp_path / "ckpt" / f"iter_{step:07d}" / "solopo_state.json").read_text())
    assert state["num_skipped_steps"] == 2


def test_long_po_evaluates_its_own_objective_and_every_accuracy(run_data, tmp_path):
    """mode=long (the long-PO baseline): the eval loss is long-PO's (no alignment term), while
    eval still runs all four segments for both contexts' accuracies."""
    run_torchrun(1, tiny_run_overrides(run_data, tmp_path, 1, extra=[
        "objective.mode=long", "training.eval_interval=1", "checkpoint.save_dir=null"]))
    train, evals = read_metrics(tmp_path / "metrics.jsonl")
    assert train[0]["loss/solo_ra"] == 0.0 and "accuracy/long" in train[0]
    assert [r["step"] for r in evals] == [0, 1]
    for r in evals:
        assert r["eval/loss/solo_ra"] == 0.0 and r["eval/loss/total"] == r["eval/loss/po"]
        assert {"eval/accuracy/short", "eval/accuracy/long",
                "eval/reward/distance_chosen"} <= set(r)
