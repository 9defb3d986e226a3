"""Run a command in its own process group and take the whole group down when this supervisor's parent dies (Linux
PR_SET_PDEATHSIG) or it is signalled, so a flow process killed with SIGKILL leaves no DVC stage running behind it.

Usage: python flows/supervise.py PARENT_PID -- COMMAND [ARG ...]; exits with the command's status (a command killed
by signal N kills the supervisor with N too, so the caller sees the same negative return code).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

PR_SET_PDEATHSIG = 1  # linux/prctl.h
GRACE_S = 10.0  # SIGTERM first (checkpoints are written atomically), SIGKILL after this many seconds


def die_with_parent(sig: int) -> None:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux only; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    parent = int(argv[0])
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 128 + signal.SIGTERM
    proc = subprocess.Popen(argv[2:], start_new_session=True)  # its own process group: pgid == proc.pid

    def stop(signum: int, _frame: object) -> None:
        kill_group(proc.pid, signal.SIGTERM)
        timer = threading.Timer(GRACE_S, kill_group, (proc.pid, signal.SIGKILL))
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    code = proc.wait()
    kill_group(proc.pid, signal.SIGKILL)  # anything the command left behind in its group
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
