"""A generated-message fuzzer against a live server, over all three front doors.

Used by tests/fuzz/test_live_fuzz.py (the short form, >= 10,000 messages) and bench/fuzz_server.py
(the long form, >= 100,000). It sends, per front door, messages built from valid requests by a
seeded generator: mutated header fields (hostile shapes and dtypes, huge ids and names, NaN and inf
timeouts), random frame counts, truncated and corrupted msgpack / protobuf / JSON, string tensors
with bad counts and deep nesting. Between batches it checks a well-formed canary request on every
door (the exact values), that no process of the server was replaced, and the server's memory.

What counts as an answer (docs/protocol.md section 6, TF Serving's codes):

- native ZeroMQ: every message gets exactly one reply (the protocol allows none only for a message
  ZeroMQ cannot deliver, which a DEALER cannot send); a malformed one 400 (404 for an unknown
  model, version or signature, 504 for timeout_ms <= 0), never 500;
- REST: every request gets an HTTP status; a malformed one a 4xx (aiohttp itself answers
  400/413/414/431 for what does not parse as HTTP), never 500 or a dropped connection;
- gRPC: every call gets a status; a malformed one INVALID_ARGUMENT, NOT_FOUND, DEADLINE_EXCEEDED or
  RESOURCE_EXHAUSTED, never INTERNAL or UNKNOWN.
No door may leave a message unanswered; a canary that goes unanswered fails the run with py-spy stacks.

A message that hits a reported, not yet fixed bug (the generator knows, or the 500's words tell) is
counted apart under the bug's name, so the suite stays green and the xfail tests pin the bugs.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import os
import random
import sys
import time
from collections import Counter
from typing import Any, Callable, Iterator

import grpc
import msgpack
import numpy as np
import psutil
import zmq

from sgserve import protocol
from tests.fuzz.generators import (GRPC_METHODS, GRPC_OK, GRPC_UNDECODABLE, HTTP_OK, HUGE_EMPTY, KNOWN_BY_MESSAGE,
                                   MODELS, NATIVE_OK, REST_BIG_VERSION, STRING_REPR, GrpcGen, Message, NativeGen,
                                   RestGen, predict_pb2)

@dataclasses.dataclass
class FuzzReport:
    tried: Counter = dataclasses.field(default_factory=Counter)  # door -> messages
    codes: Counter = dataclasses.field(default_factory=Counter)  # (door, code) -> count
    known: Counter = dataclasses.field(default_factory=Counter)  # (bug, outcome) -> count
    bad: list = dataclasses.field(default_factory=list)  # (door, kind, outcome, message, repr of payload)
    canaries: int = 0
    seconds: float = 0.0
    memory_before: dict = dataclasses.field(default_factory=dict)  # pid -> RSS bytes
    memory_after: dict = dataclasses.field(default_factory=dict)
    pids_before: dict = dataclasses.field(default_factory=dict)  # pid -> name
    pids_after: dict = dataclasses.field(default_factory=dict)
    log_lines: int = 0  # lines the server wrote to stdout/stderr during the run (PipeDrain)

    @property
    def total(self) -> int:
        return sum(self.tried.values())

    @property
    def memory_delta(self) -> int:
        return sum(self.memory_after.get(p, 0) - rss for p, rss in self.memory_before.items())

    def summary(self) -> dict[str, Any]:
        return {"messages": self.total, "per_door": dict(self.tried), "seconds": round(self.seconds, 1),
                "codes": {f"{d} {c}": n for (d, c), n in sorted(self.codes.items(), key=str)},
                "bad": len(self.bad), "bad_examples": self.bad[:20], "canaries": self.canaries,
                "known_bugs": {f"{b}: {o}": n for (b, o), n in sorted(self.known.items(), key=str)},
                "memory_delta_bytes": self.memory_delta, "log_lines": self.log_lines,
                "processes_replaced": sorted(set(self.pids_before) ^ set(self.pids_after))}


# -- sending ---------------------------------------------------------------------------------------

def canary_inputs() -> dict[str, np.ndarray]:
    return {"x": np.array([1.0, 2.0, 5.0], np.float32)}


CANARY_WANT = [2.5, 3.0, 4.5]  # hpt: 0.5 x + 2


class Doors:
    """One stock client per front door: a DEALER, an HTTP/1.1 keep-alive connection, a gRPC channel."""

    def __init__(self, endpoint: str, rest_port: int, grpc_port: int, reply_timeout: float = 10.0) -> None:
        self.ctx = zmq.Context()
        self.sock = self._dealer(endpoint)
        self.endpoint = endpoint
        self.rest_port = rest_port
        self.http = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=reply_timeout)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[
            ("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)])
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.rpcs = {k: self.channel.unary_unary(v, request_serializer=None, response_deserializer=None)
                     for k, v in GRPC_METHODS.items()}
        self.reply_timeout = reply_timeout

    def _dealer(self, endpoint: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
        self.http.close()
        self.channel.close()

    # -- native
    def zmq_batch(self, messages: list[Message], report: FuzzReport, window: int = 32) -> None:
        """Sends ``messages`` ``window`` at a time; each must get exactly one reply."""
        for start in range(0, len(messages), window):
            chunk = messages[start:start + window]
            for m in chunk:
                self.sock.send_multipart(m.payload)
            pending = {i: m for i, m in enumerate(chunk)}
            by_id: dict[Any, list[int]] = {}
            for i, m in enumerate(chunk):
                by_id.setdefault(_safe_id(m.payload), []).append(i)
            got = 0
            deadline = time.monotonic() + self.reply_timeout
            while got < len(chunk):
                if not self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                    for m in pending.values():
                        _record(report, m, "no reply", "")
                    self.sock.close(0)  # late replies must not be read as the next batch's
                    self.sock = self._dealer(self.endpoint)
                    break
                frames = self.sock.recv_multipart()
                got += 1
                if frames and frames[0] == b"":
                    frames = frames[1:]
                header = msgpack.unpackb(frames[1], strict_map_key=False) if len(frames) > 1 else {}
                m = pending.pop(_claimant(by_id, pending, _hashable(header.get("id"))))
                _record(report, m, header.get("code"), str(header.get("message", ""))[:200])

    def zmq_canary(self) -> None:
        header = {"type": "predict", "id": "canary", "model": "hpt", "timeout_ms": 5000}
        self.sock.send_multipart(protocol.pack(header, canary_inputs()))
        deadline = time.monotonic() + self.reply_timeout
        while True:
            assert self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), "native canary: no reply"
            frames = self.sock.recv_multipart()
            reply, payload = protocol.unpack_header(frames[1:] if frames[0] == b"" else frames)
            if reply.get("id") == "canary":
                break
        assert reply["code"] == 200, f"native canary answered {reply['code']}: {reply['message']}"
        out = protocol.decode_tensors(reply["outputs"], payload, "outputs")
        assert out["y"].tolist() == CANARY_WANT, out

    # -- REST
    def rest_one(self, m: Message, report: FuzzReport) -> None:
        method, path, body = m.payload
        try:
            self.http.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = self.http.getresponse()
            data = resp.read()
            status = resp.status
            if resp.getheader("Connection", "").lower() == "close":
                self.http.close()
        except (OSError, http.client.HTTPException) as exc:
            self.http.close()
            _record(report, m, "no reply", f"{type(exc).__name__}: {exc}")
            return
        _record(report, m, status, data[:200].decode("utf-8", "replace"))

    def rest_canary(self) -> None:
        self.http.request("POST", "/v1/models/hpt:predict", body=b'{"instances": [1.0, 2.0, 5.0]}')
        resp = self.http.getresponse()
        body = resp.read()
        assert resp.status == 200, f"REST canary answered {resp.status}: {body[:300]!r}"
        assert json.loads(body) == {"predictions": CANARY_WANT}, body

    # -- gRPC
    def grpc_batch(self, messages: list[Message], report: FuzzReport, window: int = 32) -> None:
        for start in range(0, len(messages), window):
            chunk = messages[start:start + window]
            futures = [(m, self.rpcs[m.payload[0]].future(m.payload[1], timeout=self.reply_timeout)) for m in chunk]
            for m, f in futures:
                try:
                    f.result()
                    code, text = grpc.StatusCode.OK, ""
                except grpc.RpcError as exc:
                    code, text = exc.code(), exc.details() or ""
                _record(report, m, code, text[:200])

    def grpc_canary(self) -> None:
        from sgserve.frontdoor import tensors

        req = predict_pb2.PredictRequest()
        req.model_spec.name = "hpt"
        req.inputs["x"].CopyFrom(tensors.from_numpy(canary_inputs()["x"]))
        raw = self.rpcs["Predict"](req.SerializeToString(), timeout=self.reply_timeout)
        resp = predict_pb2.PredictResponse.FromString(raw)
        assert tensors.to_numpy(resp.outputs["y"]).tolist() == CANARY_WANT, resp

    def canaries(self, report: FuzzReport) -> None:
        self.zmq_canary()
        self.rest_canary()
        self.grpc_canary()
        report.canaries += 3


def _claimant(by_id: dict[Any, list[int]], pending: dict[int, Message], rid: Any) -> int:
    """The pending message a reply with id ``rid`` answers: the first sent with that id; for a reply
    whose id no pending message carries (a header the broker read differently), one whose id could
    not be read, else one no known bug is pinned on, so that no message steals another's reply."""
    same = [j for j in by_id.get(rid, ()) if j in pending]
    if same:
        return same[0]
    untracked = [j for j in by_id.get(None, ()) if j in pending]
    return next(iter(untracked or [j for j, m in pending.items() if m.known is None] or pending))


