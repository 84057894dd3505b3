"""What a user sees and what can never be lost (issue 12, items 5, 7, 8, 13-18): layouts that do
not divide the world, outputs that are inputs, converter destinations, one-line errors, ranks
that outlive their launcher, setup output, demo curves, profiler summaries, --help texts."""

import argparse
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.launch import run_python

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
#: For the warm launcher (tests/helpers/warm_launch.py), whose server has this process's
#: import-time environment: the entry scripts import only installed packages.
WARM_ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _example(name):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


# ---------------------------------------------------------------- 5, 18: estimate_memory
def test_estimate_memory_refuses_a_layout_that_does_not_divide_the_world():
    from solopo_mcore.parallel.layout import LayoutError
    main = _example("estimate_memory").main
    with pytest.raises(LayoutError, match=r"--world-size 6 is not divisible by .* = 16"):
        main(["--config", "qwen2.5-7b_solo-orpo_64k_4node", "--model", "qwen2.5-7b",
              "--world-size", "6", "--long-tokens", "65536", "--device-gib", "141"])


def test_estimate_memory_without_an_architecture_says_what_is_missing():
    from solopo_mcore.config import ConfigError
    main = _example("estimate_memory").main
    with pytest.raises(ConfigError, match="model.hf_config_path is unset.*--model"):
        main(["--config", "tiny_cpu", "--world-size", "2", "--long-tokens", "1024"])
    with pytest.raises(ConfigError, match="no config.json there; pass --model"):
        main(["--config", "qwen2.5-7b_solo-orpo_8gpu", "--world-size", "8", "--long-tokens",
              "1024", "model.hf_config_path=/nonexistent/model"])


ENTRY_SCRIPTS = sorted((REPO / "examples").glob("*.py")) + [
    REPO / "data_tools" / f"{m}.py" for m in ("build_triplets", "preprocess", "sample_pairs",
                                             "synthetic")]


