"""Process placement: core pinning, thread-pool sizing, and dying with the parent."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36


def pin(cores: list[int]) -> None:
    os.sched_setaffinity(0, set(cores))


def thread_env(intra: int, inter: int) -> dict[str, str]:
    """Environment that sizes TF's and oneDNN/OpenMP's pools before TensorFlow is imported."""
    return {
        "OMP_NUM_THREADS": str(intra),
        "TF_NUM_INTRAOP_THREADS": str(intra),
        "TF_NUM_INTEROP_THREADS": str(inter),
    }


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _prctl(option: int, arg: object) -> bool:
    """prctl(2); False where it is not available or fails (not Linux)."""
    try:
        return _libc().prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the parent dies, so `kill -9` of the server leaves no
    orphans (Linux only; elsewhere the worker notices the broker's silence instead)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def become_child_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init (Linux >= 3.4), so that
    workers forked by the zygote (a grandchild that outlives its parent) are this process's own
    children: it waits for them and gets their exit codes, and they can die with it."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_process_name(name: str) -> None:
    """The name `ps -o comm`, top and /proc/PID/comm show (at most 15 bytes)."""
    _prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))
