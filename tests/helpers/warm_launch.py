"""Launch an entry script's ranks from a warm process instead of a fresh torchrun.

Most of a tiny CPU run's launch is start-up: torchrun's agent imports torch (~2.5 s on the
2-core CI machine), then every rank imports torch, megatron-core and transformers (~9-10 s, see
docs/testing.md) before it does anything. This module keeps one *server* per test session that
has imported all of that once. For each launch it forks an *agent*, which forks the ranks with
the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR/PORT, TORCHELASTIC_RUN_ID and restart count, OMP_NUM_THREADS=1 at 2+ ranks) and runs
the script as ``__main__``, like ``python -u script``. As torchrun's agent does, it stops the
other ranks (SIGTERM, then SIGKILL after a grace period) once one fails, and its ranks die with
it (``exit_with_parent`` in :func:`solopo_mcore.errors.entry_point`).

What is tested this way is the entry script, the library and the process group, not torchrun.
Tests that are about torchrun itself (signals to its process group, restarts, multi-node agents,
a bare command's warnings, memory measured per process) launch the real one, and so does
everything when ``SOLOPO_TEST_REAL_TORCHRUN=1`` (docs/testing.md). A launch whose environment
differs from the server's in a variable read at import time (``PYTHONPATH``, ``HF_*``,
``TORCH*``, ...) also goes to the real torchrun, since the server imported with its own.

Protocol: JSON lines on the server's stdin/stdout, one launch at a time.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REAL_ENV = "SOLOPO_TEST_REAL_TORCHRUN"
#: Environment variables that may differ between the server and a launch: read at run time.
RUN_TIME_KEYS = ("PYTHONWARNINGS", "OMP_NUM_THREADS")
#: Prefixes of variables read at import time by Python, torch, transformers or the hub.
IMPORT_TIME_PREFIXES = ("PYTHON", "HF_", "TRANSFORMERS", "TORCH", "CUDA", "NVIDIA", "MKL", "KMP",
                        "OMP", "GOMP", "LD_", "MEGATRON", "WANDB", "TOKENIZERS", "XDG_")
#: torchrun's agent waits this long after SIGTERM before it kills a failed launch's other ranks.
GRACE_S = 30
#: What the server imports once: everything an entry script's rank imports before it works.
WARM_MODULES = ("torch", "torch.distributed", "numpy", "safetensors.torch", "transformers",
                "megatron.core", "megatron.core.dist_checkpointing",
                "megatron.core.models.gpt", "megatron.core.pipeline_parallel",
                "megatron.core.optimizer", "solopo_mcore.training.trainer",
                "solopo_mcore.convert.commands", "solopo_mcore.evaluation.items")


# ---------------------------------------------------------------------------------- server side
def _rank_env(request: dict, rank: int, port: int, run_id: str) -> dict:
    env = dict(request["env"])
    if not request.get("torchrun", True):  # ``python -m module`` or ``python script``
        return env
    nproc = request["nproc"]
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", ROLE_RANK=str(rank),
               ROLE_NAME="default", WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               ROLE_WORLD_SIZE=str(nproc), GROUP_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), TORCHELASTIC_RUN_ID=run_id,
               TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0",
               TORCHELASTIC_USE_AGENT_STORE="False")
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it at 2+ processes
    return env


def _run_rank(request: dict, rank: int, port: int, run_id: str) -> int:
    """In a forked rank: become ``python -u script args`` with the rank's environment."""
    import runpy
    import warnings

    os.environ.clear()
    os.environ.update(_rank_env(request, rank, port, run_id))
    os.chdir(request["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(out, fd)
        os.close(out)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    warnings.resetwarnings()
    if os.environ.get("PYTHONWARNINGS"):
        warnings._processoptions(os.environ["PYTHONWARNINGS"].split(","))
    import torch
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    code = 0
    try:
        if "call" in request:
            code = 0 if _call(request["call"], rank) else 1
        elif "module" in request:
            sys.argv = [request["module"], *request["argv"]]
            sys.path[0] = os.getcwd()
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        else:
            script = str(Path(request["script"]).resolve())
            sys.argv = [request["script"], *request["argv"]]
            sys.path[0] = str(Path(script).parent)
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught exception
        import traceback
        traceback.print_exc()
        code = 1
    import threading
    threading._shutdown()  # as the interpreter does at exit: join non-daemon threads
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _call(path: str, rank: int) -> bool:
    """``module:function(**kwargs)`` from the pickle at ``path``; its result, or the traceback of
    what it raised, pickled to ``path.rank<R>`` (see :func:`tests.helpers.dist.run_distributed`)."""
    import importlib
    import pickle
    import traceback
    with open(path, "rb") as f:
        target, kwargs = pickle.load(f)
    sys.path.insert(0, os.getcwd())  # the repository, for ``tests.helpers...``
    try:
        module_name, fn_name = target.split(":")
        outcome = ("ok", getattr(importlib.import_module(module_name), fn_name)(**kwargs))
    except BaseException:  # noqa: BLE001 - reported to the test
        outcome = ("error", traceback.format_exc())
    finally:
        try:
            from solopo_mcore.parallel.layout import destroy_parallel
            destroy_parallel()
        except Exception:  # noqa: BLE001
            pass
    with open(f"{path}.rank{rank}", "wb") as f:
        pickle.dump(outcome, f)
    return outcome[0] == "ok"


def _agent(request: dict) -> int:
    """In the forked agent: fork the ranks, wait; once one fails, stop the others."""
    from solopo_mcore.processes import exit_with_parent
    os.close(_REPLIES["fd"])  # the server's reply pipe: not for the ranks and their children
    exit_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    port, run_id = request["port"], uuid.uuid4().hex[:12]
    ranks = {}
    for rank in range(request["nproc"]):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_rank(request, rank, port, run_id)
            finally:
                os._exit(code)
        ranks[pid] = rank
    codes, stop_at = {}, None
    deadline = time.time() + request["timeout"]
    while len(codes) < len(ranks):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.time()
            if now > deadline:
                for other in set(ranks) - set(codes):
                    os.kill(other, signal.SIGKILL)
                return 124
            if stop_at is not None and now > stop_at:
                for other in set(ranks) - set(codes):
                    os.kill(other, signal.SIGKILL)
                stop_at = None
            time.sleep(0.05)
            continue
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0 and stop_at is None:
            for other in set(ranks) - set(codes):
                os.kill(other, signal.SIGTERM)
            stop_at = time.time() + GRACE_S
    failed = {ranks[pid]: code for pid, code in codes.items() if code != 0}
    if failed:
        with open(request["stderr"], "a") as err:
            err.write(f"[warm launch] ranks failed: {failed} (exit code, or -signal)\n")
        return 1  # as torchrun exits after a failed launch
    return 0


_REPLIES: dict = {}


def serve() -> None:
    """The server: import once, then one launch per request line."""
    import importlib
    import warnings
    warnings.simplefilter("ignore")
    for name in WARM_MODULES:
        importlib.import_module(name)
    warnings.resetwarnings()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    _REPLIES["fd"] = replies.fileno()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    replies.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _agent(request)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


# ---------------------------------------------------------------------------------- test side
class _Server:
    def __init__(self):
        env = dict(os.environ)
        self.env = env
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env, cwd=str(Path(__file__).parents[2]))
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("the warm launcher's server did not start")
        atexit.register(self.close)

    def usable_for(self, env: dict) -> bool:
        def import_time(e):
            return {k: v for k, v in e.items() if k not in RUN_TIME_KEYS
                    and k.startswith(IMPORT_TIME_PREFIXES)}
        return self.proc.poll() is None and import_time(env) == import_time(self.env)

    def launch(self, request: dict) -> int:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError("the warm launcher's server exited during a launch")
        return json.loads(reply)["returncode"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_SERVER: dict = {}
#: Where a launch's output files and a call's pickles live while it runs.
SCRATCH = Path(tempfile.gettempdir()) / "solopo-warm-launch"


def enabled() -> bool:
    return os.environ.get(REAL_ENV, "") in ("", "0")


def _server_for(env: dict):
    """The session's server (started on first use), or None where the real processes must run
    a launch with ``env``: ``SOLOPO_TEST_REAL_TORCHRUN=1``, or another import-time environment."""
    if not enabled():
        return None
    server = _SERVER.get("server")
    if server is None:
        server = _SERVER["server"] = _Server()
    return server if server.usable_for(env) else None


def launch(nproc: int, script, args, cwd, env: dict, timeout: float, port: int,
           module=None, torchrun=True):
    """Run ``script args`` on ``nproc`` warm ranks; a :class:`subprocess.CompletedProcess`, or
    None where the real torchrun must run it (see the module docstring). Raises
    :class:`subprocess.TimeoutExpired` past ``timeout`` seconds, like :func:`subprocess.run`.
    With ``module`` instead of ``script`` (and ``nproc`` 1): ``python -m module args``; with
    ``torchrun`` False: ``python script args``; both without torchrun's environment."""
    server = _server_for(env)
    if server is None:
        return None
    SCRATCH.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    out, err = SCRATCH / f"warm-{tag}.out", SCRATCH / f"warm-{tag}.err"
    args = [str(a) for a in args]
    request = {"nproc": nproc, "argv": args, "cwd": str(cwd), "env": env, "timeout": timeout,
               "port": port, "stdout": str(out), "stderr": str(err)}
    request.update({"module": module} if module else {"script": script})
    request["torchrun"] = torchrun and not module
    code = server.launch(request)
    stdout = out.read_text() if out.exists() else ""
    stderr = err.read_text() if err.exists() else ""
    out.unlink(missing_ok=True)
    err.unlink(missing_ok=True)
    cmd = ["warm-launch", "-m", module, *args] if module else \
        [f"warm-launch --nproc-per-node={nproc}" if torchrun else "warm-launch", script, *args]
    if code == 124:
        raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
    return subprocess.CompletedProcess(cmd, code, stdout, stderr)


def call(nproc: int, target: str, kwargs: dict, cwd, env: dict, timeout: float, port: int):
    """``target(**kwargs)`` on ``nproc`` warm ranks: ``{rank: ("ok", result) or ("error",
    traceback)}`` for the ranks that finished, or None where the real processes must run it."""
    import pickle
    import shutil
    server = _server_for(env)
    if server is None:
        return None
    SCRATCH.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=SCRATCH))
    try:
        path = folder / "call.pkl"
        path.write_bytes(pickle.dumps((target, kwargs)))
        code = server.launch({"nproc": nproc, "call": str(path), "cwd": str(cwd), "env": env,
                              "timeout": timeout, "port": port,
                              "stdout": str(folder / "out"), "stderr": str(folder / "err")})
        outcomes = {}
        for rank in range(nproc):
            result = folder / f"call.pkl.rank{rank}"
            if result.exists():
                outcomes[rank] = pickle.loads(result.read_bytes())
        if code == 124:
            outcomes[-1] = ("error", f"timed out after {timeout} s")
        elif code != 0 and not any(status == "error" for status, _ in outcomes.values()):
            err = (folder / "err").read_text()[-5000:] if (folder / "err").exists() else ""
            outcomes[-1] = ("error", f"the launch exited {code}:\n{err}")
        return outcomes
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    serve()