def _hashable(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return "NaN"  # NaN != NaN: as a dict key it would match no reply
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def _safe_id(frames: list[bytes]) -> Any:
    """The id the broker will echo, when the header decodes (else None, as the broker answers)."""
    try:
        start = 1 if frames[0] == b"" else 0
        header = msgpack.unpackb(frames[start + 1], strict_map_key=False)
        return _hashable(header.get("id")) if isinstance(header, dict) else None
    except Exception:  # noqa: BLE001 - garbage: the broker answers it with id nil
        return None


def _ok(m: Message, code: Any) -> bool:
    if m.door == "zmq":
        return code in NATIVE_OK
    if m.door == "rest":
        return code in HTTP_OK
    return code in GRPC_OK


def _record(report: FuzzReport, m: Message, code: Any, message: str) -> None:
    label = code.name if isinstance(code, grpc.StatusCode) else code
    report.tried[m.door] += 1
    report.codes[(m.door, label)] += 1
    known = m.known
    if known is None and not _ok(m, code):
        known = next((bug for words, bug in KNOWN_BY_MESSAGE.items() if words in message), None)
    if known is not None:
        report.known[(known, label)] += 1
        return
    if not _ok(m, code):
        report.bad.append((m.door, m.kind, label, message, repr(m.payload)[:300]))


# -- the run ---------------------------------------------------------------------------------------

def server_processes(pgid: int) -> dict[int, str]:
    """pid -> name of every live process in the server's process group."""
    out = {}
    for p in psutil.process_iter(["pid", "name", "status"]):
        try:
            if _pgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out[p.pid] = p.info["name"]
        except (psutil.Error, OSError):
            continue
    return out


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class PipeDrain:
    """Reads a server's stdout and stderr pipes as it writes them, keeping the last lines.

    tests.conftest.ServerProcess pipes both and reads them at exit; under fuzz the gateway and the
    workers log a traceback per refused message, the 64 KiB pipe fills, and a process blocked in
    write() stops serving (seen: the gateway's event loop stuck in StreamHandler.emit)."""

    def __init__(self, proc: Any, keep: int = 400) -> None:
        import collections
        import threading

        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.count = 0
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: Any) -> None:
        try:
            for line in pipe:
                self.lines.append(line.rstrip("\n")[:500])
                self.count += 1
        except (OSError, ValueError):
            pass

    def tail(self, n: int = 60) -> str:
        return "\n".join(list(self.lines)[-n:])