@pytest.mark.parametrize("script", ENTRY_SCRIPTS, ids=lambda p: p.stem)
def test_every_cli_option_has_help_text(script, monkeypatch):
    """Each entry script's parser, caught at parse time: every option and positional has help."""
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_intermixed_args", capture)
    monkeypatch.setattr(sys, "argv", [str(script)])
    module = f"data_tools.{script.stem}" if script.parent.name == "data_tools" else None
    with pytest.raises(SystemExit):
        if module:
            runpy.run_module(module, run_name="__main__")
        else:
            runpy.run_path(str(script), run_name="__main__")
    undocumented = [a.dest for a in seen[0]._actions
                    if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not undocumented, f"{script.name}: no --help text for {undocumented}"


# ---------------------------------------------------------------- 7: data tools
def test_data_tools_refuse_an_output_that_is_an_input(tmp_path, monkeypatch):
    from data_tools import build_triplets, preprocess
    from data_tools.common import OutputIsInputError
    from data_tools.sample_pairs import main as sample_pairs_main

    data = tmp_path / "data.jsonl"
    data.write_text('{"id": "1", "question": "q"}\n')
    (tmp_path / "pairs.bin").write_text("tokens")
    (tmp_path / "data.meta.json").write_text("{}")
    (tmp_path / "out.jsonl.summary.json").write_text("{}")
    (tmp_path / "link.jsonl").symlink_to(data)
    monkeypatch.chdir(tmp_path)

    def snapshot():
        return {p.name: p.read_text() for p in tmp_path.iterdir()}
    before = snapshot()
    cases = [
        lambda: build_triplets.run(str(data), str(data), "builtin:qwen2.5", 256, None),
        lambda: build_triplets.run("data.jsonl", str(tmp_path / "sub" / ".." / "data.jsonl"),
                                   "builtin:qwen2.5", 256, None),
        lambda: build_triplets.run("q.jsonl", "out.jsonl", "builtin:qwen2.5", 256,
                                   "out.jsonl.summary.json"),  # a derived output is the pool
        lambda: sample_pairs_main(["--backend", "rule", "--input", "data.jsonl",
                                   "--output", "link.jsonl"]),  # a symlink to the input
        lambda: preprocess.run("pairs.bin", str(tmp_path / "pairs"), "builtin:qwen2.5", 64),
        lambda: preprocess.run("data.meta.json", "data", "builtin:qwen2.5", 64),  # prefix-derived
    ]
    for i, case in enumerate(cases):
        with pytest.raises(OutputIsInputError, match="is the same path as .*Choose another"):
            case()
        assert snapshot() == before, f"case {i} changed a file"


# ---------------------------------------------------------------- 8: converter destination
def test_converter_refuses_src_dst_overlap(tiny_qwen2, tmp_path):
    from solopo_mcore.convert import commands
    from solopo_mcore.convert.tables import ConversionError

    src = tmp_path / "hf"
    shutil.copytree(tiny_qwen2, src)
    before = sorted(p.name for p in src.iterdir())
    (tmp_path / "alias").symlink_to(src)
    for dst, message in [(src, "is the same path as --src"),
                         (tmp_path / "alias", "is the same path as --src"),
                         (src / "mcore", "lies inside --src"), (tmp_path, "contains --src")]:
        with pytest.raises(ConversionError, match=message):
            commands.hf_to_mcore(str(src), str(dst), overwrite=True)
        if Path(dst).exists():  # (a --src that does not exist is refused as such)
            with pytest.raises(ConversionError, match="is the same path as|lies inside|contains"):
                commands.mcore_to_hf(str(dst), str(src), overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == before


def _convert(*args):
    return run_python("examples/convert_checkpoint.py", args, env=WARM_ENV)


def test_overwrite_replaces_the_destination_only_when_complete_and_verified(tiny_qwen2,
                                                                            tmp_path):
    dst = tmp_path / "mcore"
    dst.mkdir()
    (dst / "precious").write_text("old result")
    (dst / "latest").write_text("0")  # an older checkpoint folder
    failed = _convert("hf-to-mcore", "--src", tiny_qwen2, "--dst", dst, "--overwrite",
                      "--verify", "--tolerance", "-1")  # no difference passes a negative bound
    assert failed.returncode != 0
    assert "verification failed" in failed.stderr and "mcore.failed-verify" in failed.stderr
    assert (dst / "precious").read_text() == "old result"
    assert (tmp_path / "mcore.failed-verify" / "latest").is_file()
    assert (dst / "latest").read_text() == "0"
    assert "Traceback" not in failed.stderr  # one short line (item 13)

    ok = _convert("hf-to-mcore", "--src", tiny_qwen2, "--dst", dst, "--overwrite", "--verify")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (dst / "latest").is_file() and not (dst / "precious").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mcore", "mcore.failed-verify"]


# ---------------------------------------------------------------- 13: one short line
def test_entry_point_prints_one_line_once_and_logs_the_traceback(tmp_path, monkeypatch,
                                                                 capsys):
    from solopo_mcore.config import ConfigError
    from solopo_mcore.errors import entry_point, error_log_path, short_line

    monkeypatch.setenv("SOLOPO_ERROR_LOG_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"test-{os.getpid()}-{time.time()}")
    monkeypatch.setattr("solopo_mcore.processes.exit_with_parent", lambda: True)
    monkeypatch.delenv("SOLOPO_TRACEBACK", raising=False)
    for rank in (1, 0):  # both ranks raise the same error: one line in all
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"error{rank}.json"))
        with pytest.raises(SystemExit) as exit_info:
            with entry_point("tool"):
                raise ConfigError("data.data_path: /x does not exist; set it to a prefix")
        assert exit_info.value.code == 1
        assert "Traceback" in error_log_path("tool", rank).read_text()
        # torchrun's failure summary shows the short line instead of a link to its docs
        recorded = json.loads((tmp_path / f"error{rank}.json").read_text())["message"]
        assert recorded["message"].startswith(f"[rank {rank}] ConfigError: data.data_path")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[rank 1] ConfigError: data.data_path: /x does not exist; set it to a prefix"
    assert len(err) == 2 and str(error_log_path("tool", 1)) in err[1]
    # a peer's collective failing because the first rank exited is labelled as a consequence
    gone = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:9")
    assert short_line(gone, "tool", 0) == "[rank 0] stopped: a peer rank failed (its error is " \
        "above; torchrun's summary below names a rank that was killed)"


def test_each_launch_reports_its_own_errors_and_lost_peers_name_the_node(tmp_path, monkeypatch,
                                                                         capsys):
    """Under a static rendezvous (run id ``none`` for every run), a later launch's identical
    error is still printed, into its own traceback log; markers of finished launches are
    removed; a rank that lost its peers says whether the failure was on this node or another."""
    import subprocess as sp

    from solopo_mcore import errors
    from solopo_mcore.config import ConfigError

    monkeypatch.setenv("SOLOPO_ERROR_LOG_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setattr("solopo_mcore.processes.exit_with_parent", lambda: True)
    agents = []
    for _ in range(2):  # two launches, one after the other, each by its own (exited) agent
        agent = sp.Popen([sys.executable, "-c", "pass"])
        agent.wait()
        agents.append(agent.pid)
    logs = []
    for agent in agents:
        monkeypatch.setattr(errors.os, "getppid", lambda agent=agent: agent)
        with pytest.raises(SystemExit):
            with errors.entry_point("tool"):
                raise ConfigError("same mistake")
        logs.append(errors.error_log_path("tool", 0))
    err = capsys.readouterr().err
    assert err.count("[rank 0] ConfigError: same mistake") == 2, err
    assert logs[0] != logs[1] and all(p.is_file() for p in logs)
    assert not list(Path(tempfile.gettempdir()).glob(f"solopo-reported-none-{agents[0]}"))

    gone = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:9")
    monkeypatch.setattr(errors.os, "getppid", lambda: os.getpid())  # a live agent
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"multinode-{time.time()}")
    assert errors.short_line(gone, "tool", 2) == (
        "[rank 2] stopped: a rank on another node failed (its error is in that node's output; "
        "this node's ranks lost their connection to it)")
    monkeypatch.setenv("RANK", "3")
    errors.report_exception(ConfigError("a local failure"), "tool")
    assert errors.short_line(gone, "tool", 2) == (
        "[rank 2] stopped: a peer rank failed (its error is above; torchrun's summary below "
        "names a rank that was killed)")


_TORCH_LOG = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")


def test_a_failing_script_prints_a_short_error_and_the_traceback_on_request(tmp_path):
    cmd = [sys.executable, "examples/pretrain_solopo.py", "--config", "tiny_cpu",
           "objective.alpha=abc"]
    env = {**ENV, "SOLOPO_ERROR_LOG_DIR": str(tmp_path)}
    short = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert short.returncode == 1
    # torch's own import-time log lines (glog format, e.g. a CUDA build of torch on a CPU machine:
    # "W1129 05:43:02.888000 ... No CUDA runtime is found") are not ours to shorten
    lines = [line for line in short.stderr.strip().splitlines() if not _TORCH_LOG.match(line)]
    assert lines[0] == "pretrain_solopo: ConfigError: objective.alpha: expected a number, got 'abc'"
    assert len(lines) == 2 and "SOLOPO_TRACEBACK=1" in lines[1]
    assert "Traceback" in next(tmp_path.glob("solopo-error-pretrain_solopo-*.log")).read_text()
    full = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**env, "SOLOPO_TRACEBACK": "1"})
    full_lines = [line for line in full.stderr.strip().splitlines() if not _TORCH_LOG.match(line)]
    assert "Traceback" in full.stderr and full_lines[-2] == lines[0]


