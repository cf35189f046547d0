#!/usr/bin/env python
"""Per-request overhead of sgserve on a tiny model (y = 0.5 x + 2), against baselines in the same run.

Four ways to compute y for one row (batch 1), interleaved in rounds (the order rotates each round),
one call at a time from this process:

  sgserve  Client.predict_full through the real server: client -> broker -> worker -> back
           (`sgserve start --workers 1 --cpus-per-worker 1`)
  echo     a bare ZeroMQ echo over the same hops (bench/_echo.py): client DEALER -> Python
           ROUTER/ROUTER broker process -> echo worker process (pinned like sgserve's worker 0)
           -> back; same frames, no TensorFlow, no msgpack decoding
  direct   tf.saved_model.load(...).signatures["serving_default"] called in this process
  worker   the sgserve worker's own TF call alone: ModelRuntime over the server's segment, called
           in this process (what the worker runs per request, without any messaging)
  pinned   the same call in a process set up like an sgserve worker: pinned to core 0, 1 intra-op and
           1 inter-op TF thread (worker runs unpinned, with TF's default pools)
  codec    sgserve's message encoding/decoding for one request on all three hops (client, broker,
           worker), in this process, no sockets, no TF: a part of what sgserve adds to the echo
  ping     Client.ping() to the same sgserve server: client -> broker -> client, no worker hop

Target (from the issue): sgserve p50 within 2x of the bare echo's p50.

    python bench/bench_overhead.py [--rounds 5] [--calls 2000]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import _models  # noqa: E402

MODEL = "half_plus_two"
METHODS = ("sgserve", "echo", "direct", "worker", "pinned", "codec", "ping")
SHORT = {"sgserve": "S", "echo": "E", "direct": "D", "worker": "W", "pinned": "P", "codec": "C", "ping": "G"}


def wait_echo(endpoint: str, timeout: float = 30.0) -> None:
    import zmq  # noqa: PLC0415

    ctx = zmq.Context.instance()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        s.send_multipart([b"SGS1", b"\x80", b"ping"])
        ok = s.poll(500)
        s.close(0)
        if ok:
            return
    raise RuntimeError(f"echo broker at {endpoint} did not answer in {timeout:.0f} s")


def make_callers(sg_endpoint: str, echo_endpoint: str, base: str, segment: str) -> tuple[dict[str, Callable[[], Any]], list]:
    import msgpack  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415
    import zmq  # noqa: PLC0415

    from sgserve.client import Client  # noqa: PLC0415
    from sgserve.worker.runtime import ModelRuntime  # noqa: PLC0415

    x = np.array([3.0], dtype=np.float32)
    want = 3.5
    closers: list[Callable[[], None]] = []

    client = Client(sg_endpoint, timeout=10.0)
    closers.append(client.close)

    def sgserve_call():
        return client.predict_full(MODEL, {"x": x}).outputs["y"]

    def ping_call():
        return client.ping()

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(echo_endpoint)
    closers.append(lambda: (sock.close(0), ctx.term()))
    # The frames sgserve's client would send for this request, packed once: the echo is bare transport.
    echo_frames = [b"SGS1", msgpack.packb({"type": "predict", "model": MODEL, "id": [1, 1],
                                           "inputs": [{"name": "x", "dtype": "float32", "shape": [1]}]}),
                   x.tobytes()]

    def echo_call():
        sock.send_multipart(echo_frames, copy=False)
        if not sock.poll(10000):
            raise RuntimeError("echo: no reply in 10 s")
        return sock.recv_multipart(copy=False)

    loaded = tf.saved_model.load(os.path.join(base, "1"))
    fn = loaded.signatures["serving_default"]

    def direct_call():
        return fn(x=tf.constant(x))["y"].numpy()

    rt = ModelRuntime(segment)
    runner = rt.signatures["serving_default"]

    def worker_call():
        return runner.run({"x": x})["y"]

    codec_call = make_codec_call(x)
    callers = {"sgserve": sgserve_call, "echo": echo_call, "direct": direct_call, "worker": worker_call,
               "codec": codec_call, "ping": ping_call}
    for name in ("sgserve", "direct", "worker"):
        got = float(callers[name]()[0])
        if abs(got - want) > 1e-6:
            raise RuntimeError(f"{name}: y(3.0) = {got}, expected {want}")
    keep = [loaded, rt]
    return callers, closers + [lambda: keep.clear()]


def pinned_child(segment: str) -> int:
    """The worker's TF call in a process set up like an sgserve worker (pinned to core 0, 1 intra-op
    and 1 inter-op thread), timed on request: reads "N WARMUP" lines, answers a JSON list of us."""
    import json  # noqa: PLC0415

    from sgserve.worker import pinning  # noqa: PLC0415

    pinning.pin([0])
    os.environ.update(pinning.thread_env(1, 1))
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from sgserve.worker.runtime import ModelRuntime  # noqa: PLC0415

    rt = ModelRuntime(segment)
    rt.warmup()
    runner = rt.signatures["serving_default"]
    x = np.array([3.0], dtype=np.float32)
    print("ready", flush=True)
    for line in sys.stdin:
        n, warm = (int(v) for v in line.split())
        lat = time_calls(lambda: runner.run({"x": x}), n, warm)
        print(json.dumps([round(v, 2) for v in lat]), flush=True)
    return 0


def make_codec_call(x) -> Callable[[], Any]:
    """sgserve's message handling for one request, all three hops in this process, without sockets
    or TensorFlow: client pack, broker header checks + re-pack, worker decode + reply pack, client
    decode. Uses sgserve.protocol, whose check_tensors is the broker's input check."""
    import msgpack  # noqa: PLC0415

    from sgserve import protocol  # noqa: PLC0415
    from sgserve.protocol import check_tensors  # noqa: PLC0415
    ids = iter(range(1, 1 << 62))

    def codec_call():
        frames = protocol.pack({"type": "predict", "model": MODEL, "timeout_ms": 10000.0, "id": [1, next(ids)]},
                               {"x": x})
        header, payload = protocol.unpack_header(frames)  # broker
        check_tensors(header.get("inputs"), payload)
        header.update(version=1, signature="serving_default", deadline=time.time() + 10.0, attempt=0)
        wire = msgpack.packb(header, use_bin_type=True)
        wh = msgpack.unpackb(wire, raw=False, strict_map_key=False)  # worker
        arrays = protocol.decode_tensors(wh.get("inputs"), payload)
        reply = protocol.pack(protocol.ok_header(wh["id"], model=MODEL, version=1, worker=0), {"y": arrays["x"]},
                              key="outputs")
        rh, rp = protocol.unpack_header(reply)  # client
        return protocol.decode_tensors(rh.get("outputs"), rp, "outputs")

    return codec_call


