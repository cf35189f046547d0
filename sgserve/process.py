"""Process plumbing shared by every role (broker, worker, zygote, loader): exit codes, dying with the
parent, child reaping, process names, the environment children run in (TensorFlow's start-up
chatter hidden below --log-level debug), and idle priority.

Nothing here knows about models or requests; broker, worker and models all import it.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from sgserve.logs import is_debug

# One set of exit codes for every sgserve process. The supervisor does not restart a worker that
# exits with EXIT_BOOT_ERROR or EXIT_MODEL_ERROR: it would fail the same way again.
EXIT_OK = 0
EXIT_FATAL = 1  # the server stopped because something broke while it ran (see its last log line)
EXIT_CONFIG_ERROR = 2  # `sgserve start` refused its flags, config files or model before serving
EXIT_BOOT_ERROR = 3  # a worker cannot boot: bad arguments, cannot pin, cannot reach the broker
EXIT_MODEL_ERROR = 4  # a worker or the loader cannot map the segment or build the model

_EXIT_MEANING = {
    EXIT_BOOT_ERROR: "it cannot boot (EXIT_BOOT_ERROR)",
    EXIT_MODEL_ERROR: "it cannot load the model (EXIT_MODEL_ERROR)",
}

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36


def describe_exit(rc: int) -> str:
    """'killed by SIGKILL' or 'exit code 3', for logs and error messages."""
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def never_restart_reason(rc: int) -> str | None:
    """Why a child that exited with ``rc`` must not be restarted, or None if a restart may help."""
    return _EXIT_MEANING.get(rc)


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
    orphans (Linux only; elsewhere a worker notices the broker's silence instead)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def become_child_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init (Linux >= 3.4), so that
    workers forked by the zygote (a grandchild that outlives its parent) are this process's own
    children: it waits for them and gets their exit codes, and they can die with it."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_process_name(name: str) -> None:
    """The name `ps -o comm`, top and /proc/PID/comm show (at most 15 bytes)."""
    _prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))


TF_LOG_ENV = "TF_CPP_MIN_LOG_LEVEL"
QUIET_TF_LOG_LEVEL = "2"  # errors only: no INFO or WARNING lines from TensorFlow's C++ code


def child_env() -> dict[str, str]:
    """The environment for workers, the zygote and the loader: ours (SGSERVE_LOG_LEVEL and
    SGSERVE_LOG_FORMAT included), with this sgserve importable even when it is not installed, and
    TensorFlow's C++ logging quiet unless the level is debug (a TF_CPP_MIN_LOG_LEVEL already set wins)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    old = env.get("PYTHONPATH")
    parts = old.split(os.pathsep) if old else []
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root] + parts)
    env.setdefault(TF_LOG_ENV, "0" if is_debug() else QUIET_TF_LOG_LEVEL)
    return env


# TensorFlow's C++ log lines (absl format: severity, MMDD, time, thread id, file:line]) and absl's
# notice that it logs to stderr before absl::InitializeLog().
_ABSL_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\s\]]+:\d+\] ")
_ABSL_PREINIT = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


@contextlib.contextmanager
def tensorflow_import_quiet() -> Iterator[None]:
    """Wrap ``import tensorflow``: what its C++ code writes to stderr meanwhile is held back and
    written afterwards without the lines TF_CPP_MIN_LOG_LEVEL would hide.

    TensorFlow 2.16+ logs through absl at import, before absl is initialised: the pre-init notice and
    "oneDNN custom operations are on" reach stderr whatever TF_CPP_MIN_LOG_LEVEL says (once per
    shared library that logs, so twice). The level is applied to them here instead; everything
    else written meanwhile (an error, a traceback) comes through, in order.
    """
    try:
        min_level = int(os.environ.get(TF_LOG_ENV, "0"))
    except ValueError:
        min_level = 0
    if min_level <= 0:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = without_tensorflow_chatter(held.read(), min_level)
            if kept:
                os.write(2, kept)


def without_tensorflow_chatter(data: bytes, min_level: int) -> bytes:
    """``data`` without the absl lines below ``min_level`` (TF_CPP_MIN_LOG_LEVEL's scale: 1 hides
    INFO, 2 WARNING too, 3 ERROR too) and without absl's pre-init notice."""
    hidden = "IWE"[:min(min_level, 3)].encode()
    kept = []
    for line in data.splitlines(keepends=True):
        m = _ABSL_LINE.match(line)
        if (m and m.group(1) in hidden) or line.rstrip(b"\r\n") == _ABSL_PREINIT:
            continue
        kept.append(line)
    return b"".join(kept)


def _thread_ids() -> list[int]:
    """Every thread of this process (0, this thread, where /proc is not there)."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def to_background(cores: list[int]) -> None:
    """The given cores (if any) and the lowest CPU priority, for every thread of this process."""
    for tid in _thread_ids() if cores else ():
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:
            pass
    lowest_priority()


def lowest_priority() -> None:
    """SCHED_IDLE for every thread of this process: only CPU time the workers leave idle.

    A thread inherits its creator's policy, but threads started at import time (numpy's BLAS pool)
    exist before this runs, so each one is set; call again after imports that start threads.
    """
    for tid in _thread_ids():
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            try:
                os.setpriority(os.PRIO_PROCESS, tid, 19)
            except OSError:
                pass
