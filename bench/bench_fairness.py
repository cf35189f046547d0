#!/usr/bin/env python
"""Fair admission: a polite client's latency with and without a flooding neighbour, in one run.

sgserve (real CLI) serves the "slow" model of tests/test_backpressure.py (a chain of 16 256x256
matmuls over n rows: about 37 us x n of one core, with a 1-element input and output, so the flood
costs the broker messages, not bytes) with 2 workers x 1 core; each request asks for --work n
(default 300: about 11 ms). Phases, each on fresh
DEALER sockets, open loop (a request is sent at its scheduled time whatever came back; latency is
counted from that time, so a stalled sender cannot hide waiting):
  capacity  8 requests in flight, closed loop, for --seconds: requests/s the server completes
  alone     the polite client alone at 10% of capacity
  flooded   the same polite client, plus one flooding client (one identity) at 10x capacity
The claim (issue 11): in "flooded" the polite client's p99 stays within 2x of its p99 "alone", and
none of its requests is refused. Run once per --worker-pipeline value given (default: 2, the
server's default, and 1).

    python bench/bench_fairness.py [--seconds 15] [--work 300] [--pipelines 2,1] [--name bench_fairness]
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from sgserve import protocol  # noqa: E402

MODEL_DIR = os.path.join(C.CACHE_DIR, "models", "fairness_slow")


def build_slow(base: str) -> None:
    """The slow model (as tests/test_backpressure.build_slow), built in a child: no TensorFlow here."""
    import tensorflow as tf  # noqa: PLC0415

    class Slow(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(np.random.default_rng(5).normal(0, 0.05, (256, 256)).astype("float32"))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x"),
                                      tf.TensorSpec([None], tf.int32, name="n")])
        def serve(self, x, n):
            rows = tf.reduce_max(tf.concat([n, [0]], 0))
            m = tf.ones(tf.stack([rows, 256]))
            for _ in range(16):
                m = tf.tanh(tf.matmul(m, self.w))
            return {"y": x * 2.0 + 0.0 * tf.reduce_sum(m)}

    m = Slow()
    tf.saved_model.save(m, os.path.join(base, "1"), signatures={"serving_default": m.serve})


def ensure_model() -> str:
    if not os.path.isfile(os.path.join(MODEL_DIR, "1", "saved_model.pb")):
        C.log(f"building the slow model into {MODEL_DIR}")
        subprocess.run([sys.executable, os.path.abspath(__file__), "_build", MODEL_DIR], check=True)
    return MODEL_DIR


class OpenLoop(threading.Thread):
    """One DEALER sending at ``rate`` requests/s from its own thread; records (scheduled send,
    latency, code) per request."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str, rate: float, seconds: float, frames: list[Any], name: str,
                 in_flight: int | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self.endpoint, self.rate, self.seconds, self.frames = endpoint, rate, seconds, frames
        self.in_flight = in_flight  # closed loop: keep this many out instead of a rate
        self.records: list[tuple[float, float, int]] = []
        self.sent = 0

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # open loop: never block the sender (the broker's HWM pushes back)
        sock.connect(self.endpoint)
        header = protocol.decode_header(self.frames[1])
        pending: dict[int, float] = {}
        start = time.monotonic()
        end = start + self.seconds
        interval = 1.0 / self.rate if self.rate else 0.0
        next_at = start
        try:
            while True:
                now = time.monotonic()
                sending = now < end
                if sending and (self.in_flight is None and now >= next_at
                                or self.in_flight is not None and len(pending) < self.in_flight):
                    rid = next(self._ids)
                    header["id"] = rid
                    sock.send_multipart([self.frames[0], protocol.pack(header)[1], *self.frames[2:]], copy=False)
                    pending[rid] = next_at if self.in_flight is None else now
                    next_at += interval
                    self.sent += 1
                    continue
                if not sending and (not pending or now > end + 30):
                    return
                wait = max(0.0, min(next_at - now, 0.05)) if sending and self.in_flight is None else 0.05
                if sock.poll(int(wait * 1000) if wait > 0.0005 else 0):
                    while True:
                        try:
                            reply = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        h = protocol.decode_header(reply[1])
                        sent_at = pending.pop(h["id"], None)
                        if sent_at is not None:
                            self.records.append((sent_at - start, time.monotonic() - sent_at, h["code"]))
        finally:
            sock.close(0)


def flood_process(endpoint: str, rate: float, seconds: float, frames: list[bytes], out: Any) -> None:
    sender = OpenLoop(endpoint, rate, seconds, frames, "flooder")
    sender.run()
    out.put(sender.records)


def request_frames(work: int) -> list[Any]:
    inputs = {"x": np.array([1.0], np.float32), "n": np.array([work], np.int32)}
    return [bytes(f) for f in protocol.pack({"type": "predict", "model": "slow", "id": 0, "timeout_ms": 30000.0},
                                            inputs)]


def summary(records: list[tuple[float, float, int]]) -> dict[str, Any]:
    ok = [lat * 1000 for _, lat, code in records if code == 200]
    codes: dict[int, int] = {}
    for _, _, code in records:
        codes[code] = codes.get(code, 0) + 1
    out: dict[str, Any] = {"answered": len(records), "codes": codes}
    if ok:
        out.update(p50_ms=round(C.pct(ok, 50), 2), p99_ms=round(C.pct(ok, 99), 2), max_ms=round(max(ok), 2))
    return out


