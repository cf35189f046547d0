"""The worker zygote: imports TensorFlow once, then forks every worker from that image.

Importing TensorFlow is most of a worker's private memory: about 120 MiB of Python objects
(pymalloc arenas), 80 MiB of malloc heap (bigger Python objects, TensorFlow's op and kernel
registries) and 15 MiB of relocated library pages, the same bytes in every worker (bench/RESULTS.md,
"Memory per extra worker"). Forked from one process that has imported it all, the workers share
those pages copy-on-write and each keeps only what it writes: its model's graph and session, its
thread pools, and the objects it touches. The zygote freezes the collector's view of its objects
(``gc.freeze()``) before it forks, so that no collection in a worker writes to every object's
header and copies the pages back.

Started by the broker's supervisor as ``python -m sgserve.worker.zygote FD BROKER_PID`` (only for
the default worker command), with the workers' environment. It runs no TensorFlow: no eager
context, no thread pool exists before a fork (TensorFlow's pools do not survive one); each worker
creates its own after it is pinned, exactly as a worker started with ``python -m sgserve.worker``.

Protocol on the socket FD, one JSON object per line:

- zygote -> broker, once: ``{"ready": PID}`` when the imports are done, or ``{"error": MESSAGE}``
  (the zygote then exits; the supervisor starts workers as plain processes instead);
- broker -> zygote: ``{"spawn": TOKEN, "argv": [SPEC_JSON]}``;
- zygote -> broker: ``{"spawned": TOKEN, "pid": PID}`` or ``{"spawned": TOKEN, "error": MESSAGE}``.

Each worker is forked twice (zygote -> short-lived middle process -> worker), and the middle process
exits at once. The broker is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so the kernel makes the
orphaned worker the broker's own child: the supervisor waits for it, gets its exit code (3 and 4
keep their meaning), kills it without any pid-reuse race, and the worker dies with the broker
(``PR_SET_PDEATHSIG``, set once the broker is its parent). A zygote that dies takes no worker with
it. The zygote exits when the broker closes the socket, and dies with the broker.
``SGSERVE_WORKER_ZYGOTE=0`` in the server's environment turns it off (supervisor.py).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback

from sgserve import process
from sgserve.logs import setup_logging

log = logging.getLogger("sgserve.zygote")

REPARENT_TIMEOUT = 10.0  # seconds a new worker waits for its middle process to exit


def import_tensorflow():
    """``import tensorflow`` without the Keras package it imports eagerly.

    TensorFlow's ``__init__`` imports ``keras.src.optimizers`` (all of Keras 3, and through it
    matplotlib, PIL, rich, h5py: about 740 modules, 43 MiB and 1.5 s) only so that Keras
    registers its optimizers for SavedModel loading. A worker never loads a SavedModel: it imports
    the loader's rewritten graph, whose ops are all TensorFlow's. TensorFlow guards that import
    against ImportError, so ``keras`` is hidden for its duration only; ``tf.keras`` still works
    later (its lazy loader imports Keras on first use). TensorFlow's C++ start-up lines are held
    back unless the level is debug (sgserve/process.py ``tensorflow_import_quiet``).
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    hidden = "keras" not in sys.modules
    if hidden:
        sys.modules["keras"] = None  # type: ignore[assignment]  # import keras -> ImportError
    try:
        with process.tensorflow_import_quiet():
            import tensorflow as tf  # noqa: PLC0415
    finally:
        if hidden and sys.modules.get("keras", 0) is None:
            del sys.modules["keras"]
    return tf


def preload() -> None:
    """Everything a worker imports, imported once here (no TensorFlow runtime is created)."""
    os.environ.setdefault(process.TF_LOG_ENV, process.QUIET_TF_LOG_LEVEL)  # child_env set it (debug: 0)
    import_tensorflow()  # first: a module below that imports tensorflow itself would bring Keras
    import msgpack  # noqa: F401, PLC0415
    import numpy  # noqa: F401, PLC0415
    import zmq  # noqa: F401, PLC0415

    import sgserve.worker.serve  # noqa: F401, PLC0415

    for name in ("sgserve.worker.runtime", "sgserve.models.warmup", "sgserve.worker.batching",
                 "tensorflow.python.framework.graph_util_impl"):
        try:  # what a worker imports when it builds a model; it reports its own errors itself
            __import__(name)
        except Exception:  # noqa: BLE001
            pass
    gc.collect()
    gc.freeze()  # the forked workers' collections never walk (and so never copy) these objects


