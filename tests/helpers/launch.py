"""Launch entry scripts under torchrun for end-to-end tests: one free-port function, one
torchrun command, the tiny training recipe's overrides and its metrics file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = "examples/recipes/tiny_cpu.yaml"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, script: str, *args) -> list:
    """``python -m torch.distributed.run`` on a free port, with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--master-port", str(free_port()), script, *[str(a) for a in args]]


def run_script(nproc: int, script: str, args, env=None, timeout: float = 600,
               real: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc script args`` (cwd: the repository), its output
    captured. The ranks come from the warm launcher (tests/helpers/warm_launch.py) unless
    ``real``, ``SOLOPO_TEST_REAL_TORCHRUN=1`` or an import-time variable of ``env`` asks for the
    real torchrun. ``env``: the whole environment (default: this process's)."""
    from tests.helpers import warm_launch
    env = dict(os.environ if env is None else env)
    if not real:
        result = warm_launch.launch(nproc, script, args, REPO, env, timeout, free_port())
        if result is not None:
            return result
    return subprocess.run(torchrun_cmd(nproc, script, *args), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def run_python(target: str, args, env=None, timeout: float = 600,
               real: bool = False) -> subprocess.CompletedProcess:
    """``python target args`` (``target``: a script path, or ``-m module``), cwd: the
    repository, its output captured; from the warm launcher's server unless ``real`` (as
    :func:`run_script`)."""
    from tests.helpers import warm_launch
    env = dict(os.environ if env is None else env)
    args = [str(a) for a in args]
    module = target[3:] if target.startswith("-m ") else None
    if not real:
        result = warm_launch.launch(1, None if module else target, args, REPO, env, timeout, 0,
                                    module=module, torchrun=False)
        if result is not None:
            return result
    command = ["-m", module] if module else [target]
    return subprocess.run([sys.executable, *command, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def run_torchrun(nproc, overrides, script="examples/pretrain_solopo.py", timeout=600,
                 extra=(), show_warnings=False, real=False):
    """Run ``script --config tiny_cpu.yaml [extra] [overrides]``; fail with its output.
    Python warnings are silenced unless ``show_warnings`` (as a user's bare command runs, so
    under the real torchrun: the warm launcher's server has imported already)."""
    args = ["--config", TINY_RECIPE, *extra, *overrides]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    if not show_warnings:
        env["PYTHONWARNINGS"] = "ignore"
    result = run_script(nproc, script, args, env=env, timeout=timeout,
                        real=real or show_warnings)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, result.args))}\nexit {result.returncode}\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def tiny_run_overrides(demo_data, run_dir, steps, tp=1, extra=()) -> list:
    """Overrides for a tiny training run on the ``demo_data`` fixture, writing into run_dir."""
    return [f"model.hf_config_path={demo_data['model']}",
            f"checkpoint.hf_init_dir={demo_data['model']}",
            f"data.data_path={demo_data['prefix']}",
            f"parallel.tensor_model_parallel_size={tp}",
            f"checkpoint.save_dir={run_dir / 'ckpt'}",
            f"logging.metrics_path={run_dir / 'metrics.jsonl'}",
            f"training.train_steps={steps}", *extra]


def smollm2_shape_config(folder: Path, num_layers: int) -> Path:
    """A config.json folder of SmolLM2-135M's shape with ``num_layers`` layers, fp32, randomly
    initialized (pass ``checkpoint.hf_init_dir=null``): its 49,152-way logits make a step, and
    the memory its first step allocates, large next to the tiny test model's."""
    from solopo_mcore.models.reference_configs import SMOLLM2_135M_INSTRUCT
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(SMOLLM2_135M_INSTRUCT, num_hidden_layers=num_layers, torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def read_metrics(path):
    """(training rows, eval rows) of a metrics.jsonl."""
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if "loss/total" in r], [r for r in rows if "eval/loss/total" in r]