def time_calls(fn: Callable[[], Any], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    pc = time.perf_counter
    for _ in range(n):
        t0 = pc()
        fn()
        out.append((pc() - t0) * 1e6)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--calls", type=int, default=2000, help="timed calls per method per round (default 2000)")
    ap.add_argument("--warmup", type=int, default=200, help="untimed calls before each method's timed calls")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="before each round, wait up to this many seconds for other work to calm down (0: don't)")
    ap.add_argument("--max-other-load", type=float, default=0.3, help="'calm' = other processes use <= this many cores")
    ap.add_argument("--name", default="bench_overhead", help="results name")
    ap.add_argument("--pinned-child", metavar="SEGMENT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pinned_child:
        return pinned_child(args.pinned_child)
    C.sigterm_as_exit()

    base, info = _models.ensure("half_plus_two")
    result: dict[str, Any] = {"benchmark": "bench_overhead", "machine": C.machine_info(),
                              "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                              "params": {"rounds": args.rounds, "calls": args.calls, "warmup": args.warmup,
                                         "batch": 1, "model": "y = 0.5 x + 2 (two scalar variables)"}}
    samples: dict[str, list[float]] = {m: [] for m in METHODS}
    rounds: list[dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="sgserve-bench-echo-")
    echo_ep = f"tcp://127.0.0.1:{C.free_port()}"
    backend = f"ipc://{tmp}/backend"
    echo_py = os.path.join(C.BENCH_DIR, "_echo.py")
    t_start = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(C.server(["--model-base-path", base, "--model-name", MODEL, "--workers", "1",
                                              "--cpus-per-worker", "1"], label="sgserve"))
            segment = s.status()["models"][0]["segment"]
            C.log(f"echo: starting broker on {echo_ep} and a worker pinned to core 0")
            eb = stack.enter_context(C.child_group([sys.executable, echo_py, "broker", "--frontend", echo_ep,
                                                    "--backend", backend]))
            ew = stack.enter_context(C.child_group([sys.executable, echo_py, "worker", "--backend", backend,
                                                    "--core", "0"]))
            ours = C.tree_pids(s.pid) + [eb.pid, ew.pid, os.getpid()]
            wait_echo(echo_ep)
            pc = stack.enter_context(C.child_group(
                [sys.executable, os.path.abspath(__file__), "--pinned-child", segment], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=C.REPO)))
            if pc.stdout.readline().strip() != "ready":
                raise RuntimeError("the pinned worker-call process did not start")
            callers, closers = make_callers(s.endpoint, echo_ep, base, segment)
            ours.append(pc.pid)
            for c in reversed(closers):
                stack.callback(c)
            for r in range(args.rounds):
                order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
                row: dict[str, Any] = {"round": r, "order": list(order)}
                if args.quiet_wait > 0:
                    row["other_load_before"] = C.wait_quiet(args.max_other_load, args.quiet_wait)
                for m in order:
                    b0, c0, t0 = C.system_busy_seconds(), C.cpu_of(ours), time.monotonic()
                    if m == "pinned":
                        pc.stdin.write(f"{args.calls} {args.warmup}\n")
                        pc.stdin.flush()
                        lat = json.loads(pc.stdout.readline())
                    else:
                        lat = time_calls(callers[m], args.calls, args.warmup)
                    other = (C.system_busy_seconds() - b0 - (C.cpu_of(ours) - c0)) / (time.monotonic() - t0)
                    samples[m].extend(lat)
                    row[m] = {"p50_us": round(C.pct(lat, 50), 1), "p99_us": round(C.pct(lat, 99), 1),
                              "other_load_cores": round(max(other, 0.0), 2)}
                row["sgserve_over_echo_p50"] = round(row["sgserve"]["p50_us"] / row["echo"]["p50_us"], 3)
                row["sgserve_over_direct_p50"] = round(row["sgserve"]["p50_us"] / row["direct"]["p50_us"], 3)
                rounds.append(row)
                C.log(f"round {r + 1}/{args.rounds}: p50 us " +
                      ", ".join(f"{m} {row[m]['p50_us']:.0f}" for m in METHODS) +
                      f"; sgserve/echo {row['sgserve_over_echo_p50']:.2f}; other load " +
                      "/".join(f"{row[m]['other_load_cores']:.2f}" for m in METHODS) + " cores")
            st = s.status()
            result["server_workers"] = st["workers"]
        result["server_warnings"] = s.problems
        result["leftover_segments"] = s.leftovers
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {}
    for m in METHODS:
        lat = samples[m]
        summary[m] = {"n": len(lat), "p50_us": round(C.pct(lat, 50), 1), "p90_us": round(C.pct(lat, 90), 1),
                      "p99_us": round(C.pct(lat, 99), 1), "mean_us": round(sum(lat) / len(lat), 1),
                      "min_us": round(min(lat), 1)}
    ratios = {
        "sgserve_over_echo_p50": round(summary["sgserve"]["p50_us"] / summary["echo"]["p50_us"], 3),
        "sgserve_over_echo_p99": round(summary["sgserve"]["p99_us"] / summary["echo"]["p99_us"], 3),
        "sgserve_over_direct_p50": round(summary["sgserve"]["p50_us"] / summary["direct"]["p50_us"], 3),
        "sgserve_over_direct_p99": round(summary["sgserve"]["p99_us"] / summary["direct"]["p99_us"], 3),
        "sgserve_over_echo_p50_per_round_median": round(C.median([r["sgserve_over_echo_p50"] for r in rounds]), 3),
        "sgserve_over_echo_p50_per_round_range": [min(r["sgserve_over_echo_p50"] for r in rounds),
                                                  max(r["sgserve_over_echo_p50"] for r in rounds)],
        # What sgserve adds on top of "transport + the worker's TF call": protocol, validation, broker logic.
        "sgserve_minus_echo_minus_worker_p50_us": round(summary["sgserve"]["p50_us"] - summary["echo"]["p50_us"]
                                                        - summary["worker"]["p50_us"], 1),
    }
    ratios["sgserve_minus_echo_minus_pinned_p50_us"] = round(
        summary["sgserve"]["p50_us"] - summary["echo"]["p50_us"] - summary["pinned"]["p50_us"], 1)
    ratios["sgserve_over_echo_plus_worker_p50"] = round(
        summary["sgserve"]["p50_us"] / (summary["echo"]["p50_us"] + summary["worker"]["p50_us"]), 3)
    ratios["target_p50_within_2x_of_echo"] = ratios["sgserve_over_echo_p50"] <= 2.0
    result.update(summary=summary, ratios=ratios, rounds=rounds, seconds=round(time.monotonic() - t_start, 1))
    C.write_json(args.name, result)

    print("\nLatency per call, batch 1, one call at a time (microseconds; all rounds pooled)")
    print(C.table(["method", "calls", "p50", "p90", "p99", "mean", "min"],
                  [[m, summary[m]["n"], summary[m]["p50_us"], summary[m]["p90_us"], summary[m]["p99_us"],
                    summary[m]["mean_us"], summary[m]["min_us"]] for m in METHODS]))
    print("\nPer round p50 (us)")
    print(C.table(["round", "order*"] + list(METHODS) + ["sgserve/echo", "other load (cores)"],
                  [[r["round"] + 1, "".join(SHORT[x] for x in r["order"])] + [r[m]["p50_us"] for m in METHODS]
                   + [r["sgserve_over_echo_p50"], "/".join(f"{r[m]['other_load_cores']:.2f}" for m in METHODS)]
                   for r in rounds]))
    print("* order: " + ", ".join(f"{v} = {k}" for k, v in SHORT.items()))
    print(f"\nsgserve/echo p50 = {ratios['sgserve_over_echo_p50']:.2f} (target <= 2.0: "
          f"{'met' if ratios['target_p50_within_2x_of_echo'] else 'MISSED'}; per-round median "
          f"{ratios['sgserve_over_echo_p50_per_round_median']:.2f}, range {ratios['sgserve_over_echo_p50_per_round_range']}), "
          f"p99 ratio {ratios['sgserve_over_echo_p99']:.2f}")
    print(f"sgserve/direct p50 = {ratios['sgserve_over_direct_p50']:.2f}, p99 = {ratios['sgserve_over_direct_p99']:.2f}")
    print(f"codec (sgserve's message handling on all hops, no sockets/TF) p50 = {summary['codec']['p50_us']:.0f} us; "
          f"ping (client -> broker -> client) p50 = {summary['ping']['p50_us']:.0f} us")
    print(f"worker TF call p50: unpinned {summary['worker']['p50_us']:.0f} us, pinned like a worker "
          f"{summary['pinned']['p50_us']:.0f} us; sgserve - echo - pinned call p50 = "
          f"{ratios['sgserve_minus_echo_minus_pinned_p50_us']:.0f} us")
    print(f"sgserve p50 - echo p50 - worker TF call p50 = {ratios['sgserve_minus_echo_minus_worker_p50_us']:.0f} us; "
          f"sgserve / (echo + worker TF call) p50 = {ratios['sgserve_over_echo_plus_worker_p50']:.2f}")
    plot(result, samples, args.name)
    return 0