def serve(sock: socket.socket, broker_pid: int) -> int:
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return 0  # the broker closed the socket: it is stopping, or gone
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
            token, argv = msg["spawn"], [str(a) for a in msg["argv"]]
        except (ValueError, KeyError, TypeError):
            continue
        try:
            reply = {"spawned": token, "pid": fork_worker(argv, broker_pid, sock)}
        except OSError as exc:
            reply = {"spawned": token, "error": f"{type(exc).__name__}: {exc}"}
        sock.sendall(json.dumps(reply).encode() + b"\n")


def fork_worker(argv: list[str], broker_pid: int, sock: socket.socket) -> int:
    """Forks a worker (through a middle process that exits at once) and returns its pid."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:  # the middle process: fork the worker, report its pid, exit
        code = 1
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                run_worker(argv, broker_pid, sock)  # never returns
            os.write(w, str(pid).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = b""
        while True:
            chunk = os.read(r, 64)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(middle, 0)  # once it is reaped, the worker is the broker's child
    if not data:
        raise OSError("the worker could not be forked")
    return int(data)


def run_worker(argv: list[str], broker_pid: int, sock: socket.socket) -> None:
    """In the forked worker: wait to be the broker's child, reset what the zygote set, run the
    worker's main, and exit with its code (never returns to the zygote's loop)."""
    code = 1
    try:
        os.close(sock.detach())  # the broker must see EOF when the zygote exits, whatever we do
        middle = os.getppid()
        deadline = time.monotonic() + REPARENT_TIMEOUT
        while os.getppid() == middle and middle != broker_pid and time.monotonic() < deadline:
            time.sleep(0.0005)
        if os.getppid() != broker_pid:
            os._exit(0)  # the broker is gone (or is no subreaper): nobody would supervise us
        process.die_with_parent()
        if os.getppid() != broker_pid:  # it died before the line above
            os._exit(0)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        try:
            spec = json.loads(argv[0])
            process.set_process_name(f"sgserve-w{int(spec['index'])}")
        except (ValueError, KeyError, TypeError, IndexError):
            pass
        sys.argv = [sys.argv[0], *argv]
        from sgserve.worker.serve import main  # noqa: PLC0415

        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - report it as an interpreter would, then exit 1
        traceback.print_exc()
        code = 1
    finally:
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        try:
            import atexit  # noqa: PLC0415

            atexit._run_exitfuncs()  # what the interpreter would run at exit (logging's flush, ...)
        except BaseException:  # noqa: BLE001
            pass
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code & 0xFF)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        fd, broker_pid = int(argv[0]), int(argv[1])
    except (IndexError, ValueError):
        print("usage: python -m sgserve.worker.zygote FD BROKER_PID", file=sys.stderr)
        return 2
    process.die_with_parent()
    if os.getppid() != broker_pid:
        return 0
    setup_logging("zygote")  # the level and format the broker exported
    process.set_process_name("sgserve-zygote")
    # Ctrl-C reaches the whole process group; the broker stops us by closing the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    try:
        preload()
        if threading_active() > 1:
            raise RuntimeError("a Python thread runs in the zygote; forking it would not be safe")
    except BaseException as exc:  # noqa: BLE001 - reported; the supervisor falls back to plain workers
        msg = f"{type(exc).__name__}: {exc}"
        try:
            sock.sendall(json.dumps({"error": msg}).encode() + b"\n")
        except OSError:
            pass
        log.error("cannot preload the worker: %s", msg)
        return process.EXIT_MODEL_ERROR
    sock.sendall(json.dumps({"ready": os.getpid()}).encode() + b"\n")
    try:
        return serve(sock, broker_pid)
    except (OSError, KeyboardInterrupt):
        return 0


def threading_active() -> int:
    import threading  # noqa: PLC0415

    return threading.active_count()


if __name__ == "__main__":
    sys.exit(main())
