"""Chaos under steady load: kill -9 and SIGSTOP of workers, kill -9 of the loader during a version
load, kill -9 of the broker and a restart (issue #11, item 5). The long form; tests/test_chaos.py
runs the same harness with a short plan.

    python bench/bench_chaos.py --rounds 10 --clients 4
    python bench/bench_chaos.py --rounds 2 --json        # one line of JSON, for bench/RESULTS.md

Load: ``--clients`` threads, each a DEALER sending one predict at a time to half_plus_two
(y = 0.5 x + 2, so every answer's values are checked) with ``timeout_ms`` = ``--deadline-ms``.
A request counts as *lost* when no answer came within its deadline + 1 s while the broker was up.

Each fault is timed from the signal to "pool full again" (status: every worker READY, the faulted
pid gone). Errors must be retryable (429/503/504) and no more than the faulted workers held
(``worker_pipeline`` = 2 each). After the broker's kill -9, clients must fail fast (within their
deadline + 1 s) and everything the server made must go: its processes at once (they die with the
broker), its segments and runtime directory at the next start.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sgserve import protocol  # noqa: E402
from tests.conftest import ServerProcess, group_alive, wait_until  # noqa: E402

RETRYABLE = {429, 503, 504}
PIPELINE = 2  # requests a worker holds without batching (architecture.md section 2)
SHM = "/dev/shm"


@dataclasses.dataclass
class Outcome:
    sent: float  # monotonic
    waited: float  # seconds until the answer (or until the client gave up)
    code: int | str  # status code, "lost" (no answer within deadline + 1 s), "wrong" (200, bad values)
    broker_up: bool


@dataclasses.dataclass
class Fault:
    kind: str  # "kill-worker", "stop-worker", "kill-loader", "kill-broker"
    at: float  # monotonic
    recovered_s: float | None = None  # to every worker READY (and the faulted pid gone)
    detail: str = ""


class Load:
    """``clients`` closed-loop DEALER clients with deadlines, checking every answer's values."""

    def __init__(self, endpoint: str, clients: int, deadline_ms: int) -> None:
        self.endpoint = endpoint
        self.deadline_ms = deadline_ms
        self.outcomes: list[Outcome] = []
        self.broker_up = True
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self._ctx.term()

    def retarget(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def _socket(self) -> tuple[zmq.Socket, str]:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock, self.endpoint

    def _client(self, index: int) -> None:
        rng = np.random.default_rng(index)
        sock, endpoint = self._socket()
        seq = 0
        while not self._stop.is_set():
            if endpoint != self.endpoint:
                sock.close(0)
                sock, endpoint = self._socket()
            seq += 1
            x = rng.uniform(-1000, 1000, rng.integers(1, 8)).astype(np.float32)
            up = self.broker_up
            t0 = time.monotonic()
            sock.send_multipart(protocol.pack({"type": "predict", "id": seq, "model": "hpt",
                                               "timeout_ms": self.deadline_ms}, {"x": x}))
            code = self._answer(sock, seq, x, t0 + self.deadline_ms / 1000 + 1.0)
            if code == "lost":  # a late answer must not be read as the next request's
                sock.close(0)
                sock, endpoint = self._socket()
            with self._lock:
                self.outcomes.append(Outcome(t0, time.monotonic() - t0, code, up and self.broker_up))
            if code != 200:
                time.sleep(0.01)  # a retrying client backs off

    def _answer(self, sock: zmq.Socket, seq: int, x: np.ndarray, give_up: float) -> int | str:
        while True:
            left = give_up - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                return "lost"
            frames = sock.recv_multipart()
            header = msgpack.unpackb(frames[1])
            if header.get("id") != seq:
                continue
            if header["code"] != 200:
                return header["code"]
            y = protocol.decode_tensors(header["outputs"], frames[2:], "outputs")["y"]
            return 200 if np.array_equal(y, x * np.float32(0.5) + np.float32(2)) else "wrong"


class Chaos:
    """One server under Load, and the faults; see the module docstring."""

    def __init__(self, base_path: str, workdir: str, clients: int = 4, deadline_ms: int = 1000,
                 stop_seconds: float = 6.0, log: Callable[[str], None] = lambda m: None) -> None:
        self.base_path = base_path
        self.workdir = workdir
        self.clients = clients
        self.deadline_ms = deadline_ms
        self.stop_seconds = stop_seconds
        self.log = log
        self.faults: list[Fault] = []
        self.leftovers: list[str] = []
        self.server: ServerProcess | None = None
        self.load: Load | None = None
        self.rng = random.Random(5)

    # -- the server
    def start(self) -> None:
        self.server = ServerProcess(["--model-base-path", self.base_path, "--model-name", "hpt", "--workers", "2",
                                     "--cpus-per-worker", "1", "--split-min-rows", "0",
                                     "--file-system-poll-wait-seconds", "0.2", "--load-retry-interval", "0.5",
                                     "--model-version-policy", "latest"],
                                    cache_dir=os.path.join(self.workdir, "cache"))
        self.server.wait_ready(240)
        if self.load is None:
            self.load = Load(self.server.endpoint, self.clients, self.deadline_ms).start()
        else:
            self.load.retarget(self.server.endpoint)
            self.load.broker_up = True

    def stop(self) -> None:
        if self.load is not None:
            self.load.stop()
        if self.server is not None:
            self.server.stop()

    def status(self) -> dict[str, Any]:
        with self.server.client(2.0) as c:
            return c.status()

    def _pool_full(self, gone: int | None) -> bool:
        workers = self.status()["workers"]
        return all(w["state"] == "READY" and w["pid"] != gone for w in workers)

    def _recover(self, fault: Fault, gone: int | None, limit: float = 40.0) -> None:
        try:
            wait_until(lambda: self._pool_full(gone), limit, "the pool to be full again", interval=0.05)
            fault.recovered_s = time.monotonic() - fault.at
        except AssertionError:
            fault.recovered_s = None
        self.faults.append(fault)
        self.log(f"{fault.kind} {fault.detail}: pool full after {fault.recovered_s} s")

    # -- faults
    def kill_worker(self) -> None:
        w = self.rng.choice(self.status()["workers"])
        fault = Fault("kill-worker", time.monotonic(), detail=f"worker {w['index']} pid {w['pid']}")
        os.kill(w["pid"], signal.SIGKILL)
        self._recover(fault, w["pid"])

    def stop_worker(self) -> None:
        """SIGSTOP one worker; SIGCONT it after stop_seconds (unless it was replaced first)."""
        w = self.rng.choice(self.status()["workers"])
        fault = Fault("stop-worker", time.monotonic(), detail=f"worker {w['index']} pid {w['pid']}")
        os.kill(w["pid"], signal.SIGSTOP)
        timer = threading.Timer(self.stop_seconds, _cont, args=(w["pid"],))
        timer.start()
        try:
            self._recover(fault, w["pid"], limit=self.stop_seconds + 30)
        finally:
            timer.cancel()
            _cont(w["pid"])

    def kill_loader_during_load(self) -> None:
        """Publishes a new version into the base path and kill -9s the loader while it loads it."""
        versions = [int(v) for v in os.listdir(self.base_path) if v.isdigit()]
        new = max(versions) + 1
        tmp = os.path.join(self.base_path, f".tmp{new}")
        shutil.copytree(os.path.join(self.base_path, str(max(versions))), tmp)
        os.rename(tmp, os.path.join(self.base_path, str(new)))
        loader = wait_until(lambda: self._loading(), 30, "the loader to be loading", interval=0.005)
        fault = Fault("kill-loader", time.monotonic(), detail=f"version {new}, loader pid {loader}")
        os.kill(loader, signal.SIGKILL)
        try:  # recovered: the version the killed loader was writing is served (by a new loader)
            wait_until(lambda: self._serving(new) and self._pool_full(None), 60, f"version {new} to be served")
            fault.recovered_s = time.monotonic() - fault.at
        except AssertionError:
            pass
        self.faults.append(fault)
        self.log(f"kill-loader {fault.detail}: version served, pool full after {fault.recovered_s} s")

    def _loading(self) -> int | None:
        loader = self.status()["loader"]
        return loader["pid"] if loader["state"] == "loading" and loader["pid"] else None

    def _serving(self, version: int) -> bool:
        return any(m["version"] == version and m["state"] == "AVAILABLE" for m in self.status()["models"])

    def kill_broker_and_restart(self) -> dict[str, Any]:
        """kill -9 of the broker: clients must fail fast, the server's processes go with it, and the
        next start removes its segments and runtime directory."""
        old = self.server
        self.load.broker_up = False
        t0 = time.monotonic()
        os.kill(old.proc.pid, signal.SIGKILL)
        old.proc.wait(10)
        left_procs = group_alive(old.proc.pid, wait=5.0)
        gone_s = time.monotonic() - t0
        client_fail_s = _client_failure_time(old.endpoint, self.deadline_ms / 1000)
        time.sleep(self.deadline_ms / 1000 + 1.5)  # let every client see its request fail
        mine = f"sgserve_{old.proc.pid}_"
        before = {"segments": sorted(n for n in os.listdir(SHM) if n.startswith(mine)),
                  "runtime_dirs": sorted(glob.glob(os.path.join(tempfile.gettempdir(), mine + "*")))}
        self.start()
        after = {"segments": sorted(n for n in os.listdir(SHM) if n.startswith(mine)),
                 "runtime_dirs": sorted(glob.glob(os.path.join(tempfile.gettempdir(), mine + "*"))),
                 "processes": group_alive(old.proc.pid, wait=0)}
        report = {"processes_left_after_kill": left_procs, "processes_gone_s": round(gone_s, 2),
                  "client_fail_s": client_fail_s,
                  "left_at_kill": before, "left_after_restart": after,
                  "restart_s": round(time.monotonic() - t0, 1)}
        self.faults.append(Fault("kill-broker", t0, time.monotonic() - t0, json.dumps(report)))
        self.log(f"kill-broker: {report}")
        old.kill()
        return report

    # -- the verdict
    def report(self) -> dict[str, Any]:
        outs = list(self.load.outcomes)
        up = [o for o in outs if o.broker_up]
        down = [o for o in outs if not o.broker_up]
        limit = self.deadline_ms / 1000 + 1.0
        errors = Counter(str(o.code) for o in up if o.code != 200)
        worker_faults = sum(1 for f in self.faults if f.kind in ("kill-worker", "stop-worker"))
        return {
            "requests": len(outs), "ok": sum(1 for o in outs if o.code == 200),
            "qps": round(len(outs) / max(1e-9, outs[-1].sent - outs[0].sent), 1) if len(outs) > 1 else 0,
            "clients": self.clients, "deadline_ms": self.deadline_ms,
            "faults": Counter(f.kind for f in self.faults),
            "lost": sum(1 for o in up if o.code == "lost"),
            "wrong": sum(1 for o in outs if o.code == "wrong"),
            "late": sum(1 for o in up if o.waited > limit),
            "max_wait_s": round(max((o.waited for o in up), default=0), 3),
            "errors": dict(errors), "non_retryable": sum(n for c, n in errors.items() if c not in
                                                         {str(r) for r in RETRYABLE} | {"lost", "wrong"}),
            "error_budget": PIPELINE * worker_faults,
            "broker_down": {"requests": len(down), "max_wait_s": round(max((o.waited for o in down), default=0), 3),
                            "answered": dict(Counter(str(o.code) for o in down))},
            "recovery_s": {kind: [None if f.recovered_s is None else round(f.recovered_s, 2)
                                  for f in self.faults if f.kind == kind]
                           for kind in sorted({f.kind for f in self.faults})},
        }


def _client_failure_time(endpoint: str, timeout: float) -> float | None:
    """Seconds until sgserve.Client's predict fails against a dead broker (None: it did not fail)."""
    from sgserve.client import Client
    from sgserve.errors import ServeError

    t0 = time.monotonic()
    try:
        with Client(endpoint, timeout=timeout) as c:
            c.predict("hpt", {"x": np.ones(1, np.float32)})
    except ServeError:
        return round(time.monotonic() - t0, 3)
    return None


def _cont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def hpt_base_path(workdir: str) -> str:
    """half_plus_two, version 1, in a fresh base path (tests/model_builders.py)."""
    from tests.model_builders import build_half_plus_two

    base = os.path.join(workdir, "hpt")
    build_half_plus_two(base)
    return base


def run_plan(chaos: Chaos, rounds: int, gap: float = 1.0, broker: bool = True) -> dict[str, Any]:
    """``rounds`` x (kill -9 a worker, SIGSTOP a worker, kill -9 the loader mid-load), then one broker
    kill and restart; ``gap`` seconds of plain load between faults."""
    chaos.start()
    wait_until(lambda: len(chaos.load.outcomes) > 20, 30, "the load to run")
    for _ in range(rounds):
        for fault in (chaos.kill_worker, chaos.stop_worker, chaos.kill_loader_during_load):
            fault()
            time.sleep(gap)
    broker_report = chaos.kill_broker_and_restart() if broker else None
    if broker:
        n = len(chaos.load.outcomes)
        wait_until(lambda: len(chaos.load.outcomes) > n + 20, 30, "the load to run on the restarted server")
    report = chaos.report()
    report["broker_kill"] = broker_report
    return report


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="rounds of (worker kill, worker stop, loader kill)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--deadline-ms", type=int, default=1000)
    ap.add_argument("--stop-seconds", type=float, default=6.0, help="how long a worker stays SIGSTOPped")
    ap.add_argument("--gap", type=float, default=3.0, help="seconds of plain load between faults")
    ap.add_argument("--json", action="store_true", help="print one line of JSON only")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="sgserve-chaos-")
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    chaos = Chaos(hpt_base_path(workdir), workdir, args.clients, args.deadline_ms, args.stop_seconds, log)
    try:
        report = run_plan(chaos, args.rounds, args.gap)
    finally:
        chaos.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report["command"] = "python " + " ".join(sys.argv)
    print(json.dumps(report, default=str) if args.json else json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