def plot(result: dict[str, Any], samples: dict[str, list[float]], name: str) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for m, col in zip(METHODS, ("tab:blue", "tab:gray", "tab:green", "tab:orange", "tab:red", "tab:purple", "tab:brown")):
        s = sorted(samples[m])
        n = len(s)
        ax.plot(s, [(i + 1) / n for i in range(n)], color=col,
                label=f"{m}: p50 {result['summary'][m]['p50_us']:.0f} us, p99 {result['summary'][m]['p99_us']:.0f} us")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: PLC0415
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency per call (us, log)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("Latency CDF, batch 1, one call at a time")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax = axes[1]
    rounds = result["rounds"]
    for m, col in zip(METHODS, ("tab:blue", "tab:gray", "tab:green", "tab:orange", "tab:red", "tab:purple", "tab:brown")):
        ax.plot([r["round"] + 1 for r in rounds], [r[m]["p50_us"] for r in rounds], "-o", color=col, label=m)
    ax.set_xlabel("round")
    ax.set_xticks([r["round"] + 1 for r in rounds])
    ax.set_ylabel("p50 (us)")
    ax.set_title(f"p50 per round; sgserve/echo p50 = {result['ratios']['sgserve_over_echo_p50']:.2f} (target <= 2)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    C.save_figure(fig, name, "bench_overhead", result["machine"])


if __name__ == "__main__":
    sys.exit(main())