# ---------------------------------------------------------------- 14: no orphaned ranks
def _alive(procs):
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(procs, timeout_s):
    deadline = time.time() + timeout_s
    while _alive(procs) and time.time() < deadline:
        time.sleep(0.2)
    return _alive(procs)


def test_killing_the_launcher_ends_its_ranks(tmp_path):
    """The demo's launcher (run_child) -> torchrun -> 2 ranks that would block forever: kill -9
    the launcher and every descendant is gone within seconds. Then a rank whose torchrun agent is
    killed (the rank's own parent-death signal)."""
    rank = tmp_path / "rank.py"
    rank.write_text(textwrap.dedent("""
        import os, sys, time
        from solopo_mcore.errors import entry_point
        with entry_point("rank"):
            path = os.path.join(sys.argv[1], "pid" + os.environ.get("RANK", "x"))
            open(path + ".tmp", "w").write(str(os.getpid()))
            os.replace(path + ".tmp", path)
            time.sleep(600)  # stands in for a collective whose peer is gone
    """))
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent(f"""
        import sys
        from solopo_mcore.processes import run_child
        run_child([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                   {str(rank)!r}, {str(tmp_path)!r}])
    """))
    parent = subprocess.Popen([sys.executable, str(launcher)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    descendants = []
    try:
        deadline = time.time() + 240
        while not all((tmp_path / f"pid{r}").exists() for r in (0, 1)):
            assert time.time() < deadline and parent.poll() is None, "ranks did not start"
            time.sleep(0.2)
        descendants = psutil.Process(parent.pid).children(recursive=True)
        assert len(descendants) >= 3  # torchrun + 2 ranks
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert not _wait_gone(descendants, 20), "ranks outlived the killed launcher"
    finally:
        for p in _alive(psutil.Process(os.getpid()).children(recursive=True) + descendants):
            p.kill()

    # a rank started by a launcher that dies without forwarding anything (torchrun's agent
    # killed with -9): the rank's own parent-death signal ends it
    agent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, {str(rank)!r}, {str(tmp_path)!r}])
        time.sleep(600)
    """)], env={**ENV, "TORCHELASTIC_RUN_ID": "test", "RANK": "9"})
    orphan = []
    try:
        deadline = time.time() + 60
        while not (tmp_path / "pid9").exists():
            assert time.time() < deadline, "rank did not start"
            time.sleep(0.1)
        orphan = [psutil.Process(int((tmp_path / "pid9").read_text()))]
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        assert not _wait_gone(orphan, 10), "a rank outlived its killed torchrun agent"
    finally:
        for p in _alive(psutil.Process(os.getpid()).children(recursive=True) + orphan):
            p.kill()


# ---------------------------------------------------------------- 15: setup.sh output
def test_setup_script_prints_each_step_and_pip_progress(tmp_path):
    """setup.sh against a stub python that records the pip calls: a line per step, and no -q
    on the large installs (torch, the package with megatron-core)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    stub = tmp_path / "python3"
    stub.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        echo "$*" >> {tmp_path / 'calls.log'}
        if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
          mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0
        fi
        if [ "$1" = "-c" ]; then exit 1; fi  # torch is not installed yet
        exit 0
    """))
    stub.chmod(0o755)
    result = subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHON": str(stub)})
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("==> setup:")]
    assert len(steps) >= 5 and "torch" in steps[1] and "ready" in steps[-1], result.stdout
    installs = [c for c in (tmp_path / "calls.log").read_text().splitlines() if " install " in c]
    big = [c for c in installs if "torch==" in c or "-e" in c.split()]
    assert len(big) == 2 and not any("-q" in c.split() for c in big), installs


# ---------------------------------------------------------------- 16: demo curves
def test_demo_curves_png_and_learning_summary(tmp_path):
    from solopo_mcore.evaluation.learning import describe, learning_report, wilson_interval
    from solopo_mcore.training.curves import plot_curves, read_metrics

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval/accuracy/short": 0.5, "eval/accuracy/long": 0.5,
             "eval/reward/distance_chosen": 0.25}]
    rows += [{"step": s, "loss/total": 3.0 - 0.1 * s, "loss/po": 2.0, "reward/margin_short":
              0.01 * s, "reward/distance_chosen": 0.1} for s in range(1, 11)]
    rows += [{"step": 10, "eval/accuracy/short": 0.625, "eval/accuracy/long": 0.5,
              "eval/reward/distance_chosen": 0.125},
             {"step": 10, "loss/total": 1.5}]  # a resumed run logs step 10 again
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, short in (("untrained", 0.0), ("trained", 0.75)):  # evaluate_qa's summary.json
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "summary.json").write_text(json.dumps({
            "accuracy_short": {"value": short, "ci95": [short / 2, 0.9], "n": 8},
            "accuracy_long": {"value": 0.125, "ci95": [0.0, 0.375], "n": 8}}))
    png = plot_curves(str(metrics), str(tmp_path / "curves.png"),
                      {"short context": [(0, 0.0, 0.0, 0.0), (10, 0.75, 0.375, 0.9)]})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    records = read_metrics(str(metrics))
    assert records[10]["loss/total"] == 1.5 and records[10]["eval/accuracy/long"] == 0.5
    report = learning_report(str(metrics), str(tmp_path / "eval"), "untrained", "trained", 8)
    assert report["pairwise"]["short"]["first"]["step"] == 0
    assert report["pairwise"]["short"]["last"]["ci95"] == list(wilson_interval(0.625, 8))
    text = describe(report)
    assert "short 0.50 [0.22, 0.78] at step 0 -> 0.62 [" in text
    assert "short 0.00 [0.00, 0.90] -> 0.75 [0.38, 0.90]" in text
    assert "0.250 at step 0 -> 0.125 at step 10" in text and "not met" in text
    # the Wilson interval against published values (8 of 10: 0.490 to 0.943)
    assert [round(x, 3) for x in wilson_interval(0.8, 10)] == [0.49, 0.943]


# ---------------------------------------------------------------- 17: profiler report
def test_profiler_summary_never_says_none_and_flags_a_capped_max_length(tmp_path):
    from solopo_mcore.profiling.report import write_report

    result = {"mode": "solo", "long_tokens": 512, "step_sec": 0.5,
              "tokens_per_sec_per_gpu": 100.0, "model_tflops_per_gpu": 0.01, "mfu": None,
              "long_pass_mfu": None, "peak_memory_gib": 0.1, "short_segments_sec": 0.1,
              "long_segments_sec": 0.2}
    context = {"model": "qwen2", "device": "CPU (x86_64, 2 threads)", "layout": "TP1 PP1 CP1 "
               "DP1", "short_tokens": 128, "response_tokens": 16, "peak_tflops": None,
               "recompute": None, "params_dtype": "fp32"}
    payload = write_report(str(tmp_path), [result], context, {"solo": 4096, "long": 2048},
                           [{"mode": "solo", "long_tokens": 512, "estimated_gib": 0.1,
                             "measured_gib": 0.0, "error": None}], max_len_limit=4096)
    summary = (tmp_path / "summary.md").read_text()
    assert "None" not in summary and "n/a (CPU)" in summary
    assert "solo >= 4096 tokens" in summary and "long 2048 tokens" in summary
    assert "lower bound" in summary and payload["max_long_tokens_lower_bound"] == ["solo"]


def test_cpu_allocator_tracker_prints_no_usdt_lines(tmp_path):
    script = tmp_path / "track.py"
    script.write_text(textwrap.dedent("""
        import torch
        from solopo_mcore.profiling.memory import AllocatorPeakTracker
        for _ in range(2):
            with AllocatorPeakTracker() as tracker:
                x = torch.ones(1000, 1000) * 2
            print("peak", tracker.peak_bytes, flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env=ENV)
    assert out.returncode == 0, out.stderr
    assert "USDT" not in out.stdout + out.stderr and out.stdout.count("peak ") == 2, out


