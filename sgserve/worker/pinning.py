"""Process placement: core pinning, thread-pool sizing, and dying with the parent."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

PR_SET_PDEATHSIG = 1


def pin(cores: list[int]) -> None:
    os.sched_setaffinity(0, set(cores))


def thread_env(intra: int, inter: int) -> dict[str, str]:
    """Environment that sizes TF's and oneDNN/OpenMP's pools before TensorFlow is imported."""
    return {
        "OMP_NUM_THREADS": str(intra),
        "TF_NUM_INTRAOP_THREADS": str(intra),
        "TF_NUM_INTEROP_THREADS": str(inter),
    }


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the parent dies, so `kill -9` of the server leaves no
    orphans (Linux only; elsewhere the worker notices the broker's silence instead)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