def watch(threads: list[OpenLoop], label: str) -> None:
    """Progress: every 2 s, what each sender has sent and had answered."""
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(2.0 / len(threads))
        C.log(f"  {label}: " + ", ".join(f"{t.name} sent {t.sent} answered {len(t.records)}" for t in threads))


def run_pipeline(base: str, pipeline: int, args: argparse.Namespace) -> dict[str, Any]:
    frames = request_frames(args.work)
    server_args = ["--model-base-path", base, "--model-name", "slow", "--workers", "2", "--cpus-per-worker", "1",
                   "--split-min-rows", "0", "--worker-pipeline", str(pipeline)]
    with C.server(server_args, label=f"fairness-p{pipeline}") as srv:
        C.log(f"pipeline {pipeline}: measuring capacity ({args.seconds:g} s, 8 in flight)")
        cap = OpenLoop(srv.endpoint, 0, args.seconds, frames, "capacity", in_flight=8)
        cap.start()
        watch([cap], "capacity")
        capacity = sum(1 for _, _, c in cap.records if c == 200) / args.seconds
        C.log(f"pipeline {pipeline}: capacity {capacity:.1f} requests/s")
        if capacity < 1:
            raise RuntimeError(f"the server completed no requests (codes {summary(cap.records)['codes']})")
        polite_rate, flood_rate = 0.1 * capacity, 10 * capacity
        alone = OpenLoop(srv.endpoint, polite_rate, args.seconds, frames, "polite")
        alone.start()
        watch([alone], "alone")
        polite = OpenLoop(srv.endpoint, polite_rate, args.seconds, frames, "polite")
        # The flooder runs in its own process: in this one, its loop would hold the GIL and delay the
        # polite client's sends, which the open loop would (rightly) count as the polite's latency.
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        flood = ctx.Process(target=flood_process, args=(srv.endpoint, flood_rate, args.seconds + 1.0, frames, out))
        flood.start()
        time.sleep(1.0)  # the flood fills the queue first
        polite.start()
        watch([polite], "flooded")
        flood_records = out.get(timeout=120)
        flood.join(30)
        result = {"pipeline": pipeline, "capacity_rps": round(capacity, 1), "polite_rps": round(polite_rate, 2),
                  "flood_rps": round(flood_rate, 1), "alone": summary(alone.records),
                  "flooded": summary(polite.records), "flooder": summary(flood_records),
                  "series": {"alone": [(round(t, 3), round(lat * 1000, 2)) for t, lat, c in alone.records],
                             "flooded": [(round(t, 3), round(lat * 1000, 2)) for t, lat, c in polite.records]}}
    a, f = result["alone"].get("p99_ms"), result["flooded"].get("p99_ms")
    result["p99_ratio"] = round(f / a, 2) if a and f else None
    result["polite_refused"] = sum(n for code, n in result["flooded"]["codes"].items() if code != 200)
    C.log(f"pipeline {pipeline}: polite p99 alone {a} ms, flooded {f} ms (x{result['p99_ratio']}), "
          f"polite refused {result['polite_refused']}, flooder codes {result['flooder']['codes']}")
    return result


def plot(results: list[dict[str, Any]], name: str, machine: dict) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        for label, color in (("alone", "tab:blue"), ("flooded", "tab:red")):
            pts = r["series"][label]
            ax.plot([t for t, _ in pts], [lat for _, lat in pts], ".", color=color, ms=3,
                    label=f"{label}: p99 {r[label].get('p99_ms')} ms")
        ax.set_title(f"worker pipeline {r['pipeline']}: capacity {r['capacity_rps']}/s, flood {r['flood_rps']}/s, "
                     f"p99 x{r['p99_ratio']}", fontsize=8)
        ax.set_xlabel("scheduled send time (s)")
        ax.set_ylabel("polite client's latency (ms)")
        ax.legend(fontsize=8)
    C.save_figure(fig, name, "bench_fairness", machine)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--work", type=int, default=300)
    p.add_argument("--pipelines", default="2,1")
    p.add_argument("--name", default="bench_fairness")
    args = p.parse_args()
    C.sigterm_as_exit()
    machine = C.machine_info()
    base = ensure_model()
    results = [run_pipeline(base, int(n), args) for n in args.pipelines.split(",")]
    rows = [[r["pipeline"], r["capacity_rps"], r["polite_rps"], r["flood_rps"], r["alone"].get("p99_ms"),
             r["flooded"].get("p99_ms"), r["p99_ratio"], r["polite_refused"], r["flooder"]["codes"]] for r in results]
    print(C.table(["pipeline", "capacity/s", "polite/s", "flood/s", "alone p99 ms", "flooded p99 ms", "ratio",
                   "polite refused", "flooder codes"], rows))
    C.write_json(args.name, {"benchmark": "bench_fairness", "machine": machine, "model": "slow",
                             "work": args.work, "seconds": args.seconds, "results": results})
    plot(results, args.name, machine)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_build"]:
        build_slow(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
