"""Child processes and signals (solopo_mcore/processes.py), with real signals."""

import signal
import subprocess
import sys

from tests.helpers.launch import REPO

# A rank's first save starts dist_checkpointing's write-results server. Here torchrun's SIGTERM
# to the rank's process group arrives at the worst moment: the server has been exec'd and has
# not yet read what to run (the parent writes that only after the spawn returns), so it is in
# its interpreter's startup, before its initializer ignores SIGTERM.
_SIGTERM_DURING_SERVER_STARTUP = """
import os, signal, sys
from multiprocessing import util

received = []
signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))  # as a rank does
real_spawn = util.spawnv_passfds

def spawn_then_sigterm(path, args, passfds):
    pid = real_spawn(path, args, passfds)
    if any("spawn_main" in str(arg) for arg in args):  # the server, not the resource tracker
        os.killpg(0, signal.SIGTERM)
        print("signalled the group while the server starts", flush=True)
    return pid

util.spawnv_passfds = spawn_then_sigterm
from megatron.core.dist_checkpointing.strategies import filesystem_async
from solopo_mcore.processes import protect_checkpoint_writer

protect_checkpoint_writer()
queue = filesystem_async._results_queue
queue.put({"rank": 0})
assert queue.get() == {"rank": 0}
print("server alive; the rank's handler saw", received, flush=True)
"""


def test_checkpoint_writer_server_survives_sigterm_during_its_startup():
    """The server starts with SIGTERM blocked until its initializer ignores it. Starting
    multiprocessing's resource tracker inside the server's spawn unblocked SIGTERM in the
    calling thread, so a SIGTERM in the server's first milliseconds killed it and the rank's
    save failed with EOFError (seen in CI). The rank still receives its own SIGTERM."""
    result = subprocess.run([sys.executable, "-c", _SIGTERM_DURING_SERVER_STARTUP], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            start_new_session=True)  # its own process group, for killpg(0)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "signalled the group while the server starts" in result.stdout, result.stdout
    assert f"the rank's handler saw [{int(signal.SIGTERM)}]" in result.stdout, result.stdout
