#!/usr/bin/env python
"""Throughput of 1 vs 2 sgserve workers (1 core each) on a compute-bound MLP, with a thread baseline.

Model: x float32[None, 1024] through 4 dense 1024x1024 relu layers + a 1024x16 head (~8.4 MFLOP per
row), 32 rows per request. Two servers run side by side (idle when not measured):

    sgserve start --workers 1 --cpus-per-worker 1      (worker pinned to core 0)
    sgserve start --workers 2 --cpus-per-worker 1      (workers pinned to cores 0 and 1)

and the real load generator, `sgserve bench mlp -c C -b 32 -d D --json ...` (a separate client
process, closed loop, C requests in flight), measures each at each concurrency. The reference is
"one process, one TF runtime, C threads" calling the loaded signature in-process (no messaging,
inputs generated beforehand). Measurement points are interleaved: for each repeat, for each C:
1 worker, 2 workers, threads. CPU seconds of the broker, the workers and the load generator are
recorded for every point, since on this 2-core machine the client and broker share the workers'
cores.

    python bench/bench_throughput.py [--concurrency 1,2,4,8] [--duration 5] [--repeats 2]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import _models  # noqa: E402

MODEL = "mlp"


# ------------------------------------------------------------------------------ thread baseline
def threads_child(base: str, threads: int, duration: float, warmup: float, batch: int) -> int:
    """One process, one TF runtime, N Python threads calling the signature; prints a JSON line."""
    import threading  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    fn = tf.saved_model.load(os.path.join(base, "1")).signatures["serving_default"]
    width = int(fn.structured_input_signature[1]["x"].shape[1])
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal((batch, width)).astype(np.float32) for _ in range(16)]
    fn(x=tf.constant(pool[0]))
    lock = threading.Lock()
    lat: list[float] = []
    measuring = threading.Event()
    stop = threading.Event()

    def run(i: int) -> None:
        local = []
        k = i
        while not stop.is_set():
            t0 = time.perf_counter()
            fn(x=tf.constant(pool[k % len(pool)]))["y"].numpy()
            dt = time.perf_counter() - t0
            k += 1
            if measuring.is_set():
                local.append(dt * 1000.0)
        with lock:
            lat.extend(local)

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    time.sleep(warmup)
    cpu0 = time.process_time()
    measuring.set()
    t0 = time.perf_counter()
    time.sleep(duration)
    measuring.clear()
    secs = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    stop.set()
    for t in ts:
        t.join()
    print(json.dumps({"ok": len(lat), "seconds": secs, "qps": len(lat) / secs, "p50_ms": C.pct(lat, 50),
                      "p99_ms": C.pct(lat, 99), "cpu_s": cpu}), flush=True)
    return 0


def run_threads(base: str, threads: int, args) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--threads-child", base, "--threads", str(threads),
           "--duration", str(args.duration), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, t0 = C.system_busy_seconds(), time.monotonic()
    with C.child_group(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=C.REPO)) as p:
        out, _ = p.communicate(timeout=args.duration + args.warmup + 120)
    busy, wall = C.system_busy_seconds() - b0, time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"thread baseline exited with {p.returncode}")
    r = json.loads(out.strip().splitlines()[-1])
    own = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    return {"qps": round(r["qps"], 1), "p50_ms": round(r["p50_ms"], 3), "p99_ms": round(r["p99_ms"], 3),
            "ok": r["ok"], "seconds": round(r["seconds"], 2), "cpu_cores_used": round(r["cpu_s"] / r["seconds"], 2),
            "other_load_cores": round(max(busy - own, 0.0) / wall, 2)}


# ------------------------------------------------------------------------------------- sgserve
def cpu_seconds(pid: int) -> float:
    import psutil  # noqa: PLC0415
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


_STARTUP_CPU: list[float] = []


def loadgen_startup_cpu() -> float:
    """CPU seconds `python -m sgserve.cli bench` spends starting up (imports), measured once."""
    if not _STARTUP_CPU:
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", "import numpy, zmq, click, msgpack; import sgserve.cli, sgserve.bench.loadgen, "
                        "sgserve.client"], check=False, env=dict(os.environ, PYTHONPATH=C.REPO))
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        _STARTUP_CPU.append(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
    return _STARTUP_CPU[0]


def restarts_and_pids(server: C.Server) -> tuple[int, list[int]]:
    st = server.status()
    return sum(w.get("restarts", 0) for w in st["workers"]), [w["pid"] for w in st["workers"] if w.get("pid")]


def run_loadgen(server: C.Server, concurrency: int, args) -> dict[str, Any]:
    restarts0, worker_pids = restarts_and_pids(server)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_json = f.name
    cmd = [sys.executable, "-m", "sgserve.cli", "bench", MODEL, "--endpoint", server.endpoint,
           "--concurrency", str(concurrency), "--duration", str(args.duration), "--batch-size", str(args.batch),
           "--warmup", str(args.warmup), "--json", out_json]
    pids = {"broker": [server.pid], "workers": worker_pids}
    loadgen_startup_cpu()
    before = {k: sum(cpu_seconds(x) for x in v) for k, v in pids.items()}
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, t0 = C.system_busy_seconds(), time.monotonic()
    try:
        with C.child_group(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=C.REPO)) as p:
            p.communicate(timeout=args.duration + args.warmup + 120)
        busy, wall = C.system_busy_seconds() - b0, time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = {k: sum(cpu_seconds(x) for x in v) for k, v in pids.items()}
        if p.returncode != 0:
            raise RuntimeError(f"sgserve bench exited with {p.returncode}")
        with open(out_json) as f:
            r = json.load(f)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(out_json)
    # Cores used while the load ran (warmup + measured seconds; the server is idle while the
    # load generator starts up, and the load generator's own start-up CPU is subtracted).
    busy_s = args.warmup + r["seconds"]
    cpu = {k: round((after[k] - before[k]) / busy_s, 2) for k in pids}
    lg = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime - loadgen_startup_cpu()
    cpu["loadgen"] = round(max(lg, 0.0) / busy_s, 2)
    own = sum(after[k] - before[k] for k in pids) + ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    restarts1, _ = restarts_and_pids(server)
    return {"other_load_cores": round(max(busy - own, 0.0) / wall, 2), "worker_restarts": restarts1 - restarts0,
            "qps": r["qps"], "rows_per_s": r["rows_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
            "ok": r["ok"], "errors": r["errors"], "error_codes": r["error_codes"], "seconds": r["seconds"],
            "workers_seen": r["workers_seen"], "cpu_cores_used": cpu}


# ---------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,2,4,8", help="requests in flight, comma-separated (default 1,2,4,8)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per point (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point (default 1)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every point (default 2)")
    ap.add_argument("--batch", type=int, default=32, help="rows per request (default 32)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--quiet-wait", type=float, default=5.0,
                    help="before each point, wait up to this many seconds for other work to calm down (0: don't)")
    ap.add_argument("--max-other-load", type=float, default=0.3, help="'calm' = other processes use <= this many cores")
    ap.add_argument("--skip-threads", action="store_true", help="skip the in-process thread baseline")
    ap.add_argument("--name", default="bench_throughput", help="results name")
    ap.add_argument("--threads-child", metavar="BASE", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads_child:
        return threads_child(args.threads_child, args.threads, args.duration, args.warmup, args.batch)
    C.sigterm_as_exit()
    concs = [int(x) for x in args.concurrency.split(",") if x.strip()]
    base, info = _models.ensure("mlp", width=args.width, depth=args.depth)
    result: dict[str, Any] = {"benchmark": "bench_throughput", "machine": C.machine_info(),
                              "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                              "params": {"concurrency": concs, "duration": args.duration, "warmup": args.warmup,
                                         "repeats": args.repeats, "batch": args.batch, "model": info},
                              "points": []}
    configs = ["sgserve_1w", "sgserve_2w"] + ([] if args.skip_threads else ["threads"])
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        servers = {}
        for w in (1, 2):
            sargs = ["--model-base-path", base, "--model-name", MODEL, "--workers", str(w), "--cpus-per-worker", "1"]
            s = stack.enter_context(C.server(sargs, label=f"sgserve {w}w"))
            st = s.status()
            servers[f"sgserve_{w}w"] = (s, [x["pid"] for x in st["workers"]], [x["cores"] for x in st["workers"]])
        result["worker_cores"] = {k: v[2] for k, v in servers.items()}
        total = args.repeats * len(concs) * len(configs)
        done = 0
        for rep in range(args.repeats):
            for c in concs:
                for cfg in configs:
                    done += 1
                    quiet = C.wait_quiet(args.max_other_load, args.quiet_wait) if args.quiet_wait > 0 else None
                    if cfg == "threads":
                        r = run_threads(base, c, args)
                    else:
                        r = run_loadgen(servers[cfg][0], c, args)
                        if r["worker_restarts"]:
                            C.log(f"WARNING: {cfg}: {r['worker_restarts']} worker restart(s) during this point "
                                  f"(its CPU figures are incomplete)")
                    r.update(config=cfg, concurrency=c, repeat=rep, other_load_before=quiet)
                    result["points"].append(r)
                    C.log(f"[{done}/{total}] {cfg:>10} c={c}: {r['qps']:.1f} QPS, p50 {r['p50_ms']:.2f} ms, "
                          f"p99 {r['p99_ms']:.2f} ms, cores used {r['cpu_cores_used']}, "
                          f"other load {r['other_load_cores']:.2f} cores")
        for k, (s, _, _) in servers.items():
            st = s.status()
            result.setdefault("restarts", {})[k] = sum(w.get("restarts", 0) for w in st["workers"])
    result["server_warnings"] = {k: v[0].problems for k, v in servers.items()}
    result["leftover_segments"] = {k: v[0].leftovers for k, v in servers.items()}
    result["seconds"] = round(time.monotonic() - t_start, 1)

    # Aggregate over repeats: the median, and the best (other work on the machine can only slow a
    # point down, so the best repeat is the least disturbed estimate of capacity).
    agg: dict[str, dict[int, dict[str, Any]]] = {}
    for cfg in configs:
        for c in concs:
            pts = [p for p in result["points"] if p["config"] == cfg and p["concurrency"] == c]
            best = max(pts, key=lambda p: p["qps"])
            agg.setdefault(cfg, {})[c] = {"qps": round(C.median([p["qps"] for p in pts]), 1),
                                          "qps_best": best["qps"],
                                          "p50_ms": round(C.median([p["p50_ms"] for p in pts]), 3),
                                          "p99_ms": round(C.median([p["p99_ms"] for p in pts]), 3),
                                          "p50_ms_best_run": best["p50_ms"], "p99_ms_best_run": best["p99_ms"],
                                          "qps_all": [p["qps"] for p in pts],
                                          "other_load_cores": [p["other_load_cores"] for p in pts]}
    scaling = {str(c): round(agg["sgserve_2w"][c]["qps"] / agg["sgserve_1w"][c]["qps"], 3) for c in concs}
    scaling_best = {str(c): round(agg["sgserve_2w"][c]["qps_best"] / agg["sgserve_1w"][c]["qps_best"], 3)
                    for c in concs}
    best1 = max(agg["sgserve_1w"][c]["qps_best"] for c in concs)
    best2 = max(agg["sgserve_2w"][c]["qps_best"] for c in concs)
    med1 = max(agg["sgserve_1w"][c]["qps"] for c in concs)
    med2 = max(agg["sgserve_2w"][c]["qps"] for c in concs)
    summary = {"by_config": {k: {str(c): v for c, v in d.items()} for k, d in agg.items()},
               "scaling_2w_over_1w_median_by_concurrency": scaling,
               "scaling_2w_over_1w_best_by_concurrency": scaling_best,
               "peak_qps_1w": best1, "peak_qps_2w": best2, "scaling_peak_2w_over_peak_1w": round(best2 / best1, 3),
               "peak_of_medians_1w": med1, "peak_of_medians_2w": med2,
               "scaling_peak_of_medians": round(med2 / med1, 3)}
    if "threads" in agg:
        bt = max(agg["threads"][c]["qps_best"] for c in concs)
        summary["peak_qps_threads"] = bt
        summary["peak_2w_over_peak_threads"] = round(best2 / bt, 3)
        summary["peak_1w_over_peak_threads"] = round(best1 / bt, 3)
    result["summary"] = summary
    C.write_json(args.name, result)

    print(f"\nQPS, batch {args.batch}: best of {args.repeats} interleaved repeats [median] (p50/p99 ms of the best run)")
    rows = []
    for c in concs:
        row = [c]
        for cfg in configs:
            a = agg[cfg][c]
            row.append(f"{a['qps_best']:.1f} [{a['qps']:.1f}] ({a['p50_ms_best_run']:.1f}/{a['p99_ms_best_run']:.1f})")
        row.append(f"{scaling_best[str(c)]:.2f} [{scaling[str(c)]:.2f}]")
        rows.append(row)
    print(C.table(["concurrency"] + [{"sgserve_1w": "sgserve 1 worker", "sgserve_2w": "sgserve 2 workers",
                                      "threads": "1 process, C threads"}[k] for k in configs] + ["2w/1w"], rows))
    print(f"\npeak QPS: 1 worker {best1:.1f}, 2 workers {best2:.1f}: scaling {best2 / best1:.2f}x "
          f"(peak of medians: {med1:.1f} -> {med2:.1f}, {med2 / med1:.2f}x)"
          + (f"; threads baseline peak {summary['peak_qps_threads']:.1f}" if "threads" in agg else ""))
    print("\nCPU cores used during each point (median over repeats): broker / workers / loadgen; other = "
          "processes not ours")
    crow = []
    for c in concs:
        row = [c]
        for cfg in configs:
            pts = [p for p in result["points"] if p["config"] == cfg and p["concurrency"] == c]
            if cfg == "threads":
                own = f"{C.median([p['cpu_cores_used'] for p in pts]):.2f}"
            else:
                own = " / ".join(f"{C.median([p['cpu_cores_used'][k] for p in pts]):.2f}"
                                 for k in ("broker", "workers", "loadgen"))
            row.append(f"{own}; other {C.median([p['other_load_cores'] for p in pts]):.2f}")
        crow.append(row)
    print(C.table(["concurrency"] + [{"sgserve_1w": "1 worker", "sgserve_2w": "2 workers",
                                      "threads": "threads (process)"}[k] for k in configs], crow))
    plot(result, agg, concs, configs, args.name)
    return 0


def plot(result, agg, concs, configs, name) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = {"sgserve_1w": "sgserve, 1 worker", "sgserve_2w": "sgserve, 2 workers", "threads": "1 process, C threads"}
    colors = {"sgserve_1w": "tab:blue", "sgserve_2w": "tab:green", "threads": "tab:gray"}
    for cfg in configs:
        axes[0].plot(concs, [agg[cfg][c]["qps_best"] for c in concs], "-o", color=colors[cfg],
                     label=f"{labels[cfg]} (best of repeats; dots: every repeat)")
        for c in concs:
            axes[0].scatter([c] * len(agg[cfg][c]["qps_all"]), agg[cfg][c]["qps_all"], color=colors[cfg], s=8, alpha=0.4)
        axes[1].plot(concs, [agg[cfg][c]["p50_ms_best_run"] for c in concs], "-o", color=colors[cfg],
                     label=f"{labels[cfg]} p50")
        axes[1].plot(concs, [agg[cfg][c]["p99_ms_best_run"] for c in concs], ":", color=colors[cfg],
                     label=f"{labels[cfg]} p99")
    s = result["summary"]
    axes[0].set_title(f"QPS, batch {result['params']['batch']}: peak 2w / peak 1w = {s['scaling_peak_2w_over_peak_1w']:.2f}x")
    axes[0].set_xlabel("concurrency (requests in flight / threads)")
    axes[0].set_ylabel("requests/s")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(concs)
        ax.set_xticklabels([str(c) for c in concs])
        ax.minorticks_off()
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[1].set_title("latency (of the best repeat)")
    axes[1].set_xlabel("concurrency")
    axes[1].set_ylabel("ms")
    axes[1].legend(fontsize=7)
    axes[1].grid(alpha=0.3)
    C.save_figure(fig, name, "bench_throughput", result["machine"])


if __name__ == "__main__":
    sys.exit(main())
