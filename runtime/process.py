"""Process lifetime: no rank or torchrun outlives the process that started it.

torchrun starts each rank in a session of its own, so a torchrun killed with SIGKILL (or the `meshplan run`
above it) would leave ranks running forever, blocked in collectives. Linux's PR_SET_PDEATHSIG makes the kernel
send a signal to a process when its parent dies: `meshplan run` sets SIGTERM for torchrun (which then stops
its ranks), and every rank sets SIGKILL for itself when torchrun dies. Elsewhere these are no-ops.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1          # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies; exit at once if the parent
    (`parent`, the pid it had when we were started, else any parent but init) is already gone."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if (parent is not None and os.getppid() != parent) or os.getppid() == 1:
        os._exit(128 + int(sig))          # the parent died before the request was in place


def child_dies_with_us(sig: int = signal.SIGTERM):
    """A `preexec_fn` for subprocess.Popen: the child gets `sig` when this process dies."""
    me = os.getpid()
    return lambda: die_with_parent(sig, parent=me)
