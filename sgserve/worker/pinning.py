"""Worker placement: core pinning and thread-pool sizing (process plumbing is in sgserve.process)."""
from __future__ import annotations

import os


def pin(cores: list[int]) -> None:
    os.sched_setaffinity(0, set(cores))


def thread_env(intra: int, inter: int) -> dict[str, str]:
    """Environment that sizes TF's and oneDNN/OpenMP's pools before TensorFlow is imported."""
    return {
        "OMP_NUM_THREADS": str(intra),
        "TF_NUM_INTRAOP_THREADS": str(intra),
        "TF_NUM_INTEROP_THREADS": str(inter),
    }
