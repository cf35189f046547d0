"""A bare ZeroMQ echo over sgserve's hops, for bench_overhead.py: no TensorFlow, no msgpack decoding.

    client DEALER --tcp--> broker ROUTER | ROUTER --ipc--> worker DEALER (echo) --> back

The broker has the shape of sgserve's: one poll loop over the backend and frontend ROUTERs,
draining each with NOBLOCK reads, a request-id -> client map, an 8-byte request id on the backend
hop, and the same frames (MAGIC, one-byte command, id, header, payload). The worker echoes the
header and payload back. Both run as their own processes:

    python bench/_echo.py broker --frontend tcp://127.0.0.1:PORT --backend ipc:///tmp/x/backend
    python bench/_echo.py worker --backend ipc:///tmp/x/backend [--core 0]
"""
from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys

import zmq

MAGIC = b"SGS1"
W_READY, W_REQUEST, W_REPLY = b"\x01", b"\x02", b"\x03"
BATCH = 256


def broker(frontend_ep: str, backend_ep: str) -> int:
    ctx = zmq.Context()
    frontend = ctx.socket(zmq.ROUTER)
    backend = ctx.socket(zmq.ROUTER)
    for s in (frontend, backend):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
    frontend.bind(frontend_ep)
    backend.bind(backend_ep)
    poller = zmq.Poller()
    poller.register(backend, zmq.POLLIN)
    poller.register(frontend, zmq.POLLIN)
    workers: list[bytes] = []
    pending: dict[bytes, bytes] = {}  # request id -> client identity
    rids = itertools.count(1)
    rr = itertools.count()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        ready = dict(poller.poll(1000))
        if backend in ready:
            for _ in range(BATCH):
                try:
                    frames = backend.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                ident, cmd = frames[0].bytes, frames[2].bytes
                if cmd == W_REPLY:
                    client = pending.pop(frames[3].bytes, None)
                    if client is not None:
                        frontend.send_multipart([client, MAGIC, *frames[4:]], copy=False)
                elif cmd == W_READY and ident not in workers:
                    workers.append(ident)
        if frontend in ready:
            for _ in range(BATCH):
                try:
                    frames = frontend.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if not workers:
                    continue
                rid = next(rids).to_bytes(8, "little")
                pending[rid] = frames[0].bytes
                w = workers[next(rr) % len(workers)]
                backend.send_multipart([w, MAGIC, W_REQUEST, rid, *frames[2:]], copy=False)
    ctx.destroy(linger=0)
    return 0


def worker(backend_ep: str, core: int | None) -> int:
    if core is not None:
        os.sched_setaffinity(0, {core})
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(backend_ep)
    sock.send_multipart([MAGIC, W_READY, b"{}"])
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        if poller.poll(1000):
            frames = sock.recv_multipart(copy=False)
            if len(frames) >= 4 and frames[1].bytes == W_REQUEST:
                sock.send_multipart([MAGIC, W_REPLY, *frames[2:]], copy=False)
    ctx.destroy(linger=0)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["broker", "worker"])
    ap.add_argument("--frontend")
    ap.add_argument("--backend", required=True)
    ap.add_argument("--core", type=int, default=None)
    a = ap.parse_args()
    if a.role == "broker":
        return broker(a.frontend, a.backend)
    return worker(a.backend, a.core)


if __name__ == "__main__":
    sys.exit(main())
