"""Runs that look after themselves: two torchrun agents as two "nodes" on localhost, automatic
restart and resume after a worker is killed, the hang watchdog, the Slurm script's dry run.

The reference for every comparison is the same run under one agent (a module fixture): the
two-node runs, and the run whose worker was killed mid-way, end with bitwise the same weights.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.launch import (REPO, TINY_RECIPE, free_port, read_metrics, run_torchrun,
                                  tiny_run_overrides)

STEPS = 6
COMMON = ["training.deterministic=true", "data.num_eval_examples=0",
          "checkpoint.save_interval=2", "logging.progress_bar=false"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _overrides(run_data, run_dir, layout):
    tp, extra = {"tp2": (2, []), "dp2": (1, ["parallel.use_distributed_optimizer=true"])}[layout]
    return tiny_run_overrides(run_data, run_dir, STEPS, tp=tp, extra=[
        *COMMON, *extra, f"checkpoint.export_hf_dir={run_dir / 'hf'}"])


def _weights(run_dir):
    return load_file(str(next((run_dir / "hf").glob("*.safetensors"))))


def _assert_same_run(reference, other):
    (a, _), (b, _) = read_metrics(reference / "metrics.jsonl"), read_metrics(
        other / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["loss/total"] for r in a] == [r["loss/total"] for r in b]
    wa, wb = _weights(reference), _weights(other)
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def single_agent(run_data, tmp_path_factory):
    """The reference runs, one torchrun agent with 2 processes: {layout: run folder}."""
    runs = {}
    for layout in ("tp2", "dp2"):
        runs[layout] = tmp_path_factory.mktemp(f"single_{layout}")
        run_torchrun(2, _overrides(run_data, runs[layout], layout))
    return runs


def _agent_cmd(port, node_rank, overrides, *torchrun_args):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc-per-node", "1", "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", *torchrun_args,
            "examples/pretrain_solopo.py", "--config", TINY_RECIPE, *overrides]


def _two_agents(overrides, *torchrun_args):
    port = free_port()
    return [subprocess.Popen(_agent_cmd(port, node, overrides, *torchrun_args), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=ENV) for node in (0, 1)]


@pytest.mark.parametrize("layout", ["dp2"])
def test_two_nodes_train_as_one(layout, run_data, single_agent, tmp_path):
    """Two torchrun agents (c10d rendezvous, one process each), DP2 with the distributed
    optimizer: the same losses and final weights as one agent. TP2 across the two nodes is
    checked the same way by test_two_nodes_restart_together_and_resume_bitwise, whose run
    (restarted once) must also end equal to the one-agent TP2 run."""
    agents = _two_agents(_overrides(run_data, tmp_path, layout))
    try:
        outputs = [a.communicate(timeout=600)[0] for a in agents]
    finally:
        _kill_trees(agents)
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    _assert_same_run(single_agent[layout], tmp_path)


def test_a_node_lost_is_named_as_another_node(run_data, tmp_path):
    """kill -9 of node 1's worker: node 0's rank says a rank on another node failed."""
    agents = _two_agents(tiny_run_overrides(run_data, tmp_path, 500, tp=2, extra=COMMON))
    try:
        _wait_for_steps(tmp_path / "metrics.jsonl", 1, agents[0])
        os.kill(_worker(agents[1].pid, rank=1).pid, signal.SIGKILL)
        out = agents[0].communicate(timeout=300)[0]
        agents[1].communicate(timeout=300)
    finally:
        _kill_trees(agents)
    assert agents[0].returncode != 0
    assert "[rank 0] stopped: a rank on another node failed (its error is in that node's " \
           "output" in out, out[-3000:]


def _kill_trees(procs):
    """Kill what is left of launched agents and their workers (after a failure)."""
    for proc in procs:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()


def _worker(agent_pid, rank):
    """The worker process of ``rank`` under a torchrun agent."""
    deadline = time.time() + 120
    while time.time() < deadline:
        for child in psutil.Process(agent_pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "pretrain_solopo" in \
                        " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} under {agent_pid}")


def _wait_for_steps(metrics: Path, num_steps: int, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(read_metrics(metrics)[0]) >= num_steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no step {num_steps} in {timeout} s")


def test_killed_worker_restarts_and_resumes_bitwise(run_data, single_agent, tmp_path):
    """torchrun --max-restarts 1 and the same command line: kill -9 of a worker after the
    first checkpoint restarts the job, which resumes from the last verified checkpoint and ends
    with bitwise the weights of the uninterrupted run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--max-restarts", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           "examples/pretrain_solopo.py", "--config", TINY_RECIPE,
           *_overrides(run_data, tmp_path, "tp2")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    try:
        latest = tmp_path / "ckpt" / "latest"
        deadline = time.time() + 300
        while not (latest.exists() and latest.read_text().strip() == "2"):
            assert proc.poll() is None and time.time() < deadline, \
                proc.communicate()[0][-3000:]
            time.sleep(0.05)
        killed = _worker(proc.pid, rank=1).pid
        os.kill(killed, signal.SIGKILL)
        out = proc.communicate(timeout=300)[0]
    finally:
        _kill_trees([proc])
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out and "iter_0000002" in out, out[-4000:]
    # rank 0 names the killed rank, not just "a peer failed" (the signal, while torchrun has
    # not yet collected the process; its exit code is in torchrun's summary either way)
    assert re.search(rf"\[rank 0\] stopped: a peer rank is gone: rank 1 \(pid {killed}\) "
                     rf"(was killed by signal 9 \(SIGKILL\)|exited) without an error of its own",
                     out), out[-4000:]
    _assert_same_run(single_agent["tp2"], tmp_path)


