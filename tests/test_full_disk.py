"""A really full disk, not a simulated one: a small tmpfs this test mounts (as root), where the
trainer's checkpoint save, the converter's destination and preprocess's output run out of space.
Each gives one line naming the space and the folder, and leaves no partial files behind; the
trainer keeps its last good checkpoint, and the next start removes a ``.partial`` whose writer
died. Skipped, with the reason, where a tmpfs cannot be mounted (not root, no mount rights)."""

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.helpers.launch import TINY_RECIPE, run_python, run_script, tiny_run_overrides

pytestmark = pytest.mark.e2e


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size_bytes) -> Path``: a fresh tmpfs of that size, unmounted after the test."""
    mounted = []

    def mount(size_bytes: int) -> Path:
        point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        size_kib = max(64, -(-size_bytes // 4096) * 4)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                                 str(point)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): "
                        f"{result.stderr.strip() or result.returncode}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _train(overrides):
    return run_script(1, "examples/pretrain_solopo.py", ["--config", TINY_RECIPE, *overrides],
                      env=ENV)


def _error_lines(stderr: str) -> list:
    """Our one-line errors (``[rank R] ErrorType: message``); torchrun adds its own summary."""
    return [line for line in stderr.splitlines() if line.startswith("[rank")]


def test_training_save_on_a_full_disk(run_data, tmp_path, tmpfs):
    # the size of one checkpoint of this run, measured on the ordinary disk
    probe = tmp_path / "probe"
    result = _train(tiny_run_overrides(run_data, probe, 2, extra=["data.num_eval_examples=0"]))
    assert result.returncode == 0, result.stderr[-3000:]
    one = sum(p.stat().st_size for p in (probe / "ckpt" / "iter_0000002").rglob("*")
              if p.is_file())
    disk = tmpfs(int(one * 1.5))  # room for the step-2 checkpoint, not for step 4's beside it
    save_dir = disk / "ckpt"
    overrides = tiny_run_overrides(run_data, tmp_path, 4, extra=[
        "data.num_eval_examples=0", "checkpoint.save_interval=2",
        f"checkpoint.save_dir={save_dir}"])
    result = _train(overrides)
    assert result.returncode != 0
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, result.stderr[-3000:]
    assert "CheckpointError: no space left on the device while saving step 4 to " \
           f"{save_dir}/iter_0000004" in errors[0]
    assert f"free on {disk}" in errors[0]
    assert f"the last good checkpoint {save_dir}/iter_0000002 is intact and stays latest" in \
        errors[0]
    assert sorted(p.name for p in save_dir.iterdir() if p.name != ".lock") == \
        ["iter_0000002", "latest"], "the partial save must be gone"
    # a writer that died mid-save (killed, out of memory) leaves a .partial: the next start
    # removes it (here the run is already at its steps, so nothing else is written)
    stale = save_dir / "iter_0000004.partial"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"x" * 100)
    result = _train(tiny_run_overrides(run_data, tmp_path, 2, extra=[
        "data.num_eval_examples=0", f"checkpoint.save_dir={save_dir}"]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"removed {stale}: a save that never completed" in result.stdout
    assert not stale.exists()


def test_converter_destination_on_a_full_disk(tiny_qwen2, tmpfs):
    disk = tmpfs(300 * 1024)  # the tiny model's checkpoint is larger
    dst = disk / "mcore"
    result = run_python("examples/convert_checkpoint.py",
                        ["hf-to-mcore", "--src", tiny_qwen2, "--dst", dst], env=ENV)
    assert result.returncode != 0
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"ConversionError: no space left on the device writing {dst}.partial: " in errors[0]
    assert f"free on {disk} after removing the partial result; {dst} was not created" in \
        errors[0]
    assert list(disk.iterdir()) == []


def test_preprocess_output_on_a_full_disk(demo_data, tmpfs):
    disk = tmpfs(64 * 1024)
    prefix = disk / "data"
    result = run_python("-m data_tools.preprocess", [
        "--input", demo_data["pairs"], "--output-prefix", prefix, "--num-proc", "1",
        "--max-seq-length", "1024"], env=ENV)
    assert result.returncode != 0
    assert f"preprocess: no space left on the device writing {prefix}.*: " in result.stderr
    assert "after removing the partial files (data.tmp.bin" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(disk.iterdir()) == []
