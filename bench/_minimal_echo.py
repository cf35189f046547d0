"""The floors of bench_request_cost.py: the least a ZeroMQ broker and worker can do per request.

    client DEALER --tcp--> broker ROUTER | ROUTER --ipc--> echo worker DEALER --> back      (router)
    client DEALER --tcp--> zmq.proxy(ROUTER, DEALER) --ipc--> echo worker DEALER --> back  (proxy)

``router``: one Python process, a ROUTER frontend and a ROUTER backend, forwarding frames
unchanged: poll, drain each socket with recv_multipart(NOBLOCK), send_multipart. Replies find their
client by the identity frame the request carried (no table, no request ids). The worker announces
itself once ([b"READY"]); requests go to the known workers round robin.

``proxy``: libzmq's C proxy (``zmq.proxy(frontend ROUTER, backend DEALER)``) in its own process;
its CPU includes its I/O threads, which are threads of that process.

``worker``: one DEALER process (optionally pinned to a core) that sends back every message as it
came: it sees ``[client identity, MAGIC, header, payload]`` behind either broker and echoes it, so
the reply is routed to the client that asked. ``--ready`` (router broker only) announces it.

    python bench/_minimal_echo.py router --frontend tcp://127.0.0.1:PORT --backend ipc:///tmp/x/be
    python bench/_minimal_echo.py proxy  --frontend tcp://127.0.0.1:PORT --backend ipc:///tmp/x/be
    python bench/_minimal_echo.py worker --backend ipc:///tmp/x/be --core 1 [--ready]

Each runs until SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import zmq

READY = b"READY"
DRAIN = 256  # messages read per socket per poll wake-up, at most


def router(frontend_ep: str, backend_ep: str) -> int:
    ctx = zmq.Context()
    frontend = ctx.socket(zmq.ROUTER)
    backend = ctx.socket(zmq.ROUTER)
    for s in (frontend, backend):
        s.setsockopt(zmq.LINGER, 0)
    frontend.bind(frontend_ep)
    backend.bind(backend_ep)
    poller = zmq.Poller()
    poller.register(backend, zmq.POLLIN)
    poller.register(frontend, zmq.POLLIN)
    workers: list[bytes] = []
    nxt = 0
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    f_recv, f_send = frontend.recv_multipart, frontend.send_multipart
    b_recv, b_send = backend.recv_multipart, backend.send_multipart
    NOBLOCK, Again = zmq.NOBLOCK, zmq.Again
    while not stop:
        ready = dict(poller.poll(1000))
        if backend in ready:
            for _ in range(DRAIN):
                try:
                    frames = b_recv(NOBLOCK, copy=False)
                except Again:
                    break
                if len(frames) == 2 and frames[1].bytes == READY:
                    workers.append(frames[0].bytes)
                else:
                    f_send(frames[1:], copy=False)  # [client identity, MAGIC, header, payload]
        if frontend in ready:
            for _ in range(DRAIN):
                try:
                    frames = f_recv(NOBLOCK, copy=False)
                except Again:
                    break
                if workers:
                    nxt = (nxt + 1) % len(workers)
                    b_send([workers[nxt]] + frames, copy=False)
    ctx.destroy(linger=0)
    return 0


def proxy(frontend_ep: str, backend_ep: str) -> int:
    ctx = zmq.Context()
    frontend = ctx.socket(zmq.ROUTER)
    backend = ctx.socket(zmq.DEALER)
    for s in (frontend, backend):
        s.setsockopt(zmq.LINGER, 0)
    frontend.bind(frontend_ep)
    backend.bind(backend_ep)
    # SIGTERM's default action ends the process inside the C proxy; nothing to clean up but sockets.
    try:
        zmq.proxy(frontend, backend)
    except (zmq.ContextTerminated, KeyboardInterrupt):
        pass
    return 0


def worker(backend_ep: str, core: int | None, announce: bool) -> int:
    if core is not None:
        os.sched_setaffinity(0, {core})
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(backend_ep)
    if announce:
        sock.send(READY)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    recv, send = sock.recv_multipart, sock.send_multipart
    NOBLOCK, Again = zmq.NOBLOCK, zmq.Again
    while not stop:
        if poller.poll(1000):
            for _ in range(DRAIN):
                try:
                    frames = recv(NOBLOCK, copy=False)
                except Again:
                    break
                send(frames, copy=False)
    ctx.destroy(linger=0)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", choices=["router", "proxy", "worker"])
    ap.add_argument("--frontend")
    ap.add_argument("--backend", required=True)
    ap.add_argument("--core", type=int, default=None, help="worker: pin to this core")
    ap.add_argument("--ready", action="store_true", help="worker: announce itself (router broker)")
    a = ap.parse_args()
    if a.role == "router":
        return router(a.frontend, a.backend)
    if a.role == "proxy":
        return proxy(a.frontend, a.backend)
    return worker(a.backend, a.core, a.ready)


if __name__ == "__main__":
    sys.exit(main())