def test_two_nodes_restart_together_and_resume_bitwise(run_data, single_agent, tmp_path):
    """kill -9 of node 1's worker with --max-restarts 1 on both agents: node 1 counts a restart,
    node 0 rejoins without counting one; both must still form one process group again (the
    attempt is the rendezvous round) and end with the uninterrupted run's weights."""
    agents = _two_agents(_overrides(run_data, tmp_path, "tp2"), "--max-restarts", "1")
    try:
        latest = tmp_path / "ckpt" / "latest"
        deadline = time.time() + 300
        while not (latest.exists() and latest.read_text().strip() == "2"):
            assert all(a.poll() is None for a in agents) and time.time() < deadline
            time.sleep(0.05)
        os.kill(_worker(agents[1].pid, rank=1).pid, signal.SIGKILL)
        outputs = [a.communicate(timeout=300)[0] for a in agents]
    finally:
        _kill_trees(agents)
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "resumed from" in "".join(outputs)
    _assert_same_run(single_agent["tp2"], tmp_path)


def test_a_stopped_rank_is_named_by_the_watchdog(run_data, tmp_path):
    """SIGSTOP one rank of a 2-rank run: within the watchdog's time the other rank stops the
    run, naming the stopped rank, its host and its phase; the exit status is non-zero."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "examples/pretrain_solopo.py",
           "--config", TINY_RECIPE, *tiny_run_overrides(run_data, tmp_path, 500, tp=2, extra=[
               *COMMON, "distributed.watchdog_minutes=0.1", "checkpoint.save_interval=0"])]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    try:
        _wait_for_steps(tmp_path / "metrics.jsonl", 2, proc)
        stopped = _worker(proc.pid, rank=1)
        stopped.suspend()  # SIGSTOP
        start = time.time()
        lines = []
        for line in proc.stdout:  # until rank 0 has named the stopped rank
            lines.append(line)
            if "HangError" in line or time.time() - start > 120:
                break
        named = time.time() - start
        # torchrun's SIGTERM cannot end a stopped process: it would wait out its 30 s grace
        # period before SIGKILL. An operator kills it; the launch then ends
        stopped.kill()
        out = "".join(lines) + proc.communicate(timeout=180)[0]
    finally:
        _kill_trees([proc])
    assert proc.returncode != 0
    assert named < 90, named
    import socket
    assert f"[rank 0] HangError: rank 1 on {socket.gethostname()}, in " in out, out[-3000:]
    assert "sent no heartbeat for 6 s" in out


def test_slurm_dry_run_without_slurm_checks_the_recipe_and_the_node_count(tmp_path):
    """No scontrol on this machine: the dry run expands the host list itself; a misspelt
    recipe, a layout that does not fit nodes x GPUs, and a host list of another size are each
    one line, before anything is printed for a node."""
    script = REPO / "examples" / "slurm" / "solopo_multinode.sbatch"
    base = {k: v for k, v in os.environ.items() if k != "PATH"}
    env = {**base, "PATH": "/usr/bin:/bin", "SOLOPO_DRY_RUN": "1", "SLURM_JOB_ID": "5",
           "SLURM_JOB_NODELIST": "gpu[07-09],login1", "SLURM_NNODES": "4"}
    assert subprocess.run(["bash", "-c", "command -v scontrol"], env=env).returncode != 0

    def dry(recipe, **changes):
        return subprocess.run(["bash", str(script), recipe], cwd=REPO, env={**env, **changes},
                              capture_output=True, text=True, timeout=120)
    ok = dry("qwen2.5-7b_solo-orpo_64k_4node")
    assert ok.returncode == 0, ok.stderr
    assert [line.split()[2] for line in ok.stdout.splitlines()] == \
        ["(gpu07):", "(gpu08):", "(gpu09):", "(login1):"]
    assert "--rdzv-endpoint gpu07:29500" in ok.stdout
    typo = dry("qwen2.5-7b_solo-orpo_64k_4nod")
    assert typo.returncode != 0 and not typo.stdout
    assert "recipe 'qwen2.5-7b_solo-orpo_64k_4nod' is neither a file nor a named recipe" in \
        typo.stderr and "qwen2.5-7b_solo-orpo_64k_4node" in typo.stderr
    three = dry("qwen2.5-7b_solo-orpo_64k_4node", SLURM_NNODES="3",
                SLURM_JOB_NODELIST="gpu[07-09]")
    assert three.returncode != 0 and not three.stdout
    assert "24 processes" in three.stderr and "TP x PP x CP = 4 x 1 x 4 = 16" in three.stderr
    mismatch = dry("qwen2.5-7b_solo-orpo_64k_4node", SLURM_JOB_NODELIST="gpu[07-09]")
    assert mismatch.returncode != 0 and not mismatch.stdout
    assert "names 3 hosts but SLURM_NNODES is 4" in mismatch.stderr


def test_slurm_script_dry_run_prints_each_node_s_command(tmp_path):
    """``bash -n`` passes; SOLOPO_DRY_RUN=1 under a fake 4-node allocation prints the torchrun
    command of every node (c10d rendezvous on the first host, restarts, the recipe, overrides
    quoted); with a fake srun, SIGTERM to the script reaches srun and the job is requeued."""
    script = REPO / "examples" / "slurm" / "solopo_multinode.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-a\\ngpu-b\\ngpu-c\\ngpu-d\\n'\n")
    (fake / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SOLOPO_DRY_RUN": "1",
           "SLURM_JOB_NODELIST": "gpu-[a-d]", "SLURM_NNODES": "4", "SLURM_JOB_ID": "77"}
    out = subprocess.run(["bash", str(script), "qwen2.5-7b_solo-orpo_64k_4node",
                          "training.train_steps=10", "logging.wandb_run_name=my run"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if "torchrun" in line]
    assert len(lines) == 4, out
    for node, line in enumerate(lines):
        assert f"--node-rank {node}" in line and "--rdzv-endpoint gpu-a:29500" in line, line
        assert "--max-restarts" in line and "--rdzv-id 77" in line, line
        assert line.endswith("--config qwen2.5-7b_solo-orpo_64k_4node training.train_steps=10 "
                             "logging.wandb_run_name=my\\ run"), line
    # no overrides: the command ends at the recipe (a stranger's trial found an empty '' word
    # there, which the trainer refuses as an override on every node)
    bare = subprocess.run(["bash", str(script), "qwen2.5-7b_solo-orpo_64k_4node"], cwd=REPO,
                          env=env, capture_output=True, text=True, check=True).stdout
    bare_lines = [line for line in bare.splitlines() if "torchrun" in line]
    assert len(bare_lines) == 4 and all(
        line.rstrip().endswith("--config qwen2.5-7b_solo-orpo_64k_4node") for line in bare_lines), bare
    # SIGTERM to the batch script reaches srun (which forwards it to the ranks), and the job is
    # requeued once srun has finished (the ranks saved)
    log = tmp_path / "calls.log"
    (fake / "srun").write_text(f"#!/bin/bash\ntrap 'echo srun got TERM >> {log}; exit 0' TERM\n"
                               f"echo srun started >> {log}\nwhile true; do sleep 0.1; done\n")
    (fake / "srun").chmod(0o755)
    (fake / "scontrol").write_text(f"#!/bin/bash\nif [ \"$1\" = requeue ]; then echo requeue $2 "
                                   f">> {log}; else printf 'gpu-a\\ngpu-b\\n'; fi\n")
    env.pop("SOLOPO_DRY_RUN")
    # the fake allocation below has two hosts; tiny_cpu's batch fits 2 x 1 ranks
    env.update(SLURM_NNODES="2", GPUS_PER_NODE="1")
    job = subprocess.Popen(["bash", str(script), "tiny_cpu"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (log.exists() and "srun started" in log.read_text()):
        assert time.time() < deadline and job.poll() is None
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=30)
    assert job.returncode == 0
    assert log.read_text().splitlines() == ["srun started", "srun got TERM", "requeue 77"]