def test_estimate_memory_prints_a_table_and_json_on_request_with_overrides_anywhere():
    args = ["--config", "qwen2.5-7b_solo-orpo_8gpu", "parallel.context_parallel_size=2",  # an
            "--model", "qwen2.5-7b", "--world-size", "8", "--long-tokens", "32768",  # override,
            "--device-gib", "141"]  # then options
    table = run_python("examples/estimate_memory.py", args, env=WARM_ENV)
    report = run_python("examples/estimate_memory.py", args + ["--json"], env=WARM_ENV)
    assert table.returncode == 0 and report.returncode == 0, table.stderr[-2000:]
    figures = json.loads(report.stdout)
    assert figures["recipe_layout"]["cp"] == 2
    lines = table.stdout.splitlines()
    assert lines[2] == (f"recipe layout TP2 PP1 CP2 DP2 (sequence parallel on, recompute "
                        f"selective): {figures['per_gpu_gib']['total_gib']:.1f} GiB per GPU of "
                        f"141 -> fits")
    header = "   TP  PP  CP  DP  recompute  offload  GiB/GPU  extra compute"
    rows = lines[lines.index(header) + 1:lines.index(header) + 13]
    assert [row.split() for row in rows] == [
        [str(r["tp"]), str(r["pp"]), str(r["cp"]), str(r["dp"]), r["recompute"],
         "yes" if r["optimizer_cpu_offload"] else "no", f"{r['total_gib']:.1f}",
         f"{r['extra_compute_pct']:+.1f}%"] for r in figures["plan"][:12]]