def stacks(pgid: int) -> str:
    """py-spy dumps of the server's Python processes (broker, gateways), when py-spy is installed."""
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "py-spy")
    if not os.path.exists(spy):
        return "(py-spy not installed)"
    out = []
    for pid, name in server_processes(pgid).items():
        if "sgserve-w" in name or "zygote" in name:
            continue
        r = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
        out.append(f"--- {pid} {name}\n{r.stdout[-4000:]}{r.stderr[-500:]}")
    return "\n".join(out)


def rss(pids: dict[int, str]) -> dict[int, int]:
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return out


def messages(seed: int, count: int, mix: dict[str, float]) -> Iterator[Message]:
    """``count`` messages over the doors in proportions ``mix`` ({"zmq": .7, "rest": .15, "grpc": .15})."""
    rng = random.Random(seed)
    gens = {"zmq": NativeGen(rng), "rest": RestGen(rng), "grpc": GrpcGen(rng)}
    doors, weights = zip(*mix.items())
    for seq in range(count):
        yield gens[rng.choices(doors, weights)[0]].message(seq)


def run(doors: Doors, pgid: int, count: int, seed: int = 1, batch: int = 500,
        mix: dict[str, float] | None = None, warmup: int = 600,
        progress: Callable[[FuzzReport], None] | None = None) -> FuzzReport:
    """Sends ``count`` generated messages in batches of ``batch``, checking canaries between batches.

    The first ``warmup`` messages are sent before memory is first measured (first-use allocations:
    gRPC's and aiohttp's buffers, TensorFlow's per-shape caches), and are not counted.
    """
    mix = mix or {"zmq": 0.7, "rest": 0.15, "grpc": 0.15}
    report = FuzzReport()
    doors.canaries(report)
    if warmup:
        scratch = FuzzReport()
        _send(doors, list(messages(seed + 10_000, warmup, mix)), scratch)
    report.pids_before = server_processes(pgid)
    report.memory_before = rss(report.pids_before)
    t0 = time.monotonic()
    gen = messages(seed, count, mix)
    while True:
        chunk = [m for _, m in zip(range(batch), gen)]
        if not chunk:
            break
        _send(doors, chunk, report)
        try:
            doors.canaries(report)
        except (AssertionError, OSError, grpc.RpcError) as exc:
            raise AssertionError(f"the canary failed after {report.total} messages ({exc}); the last batch's "
                                 f"kinds: {[m.kind for m in chunk[-8:]]}; processes: {server_processes(pgid)}; "
                                 f"stacks:\n{stacks(pgid)}") from exc
        if progress:
            progress(report)
    report.seconds = time.monotonic() - t0
    report.pids_after = server_processes(pgid)
    report.memory_after = rss(report.pids_after)
    return report


def _send(doors: Doors, chunk: list[Message], report: FuzzReport) -> None:
    doors.zmq_batch([m for m in chunk if m.door == "zmq"], report)
    for m in chunk:
        if m.door == "rest":
            doors.rest_one(m, report)
    doors.grpc_batch([m for m in chunk if m.door == "grpc"], report)


__all__ = ["Doors", "FuzzReport", "Message", "run", "messages", "server_processes", "HUGE_EMPTY", "STRING_REPR",
           "GRPC_UNDECODABLE", "REST_BIG_VERSION", "MODELS"]
