"""Child processes that die with the process that started them (Linux `PR_SET_PDEATHSIG`).

Used by everything that starts long-lived children: the policy server (vLLM), the accelerate
launcher of multi-process training, the stage worker's forked work-horses and RQ's scheduler
child, and `selfreward stack`. Without it a killed owner leaves orphans that keep ports, GPU
memory or RQ's scheduler lock, and finish work nobody watches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_forking: list[int] = [0]


def die_with_parent(signum: int = signal.SIGKILL, parent_pid: int | None = None) -> None:
    """In a freshly started child (after fork, or between fork and exec): ask the kernel to send
    `signum` when the parent dies. With `parent_pid`, exit at once if that parent already died
    before this ran. A no-op where the platform has no such call."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def term_with_parent() -> None:
    """`preexec_fn` of a server or launcher child: SIGTERM (a clean stop) when its owner dies."""
    die_with_parent(signal.SIGTERM)


def children_die_with_their_parent(signum: int = signal.SIGKILL) -> None:
    """From now on every process forked from this one, and from its children (the hook is
    inherited through fork), gets `signum` when the process that forked it dies."""
    os.register_at_fork(
        before=lambda: _forking.__setitem__(0, os.getpid()),
        after_in_child=lambda: die_with_parent(signum, _forking[0]),
    )
