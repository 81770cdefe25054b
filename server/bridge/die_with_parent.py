"""Exec shim: `python die_with_parent.py PARENT_PID PROGRAM [ARGS...]`.

Asks Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG), then
replaces itself with PROGRAM (same pid; the setting survives exec). Envoy started this
way cannot outlive a gateway killed with `kill -9`, and so cannot keep a restarted
gateway's ports.

Why a shim and not `preexec_fn`: the gateway is multi-threaded (gRPC's threads) by the
time it starts Envoy, and Python code between fork and exec in such a process can
deadlock; here the fork is a plain fork+exec and the prctl runs in a fresh interpreter.
Why not a pipe Envoy watches: Envoy watches nothing of the kind, so that would need a
second, long-lived wrapper process, which could itself be killed and orphan Envoy.

PR_SET_PDEATHSIG fires when the *thread* that forked the child ends: the gateway starts
Envoy from its event loop thread, which lives as long as the process. Elsewhere than
Linux the shim only execs (no parent-death signal exists there).

Runs on the bare interpreter (`-I -S`): it imports nothing from the project.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, program, args = int(sys.argv[1]), sys.argv[2], sys.argv[2:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            sys.exit(f"die_with_parent: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")
        # The parent may have died between fork and prctl: the signal would never come.
        if os.getppid() != parent:
            sys.exit("die_with_parent: the parent process is already gone")
    os.execv(program, args)


if __name__ == "__main__":
    main()
