"""A scripted stand-in for ``sgserve.worker``: a real process that speaks the backend protocol.

It echoes a request's inputs back as its outputs (same frames), so tests can check routing and
payload handling without TensorFlow. The broker starts it as ``python echo_worker.py [options] SPEC``
(the Supervisor appends the WorkerSpec JSON to its command).

Options (before SPEC):
  --boot-exit N        exit with code N instead of booting (with --only-index, just that worker)
  --boot-delay S       sleep S seconds before READY
  --only-index I       apply --boot-exit / --boot-delay / --silent to worker I only
  --silent             never send heartbeats (the broker should expire and replace it)
  --restart-delay S    with --state-dir DIR: a restarted worker (DIR/booted-INDEX exists) sleeps S
                       seconds before READY

Per request, special input names:
  sleep_s  float32 scalar: sleep that long before replying
  crash    anything: exit(1) at once, holding the request
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import time

import msgpack
import zmq

from sgserve.config import WorkerSpec
from sgserve.errors import ServeError
from sgserve.protocol import (DEFAULT_SIGNATURE, W_HEARTBEAT, W_READY, W_REQUEST, W_STOP, check_tensors, parse_route,
                              reply_frame)

ORPHAN_AFTER = 10.0  # seconds without hearing from the broker before exiting: never outlive a test


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--boot-exit", type=int)
    parser.add_argument("--boot-delay", type=float, default=0.0)
    parser.add_argument("--only-index", type=int)
    parser.add_argument("--silent", action="store_true")
    parser.add_argument("--restart-delay", type=float, default=0.0)
    parser.add_argument("--state-dir")
    parser.add_argument("spec")
    args = parser.parse_args(argv)
    spec = WorkerSpec.from_json(args.spec)
    targeted = args.only_index is None or args.only_index == spec.index
    if targeted and args.boot_delay:
        time.sleep(args.boot_delay)
    if targeted and args.boot_exit is not None:
        print(f"echo worker {spec.index}: failing boot with exit code {args.boot_exit}", file=sys.stderr)
        return args.boot_exit
    silent = targeted and args.silent
    if args.state_dir:
        marker = os.path.join(args.state_dir, f"booted-{spec.index}")
        if os.path.exists(marker):
            time.sleep(args.restart_delay)
        else:
            open(marker, "w").close()

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"w{spec.index}-{os.getpid()}".encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(spec.backend)
    sock.send_multipart([W_READY, msgpack.packb({"index": spec.index, "pid": os.getpid(), "cores": spec.cores})])
    interval_ms = spec.heartbeat_interval * 1000.0
    heard = time.monotonic()
    while True:
        if not sock.poll(interval_ms):
            if time.monotonic() - heard > ORPHAN_AFTER:
                return 0
            if not silent:
                sock.send(W_HEARTBEAT)
            continue
        frames = sock.recv_multipart(copy=False)
        heard = time.monotonic()
        command = frames[0].bytes[:1]
        if command == W_STOP:
            return 0
        if command == W_REQUEST:
            serve(sock, spec, frames[0].bytes, msgpack.unpackb(frames[1].bytes, raw=False), frames[2:])


def serve(sock: zmq.Socket, spec: WorkerSpec, route: bytes, header: dict, payload: list) -> None:
    rid, version, deadline, attempt = parse_route(route)
    reply = {"id": header.get("id"), "model": header.get("model"), "version": version, "worker": spec.index}
    try:  # the worker validates tensor frames (the broker no longer does): the same check as sgserve's
        check_tensors(header.get("inputs"), payload)
    except ServeError as exc:
        reply.update(code=exc.code, message=exc.message)
        sock.send_multipart([reply_frame(rid), msgpack.packb(reply)])
        return
    metas = header.get("inputs") or []
    names = [m["name"] for m in metas]
    if "crash" in names:
        os._exit(1)
    if "sleep_s" in names:
        time.sleep(struct.unpack("<f", payload[names.index("sleep_s")].bytes[:4])[0])
    if deadline is not None and time.time() > deadline:
        reply.update(code=504, message="deadline exceeded before the worker ran the request")
        sock.send_multipart([reply_frame(rid), msgpack.packb(reply)])
        return
    wanted = header.get("output_filter")
    outputs, frames = [], []
    for meta, frame in zip(metas, payload):
        if wanted is None or meta["name"] in wanted:
            outputs.append(meta)
            frames.append(frame)
    reply.update(code=200, message="", outputs=outputs,
                 broker={"signature": header.get("signature") or DEFAULT_SIGNATURE, "deadline": deadline,
                         "attempt": attempt, "routing_key": header.get("routing_key")})
    sock.send_multipart([reply_frame(rid), msgpack.packb(reply, use_bin_type=True), *frames], copy=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
