#!/usr/bin/env python
"""Hang detection: how long a stopped worker takes to be replaced, and how many healthy workers are
killed under CPU hogs (must be 0).

A demo-model server (`sgserve start --workers 2 --cpus-per-worker 1`, through the real CLI) per phase:
  idle      no load; SIGSTOP one worker, time until the broker kills it ("killed") and until its
            replacement at the same index is READY ("replaced")
  holding   steady closed-loop load (--clients threads, one sgserve.Client each); SIGSTOP a worker
            while it holds a request (status shows inflight >= 1); same times, plus every request's
            answer (a request the stopped worker held must be retried elsewhere: lost = non-200)
  hogs      --hogs busy-loop processes on top of the load: --steady-s seconds in which no worker may
            be killed (healthy kills), then the holding trial under the hogs
  broker-stop  steady load; the server's whole process group (broker, workers, loader) SIGSTOPped
            for --broker-stop-s seconds (longer than the silence limit; a paused VM or a frozen
            cgroup), then continued: no worker may be killed for the time the broker did not run
            (healthy kills), and no request lost
Trials alternate between worker 0 and 1, a fresh server per phase (the supervisor backs off a worker
index that dies repeatedly, which would inflate "replaced"). Times are from the SIGSTOP, read by
polling `status` every 50 ms. The JSON (bench/results/NAME.json) has every trial, the load's answers
and the broker's watchdog counters (its own loop's gaps, probes, hangs).

    python bench/bench_hang.py [--repeats 4] [--hogs 6] [--steady-s 30] [--clients 2] [--broker-stop-s 5]
                               [--phases idle,holding,hogs,broker-stop] [--server-args "..."]
                               [--name bench_hang]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

SERVER_ARGS = ["--workers", "2", "--cpus-per-worker", "1"]
POLL = 0.05


class Load:
    """Closed-loop clients, each its own sgserve.Client; every answer is recorded."""

    def __init__(self, endpoint: str, clients: int) -> None:
        self.endpoint = endpoint
        self.clients = clients
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[float, float, int]] = []  # (monotonic start, latency s, code)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        from sgserve.client import Client  # noqa: PLC0415
        from sgserve.errors import ServeError  # noqa: PLC0415

        rng = np.random.default_rng(i)
        inputs = {"user_id": rng.integers(0, 10**6, 4).astype(np.int64),
                  "item_id": rng.integers(0, 10**6, 4).astype(np.int64)}
        with Client(self.endpoint, timeout=60.0) as client:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    client.predict("demo", inputs, timeout=60.0)
                    code = 200
                except ServeError as exc:
                    code = getattr(exc, "code", 500)
                except Exception:  # noqa: BLE001 - a timeout or a broken socket is a lost request too
                    code = -1
                with self.lock:
                    self.answers.append((t0, time.monotonic() - t0, code))

    def window(self, since: float) -> dict[str, Any]:
        with self.lock:
            rows = [a for a in self.answers if a[0] >= since]
        lat = [r[1] * 1000.0 for r in rows]
        return {"requests": len(rows), "lost": sum(1 for r in rows if r[2] != 200),
                "codes": sorted({r[2] for r in rows}), "p50_ms": round(C.pct(lat, 50), 2) if lat else None,
                "max_ms": round(max(lat), 1) if lat else None}

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)


@contextlib.contextmanager
def hogs(n: int) -> Iterator[list[subprocess.Popen]]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def workers(server: C.Server) -> list[dict[str, Any]]:
    return server.status()["workers"]


def stop_worker(server: C.Server, index: int, want_held: bool) -> dict[str, Any]:
    """SIGSTOPs worker ``index`` and times its replacement."""
    deadline = time.monotonic() + 10.0
    while True:
        w = workers(server)[index]
        if not want_held or w["inflight"] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    pid, restarts, held = w["pid"], w["restarts"], w["inflight"]
    others = {x["index"]: x["restarts"] for x in workers(server) if x["index"] != index}
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    killed = replaced = None
    try:
        while time.monotonic() - t0 < 90.0:
            w = workers(server)[index]
            now = time.monotonic() - t0
            if killed is None and (w["pid"] != pid or w["state"] != "READY"):
                killed = now
            if w["pid"] != pid and w["state"] == "READY":
                replaced = now
                break
            time.sleep(POLL)
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)  # if it was not killed, let it go on (never the case when it works)
    after = {x["index"]: x["restarts"] for x in workers(server) if x["index"] != index}
    return {"index": index, "held_at_stop": held,
            "killed_s": None if killed is None else round(killed, 3),
            "replaced_s": None if replaced is None else round(replaced, 3),
            "restarts": w["restarts"] - restarts,
            "healthy_killed": sum(after[i] - others[i] for i in others)}


def trials(server: C.Server, repeats: int, held: bool, label: str) -> list[dict[str, Any]]:
    out = []
    for r in range(repeats):
        trial = stop_worker(server, r % 2, held)
        C.log(f"{label} trial {r}: worker {trial['index']} killed after {trial['killed_s']} s, replaced after "
              f"{trial['replaced_s']} s; healthy workers killed {trial['healthy_killed']}")
        out.append(trial)
        time.sleep(1.0)  # let the load settle on the full pool before the next stop
    return out


def broker_stops(server: C.Server, repeats: int, seconds: float) -> list[dict[str, Any]]:
    """SIGSTOPs the server's process group for ``seconds``; a worker killed for that time is a
    healthy kill."""
    out = []
    for r in range(repeats):
        before = [w["restarts"] for w in workers(server)]
        os.killpg(server.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)  # the fault: nothing of the server is scheduled for this long
        finally:
            os.killpg(server.pid, signal.SIGCONT)
        time.sleep(2.0)  # time for a wrong verdict to show
        after = [w["restarts"] for w in workers(server)]
        trial = {"stopped_s": seconds, "healthy_killed": sum(after) - sum(before)}
        C.log(f"broker-stop trial {r}: server stopped {seconds:g} s; healthy workers killed {trial['healthy_killed']}")
        out.append(trial)
    return out


def phase(name: str, args: argparse.Namespace, server_args: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {"phase": name}
    with C.server(server_args, label=f"hang-{name}") as server:
        if name == "idle":
            result["trials"] = trials(server, args.repeats, False, name)
        elif name == "broker-stop":
            with Load(server.endpoint, args.clients) as load:
                time.sleep(2.0)
                t0 = time.monotonic()
                result["trials"] = broker_stops(server, args.repeats, args.broker_stop_s)
                result["load"] = load.window(t0)
                C.log(f"{name} load during the trials: {result['load']}")
        else:
            with Load(server.endpoint, args.clients) as load, hogs(args.hogs if name == "hogs" else 0):
                time.sleep(2.0)
                if name == "hogs":
                    t0 = time.monotonic()
                    before = [w["restarts"] for w in workers(server)]
                    time.sleep(args.steady_s)
                    result["steady"] = {"seconds": args.steady_s, "hogs": args.hogs, **load.window(t0),
                                        "healthy_killed": sum(w["restarts"] for w in workers(server)) - sum(before)}
                    C.log(f"hogs steady: {result['steady']}")
                t0 = time.monotonic()
                result["trials"] = trials(server, args.repeats, True, name)
                result["load"] = load.window(t0)
                C.log(f"{name} load during the trials: {result['load']}")
        result["watchdog"] = server.status().get("watchdog")
    return result


def summary(phases: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for p in phases:
        killed = [t["killed_s"] for t in p["trials"] if t.get("killed_s") is not None]
        replaced = [t["replaced_s"] for t in p["trials"] if t.get("replaced_s") is not None]
        out[p["phase"]] = {
            "killed_s_median": round(C.median(killed), 2) if killed else None,
            "killed_s_max": max(killed) if killed else None,
            "replaced_s_median": round(C.median(replaced), 2) if replaced else None,
            "replaced_s_max": max(replaced) if replaced else None,
            "not_replaced": sum(1 for t in p["trials"] if "replaced_s" in t and t["replaced_s"] is None),
            "healthy_killed": (sum(t["healthy_killed"] for t in p["trials"])
                               + (p.get("steady") or {}).get("healthy_killed", 0)),
            "lost": (p.get("load") or {}).get("lost", 0) + (p.get("steady") or {}).get("lost", 0),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=4, help="SIGSTOP trials per phase (default 4)")
    ap.add_argument("--hogs", type=int, default=6, help="busy-loop processes in the hogs phase (default 6)")
    ap.add_argument("--steady-s", type=float, default=30.0, help="seconds of load under hogs with no fault")
    ap.add_argument("--clients", type=int, default=2, help="closed-loop client threads (default 2)")
    ap.add_argument("--broker-stop-s", type=float, default=5.0, help="seconds the broker is stopped (default 5)")
    ap.add_argument("--phases", default="idle,holding,hogs,broker-stop")
    ap.add_argument("--server-args", default="", help="extra `sgserve start` arguments")
    ap.add_argument("--name", default="bench_hang")
    args = ap.parse_args()
    C.sigterm_as_exit()
    server_args = SERVER_ARGS + shlex.split(args.server_args)
    phases = [phase(name, args, server_args) for name in args.phases.split(",")]
    result = {"benchmark": "bench_hang", "command": " ".join(["python", "bench/bench_hang.py", *sys.argv[1:]]),
              "machine": C.machine_info(), "server_args": server_args, "summary": summary(phases),
              "phases": phases}
    C.log(f"summary: {result['summary']}")
    C.write_json(args.name, result)
    bad = any(s["healthy_killed"] or s["lost"] or s["not_replaced"] for s in result["summary"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
