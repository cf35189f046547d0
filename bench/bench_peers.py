#!/usr/bin/env python
"""sgserve next to what users would otherwise run: the same SavedModel, the same machine, the same
load generator (`sgserve bench`), one system at a time, in one run.

Systems (N = --workers, K = --cpus-per-worker; bench/peers/ holds one module per peer):

  sgserve           `sgserve start --workers N --cpus-per-worker K`: N pinned workers over one
                    shared-memory copy of the variables (the real CLI, bench/_common.py's Server)
  sgserve_batching  the same with `--enable-batching --batching-parameters-file F` (skipped with a
                    note while `sgserve start` has no such flag)
  sgserve_rest      the same with `--rest_api_port=P`, driven over http:// with TF Serving's REST
                    API through sgserve's gateway process, exactly as gunicorn_flask is driven
  sgserve_grpc      the same with `--port=P`, driven over grpc:// with TF Serving's stock stub
  tf_threads        one process, one tf.saved_model.load, N threads calling the signature, pinned
                    to all N*K cores (peers/zmq_server.py); sgserve's wire protocol, so the
                    transport is the same as sgserve's and only the execution layout differs
  naive_procs       N processes with a private tf.saved_model.load each, pinned like sgserve's
                    workers, behind a C-level ZeroMQ round-robin proxy (peers/zmq_balancer.py)
  gunicorn_flask    gunicorn + Flask, N sync workers, each loading its own copy after the fork,
                    TF Serving's REST API (peers/flask_app.py)
  ray_serve         Ray Serve, N replicas, same REST API (peers/ray_app.py)

For every model and system: start it, check one fixed request's outputs against the first system's,
run `sgserve bench MODEL --endpoint E` over the concurrency sweep (closed loop; --warmup seconds
unmeasured first), measure the memory of the whole process tree, stop it, and check that no process
and no /dev/shm file of it is left. A system that fails to start is recorded as failed and the run
goes on. With --repeats R, the systems run R times, in reversed order on odd repeats (interleaved),
and each point is reported as the median over repeats.

QPS at the p99 target: among the measured concurrency points whose p99 latency is at most
--p99-target-ms and whose errors are at most 1% of requests (so the p99 over all requests, errors
counted as infinitely slow, meets the target), the highest QPS. None when no point meets it.

Memory: sum of PSS (psutil memory_full_info) over the system's processes, with the PSS of their
/dev/shm mappings replaced by the files' allocated size, so sgserve's segment counts once and in
full. As root, also the union of physical pages (/proc/PID/pagemap), which PSS undercounts when
other TensorFlow processes on the machine share the library pages.

    python bench/bench_peers.py                      # full: demo + cnn, c=1,4,16,64, 10 s a point
    python bench/bench_peers.py --quick              # c=1,8, 3 s a point, one repeat
    python bench/bench_peers.py --workers 4 --cpus-per-worker 4     # a 16-core box
    python bench/bench_peers.py --models widedeep --systems sgserve_rest,gunicorn_flask,sgserve \
        --concurrency 8          # issue 10's REST target: sgserve REST QPS >= 3x gunicorn + Flask
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
import _common as C  # noqa: E402
import models as peer_models  # noqa: E402  (bench/peers/models.py)
import systems as S  # noqa: E402  (bench/peers/systems.py)

ALL_SYSTEMS = list(S.SYSTEMS)
MAX_ERROR_RATE = 0.01
LOADGEN_SATURATED = 0.9  # cores; the load generator is one Python process


# ---------------------------------------------------------------------------------- load generator
@dataclasses.dataclass
class Loadgen:
    """What this tree's `sgserve bench` can do (another engineer is extending it)."""

    sweep: bool  # -c takes a list and --json writes {"points": [...]}
    http: bool  # http:// endpoints (TF Serving REST)
    help_text: str
    grpc: bool = False  # grpc:// endpoints (TF Serving gRPC)

    @classmethod
    def detect(cls) -> "Loadgen":
        text = S.cli_help("bench")
        new = "--rate" in text
        return cls(sweep=new, http=new or "http://" in text, help_text=text, grpc="grpc://" in text)

    def drives(self, protocol: str) -> bool:
        return {"rest": self.http, "grpc": self.grpc}.get(protocol, True)


def loadgen_cmd(model: S.ModelRef, endpoint: str, conc: str, args, out_json: str) -> list[str]:
    return [sys.executable, "-m", "sgserve.cli", "bench", model.name, "--endpoint", endpoint, "-c", conc,
            "-d", str(args.duration), "--warmup", str(args.warmup), "-b", str(model.batch),
            "--timeout", str(args.request_timeout), "--json", out_json]


def run_loadgen(system: S.System, model: S.ModelRef, args, lg: Loadgen, log_path: str) -> dict[str, Any]:
    """The concurrency sweep against one running system: points, CPU used, other load."""
    concs = args.concurrency
    calls = [",".join(map(str, concs))] if lg.sweep else [str(c) for c in concs]
    pids = system.pids()
    cpu0 = C.cpu_of(pids)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, t0 = C.system_busy_seconds(), time.monotonic()
    points: list[dict[str, Any]] = []
    failures: list[str] = []
    with open(log_path, "a") as logf:
        for conc in calls:
            fd, out_json = tempfile.mkstemp(suffix=".json", prefix="peers-lg-")
            os.close(fd)
            cmd = loadgen_cmd(model, system.endpoint, conc, args, out_json)
            logf.write(f"$ {' '.join(cmd)}\n")
            logf.flush()
            n = len(conc.split(","))
            try:
                with C.child_group(cmd, stdout=logf, stderr=subprocess.STDOUT, env=S.sgserve_env(), cwd=C.REPO) as p:
                    p.wait(timeout=n * (args.duration + args.warmup) + 120 + n * args.request_timeout)
                with open(out_json) as f:
                    text = f.read()
                data = json.loads(text) if text.strip() else {}
                got = data.get("points") if isinstance(data.get("points"), list) else ([data] if data else [])
                if not got:
                    failures.append(f"-c {conc}: exit {p.returncode}, no JSON")
                for pt in got:
                    points.append({k: pt.get(k) for k in ("concurrency", "qps", "rows_per_s", "p50_ms", "p90_ms",
                                                         "p99_ms", "max_ms", "mean_ms", "ok", "errors",
                                                         "error_codes", "seconds", "batch_size", "workers_seen",
                                                         "p999_ms", "loadgen_cpu")
                                   if k in pt})
            except subprocess.TimeoutExpired:
                failures.append(f"-c {conc}: load generator timed out")
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(out_json)
    wall = time.monotonic() - t0
    busy = C.system_busy_seconds() - b0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = C.cpu_of(pids) - cpu0
    loadgen_cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    for pt in points:
        ok, err = pt.get("ok") or 0, pt.get("errors") or 0
        pt["error_rate"] = round(err / (ok + err), 4) if ok + err else None
    return {"points": points, "failures": failures, "wall_s": round(wall, 1),
            "server_cores": round(server_cpu / wall, 2), "loadgen_cores": round(loadgen_cpu / wall, 2),
            "other_load_cores": round(max(busy - server_cpu - loadgen_cpu, 0.0) / wall, 2)}


# ------------------------------------------------------------------------------------ other load
def wait_quiet(own_pids: list[int], max_cores: float, timeout: float) -> float:
    """Waits (up to timeout) until processes other than own_pids use at most max_cores; returns the
    last reading. Unlike _common.wait_quiet, the system's own idle processes (Ray's daemons poll)
    do not count as other work."""
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        b0, c0, t0 = C.system_busy_seconds(), C.cpu_of(own_pids), time.monotonic()
        time.sleep(1.0)
        load = max(0.0, (C.system_busy_seconds() - b0) - (C.cpu_of(own_pids) - c0)) / (time.monotonic() - t0)
        if load <= max_cores or time.monotonic() >= deadline:
            if waited:
                C.log(f"other load {load:.2f} cores{' (gave up waiting)' if load > max_cores else ''}")
            return round(load, 2)
        if not waited:
            C.log(f"machine busy with other work ({load:.2f} cores); waiting up to {timeout:.0f} s")
            waited = True


# ------------------------------------------------------------------------------------ one system
def fixed_inputs(kind: str) -> dict[str, Any]:
    import numpy as np  # noqa: PLC0415

    if kind == "cnn":
        return {"image": np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")}
    if kind == "embedding":
        return {"ids": np.array([0, 1, 123456, 4_000_000], dtype="int64")}
    if kind == "widedeep":
        ids = np.array([1, 2, 3, 999_999], dtype="int64")
        return {"user_id": ids, "item_id": ids * 7, "category": ids % 13,
                "numeric": np.random.default_rng(0).standard_normal((4, 8)).astype("float32")}
    return {"user_id": np.array([1, 2, 3, 999_999], dtype="int64"), "item_id": np.array([10, 20, 30, 5], dtype="int64")}


def compare(ref: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    import numpy as np  # noqa: PLC0415

    if set(ref) != set(out):
        return {"match": False, "why": f"outputs {sorted(out)} != {sorted(ref)}"}
    diff = max(float(np.max(np.abs(np.asarray(out[k], dtype="float64") - np.asarray(ref[k], dtype="float64"))))
               for k in ref)
    ok = all(np.allclose(np.asarray(out[k], dtype="float64"), np.asarray(ref[k], dtype="float64"), rtol=1e-4, atol=1e-5)
             for k in ref)
    return {"match": bool(ok), "max_abs_diff": diff}


def run_system(key: str, model: S.ModelRef, layout: S.Layout, args, lg: Loadgen, refs: dict, rep: int) -> dict:
    rec: dict[str, Any] = {"system": key, "model": model.kind, "repeat": rep, "status": "failed", "notes": []}
    system = S.SYSTEMS[key](layout, model)
    rec["label"] = system.label
    rec["protocol"] = system.protocol
    if args.quiet_wait > 0:
        rec["other_load_before_start"] = wait_quiet([], args.max_other_load, args.quiet_wait)
    C.log(f"== {model.kind} / {key}: {system.label}")
    try:
        rec["start_seconds"] = system.start(args.start_timeout)
        rec["endpoint"] = system.endpoint
        C.log(f"{key}: up in {rec['start_seconds']} s at {system.endpoint}; pids {system.pids()}")
        out = S.predict_once(system.endpoint, model.name, fixed_inputs(model.kind))
        if model.kind not in refs:
            refs[model.kind] = (key, out)
            rec["outputs_check"] = {"match": True, "reference": key}
        else:
            rec["outputs_check"] = dict(compare(refs[model.kind][1], out), reference=refs[model.kind][0])
            if not rec["outputs_check"]["match"]:
                C.log(f"WARNING: {key}: outputs differ from {refs[model.kind][0]}'s: {rec['outputs_check']}")
        rec["memory_after_start"] = {k: v for k, v in system.memory().items() if k != "per_process"}
        if not lg.drives(system.protocol):
            rec["notes"].append(f"not load-tested: this tree's `sgserve bench` cannot drive {system.protocol} "
                                f"endpoints yet")
            rec["status"] = "no_load"
        else:
            if args.quiet_wait > 0:
                rec["other_load_before_load"] = wait_quiet(system.pids(), args.max_other_load, args.quiet_wait)
            log_path = os.path.join(C.CACHE_DIR, "logs", f"peers-loadgen-{key}-{model.kind}-{system.port}.log")
            rec["load"] = run_loadgen(system, model, args, lg, log_path)
            rec["points"] = rec["load"].pop("points")
            rec["status"] = "ok" if rec["points"] else "failed"
            if rec["load"]["failures"]:
                rec["notes"] += rec["load"]["failures"]
            busy = [p["concurrency"] for p in rec["points"] if (p.get("loadgen_cpu") or 0) >= LOADGEN_SATURATED]
            if busy:
                rec["notes"].append(f"load generator used >= {LOADGEN_SATURATED} core at c={busy}: those points "
                                    f"may measure the client, not the server")
            for pt in rec["points"]:
                C.log(f"{key} c={pt.get('concurrency')}: {pt.get('qps')} QPS, p50/p90/p99 {pt.get('p50_ms')}/"
                      f"{pt.get('p90_ms')}/{pt.get('p99_ms')} ms, errors {pt.get('errors')} {pt.get('error_codes') or ''}")
            C.log(f"{key}: cores used: server {rec['load']['server_cores']}, loadgen {rec['load']['loadgen_cores']}, "
                  f"other processes {rec['load']['other_load_cores']}")
        rec["memory"] = system.memory()
        C.log(f"{key}: memory {rec['memory']['total_bytes'] / C.MiB:.0f} MiB (PSS, shm once) over "
              f"{rec['memory']['processes']} processes"
              + (f"; unique pages {rec['memory']['unique_bytes'] / C.MiB:.0f} MiB" if "unique_bytes" in rec["memory"] else ""))
    except S.Skipped as exc:
        rec["status"] = "skipped"
        rec["notes"].append(str(exc))
        C.log(f"{key}: skipped: {exc}")
    except S.StartError as exc:
        rec["error"] = str(exc)[-6000:]
        C.log(f"{key}: FAILED to start: {str(exc).splitlines()[0]}")
    except KeyboardInterrupt:
        rec["error"] = "interrupted"
        raise
    except Exception as exc:  # noqa: BLE001 - one broken system must not end the suite
        rec["error"] = traceback.format_exc()[-6000:]
        C.log(f"{key}: FAILED: {type(exc).__name__}: {exc}")
    finally:
        rec["stop"] = system.stop()
        rec["notes"] += system.notes
        rec["logs"] = [os.path.relpath(p, C.REPO) for p in system.logs]
    return rec


# ---------------------------------------------------------------------------------------- summary
def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(C.median(xs), 3) if xs else None


def summarize(runs: list[dict], concs: list[int], target: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for rec in runs:
        out.setdefault(rec["model"], {}).setdefault(rec["system"], {"runs": []})["runs"].append(rec)
    for model, by_sys in out.items():
        for key, s in by_sys.items():
            recs = s.pop("runs")
            s["label"] = recs[0]["label"]
            s["status"] = [r["status"] for r in recs]
            s["notes"] = sorted({n for r in recs for n in r["notes"]})
            s["errors"] = [r["error"].splitlines()[0][:300] for r in recs if r.get("error")]
            pts = {}
            for c in concs:
                at = [p for r in recs for p in r.get("points", []) if p.get("concurrency") == c]
                if at:
                    pts[c] = {k: median([p.get(k) for p in at]) for k in ("qps", "p50_ms", "p90_ms", "p99_ms", "max_ms",
                                                                          "error_rate")}
                    pts[c]["errors"] = sum(p.get("errors") or 0 for p in at)
                    pts[c]["qps_all"] = [p.get("qps") for p in at]
            s["points"] = {str(c): v for c, v in pts.items()}
            ok = [(v["qps"], c) for c, v in pts.items() if v["p99_ms"] is not None and v["p99_ms"] <= target
                  and (v["error_rate"] or 0) <= MAX_ERROR_RATE]
            best = max(ok) if ok else None
            s["qps_at_p99_target"] = best[0] if best else None
            s["qps_at_p99_target_concurrency"] = best[1] if best else None
            peak = max(((v["qps"], c) for c, v in pts.items() if v["qps"] is not None), default=None)
            s["peak_qps"], s["peak_qps_concurrency"] = (peak if peak else (None, None))
            mems = [r["memory"] for r in recs if r.get("memory")]
            s["memory_total_bytes"] = int(C.median([m["total_bytes"] for m in mems])) if mems else None
            s["memory_unique_bytes"] = int(C.median([m["unique_bytes"] for m in mems])) \
                if mems and all("unique_bytes" in m for m in mems) else None
            s["processes"] = mems[0]["processes"] if mems else None
            s["start_seconds"] = median([r.get("start_seconds") for r in recs])
            s["other_load_cores"] = [r["load"]["other_load_cores"] for r in recs if r.get("load")]
            s["server_cores"] = [r["load"]["server_cores"] for r in recs if r.get("load")]
            s["outputs_match"] = all(r.get("outputs_check", {}).get("match", True) for r in recs)
            s["leftovers"] = [r["stop"] for r in recs if r["stop"].get("leftover_processes") or r["stop"].get("leftover_shm")]
    return out


def qps_ratios(summary: dict, concs: list[int], base: str = "gunicorn_flask") -> dict[str, dict[str, Any]]:
    """Per model: each system's QPS over `base`'s at every concurrency (issue 10's REST target is
    sgserve_rest / gunicorn_flask at 8 clients, >= 3)."""
    out: dict[str, dict[str, Any]] = {}
    for model, by_sys in summary.items():
        ref = by_sys.get(base, {}).get("points", {})
        for key, s in by_sys.items():
            if key == base:
                continue
            r = {str(c): round(s["points"][str(c)]["qps"] / ref[str(c)]["qps"], 2) for c in concs
                 if s["points"].get(str(c), {}).get("qps") and ref.get(str(c), {}).get("qps")}
            if r:
                out.setdefault(model, {})[f"{key} / {base}"] = r
    return out


def fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_tables(summary: dict, concs: list[int], target: float, result: dict) -> None:
    for model, by_sys in summary.items():
        ref = by_sys.get("sgserve", {})
        print(f"\nmodel {model} (batch {result['params']['batch'][model]}), {result['params']['workers']} workers x "
              f"{result['params']['cpus_per_worker']} cores; p50/p90/p99 ms per concurrency; medians over repeats")
        headers = ["system", "status", f"QPS@p99<={target:g}ms (c)", "vs sgserve", "peak QPS (c)"] + \
            [f"c={c}" for c in concs] + ["memory MiB", "unique MiB", "procs", "other load"]
        rows = []
        for key, s in by_sys.items():
            q = s["qps_at_p99_target"]
            ratio = (q / ref["qps_at_p99_target"]) if q and ref.get("qps_at_p99_target") else None
            row = [key, "/".join(sorted(set(s["status"]))),
                   f"{fmt(q)} ({s['qps_at_p99_target_concurrency'] or '-'})", fmt(ratio, ".2f") + ("x" if ratio else ""),
                   f"{fmt(s['peak_qps'])} ({s['peak_qps_concurrency'] or '-'})"]
            for c in concs:
                p = s["points"].get(str(c))
                row.append("-" if not p else f"{fmt(p['p50_ms'])}/{fmt(p['p90_ms'])}/{fmt(p['p99_ms'])}"
                           + (f" E{p['errors']}" if p["errors"] else ""))
            row += [fmt(s["memory_total_bytes"] / C.MiB if s["memory_total_bytes"] else None, ".0f"),
                    fmt(s["memory_unique_bytes"] / C.MiB if s["memory_unique_bytes"] else None, ".0f"),
                    s["processes"] or "-", ",".join(f"{x:.2f}" for x in s["other_load_cores"]) or "-"]
            rows.append(row)
        print(C.table(headers, rows))
        for key, s in by_sys.items():
            for n in s["notes"] + s["errors"]:
                print(f"  {key}: {n}")
            if not s["outputs_match"]:
                print(f"  {key}: OUTPUTS DIFFER from the reference system's")
            if s["leftovers"]:
                print(f"  {key}: LEFT BEHIND after stop: {s['leftovers']}")
    for model, ratios in result.get("qps_ratios", {}).items():
        for what, r in ratios.items():
            print(f"  {model}: QPS {what}: " + ", ".join(f"c={c} {v:.2f}x" for c, v in r.items()))


def plot(summary: dict, concs: list[int], target: float, result: dict, name: str) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    models = list(summary)
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.6 * len(models)), squeeze=False)
    colors = {"sgserve": "tab:green", "sgserve_batching": "tab:olive", "sgserve_rest": "tab:cyan",
              "sgserve_grpc": "tab:brown", "tf_threads": "tab:gray",
              "naive_procs": "tab:blue", "gunicorn_flask": "tab:red", "ray_serve": "tab:purple"}
    for row, model in enumerate(models):
        ax, axm = axes[row]
        names, totals, uniques, cols = [], [], [], []
        for key, s in summary[model].items():
            pts = [(s["points"][str(c)], c) for c in concs if str(c) in s["points"]]
            if pts:
                ax.plot([p["qps"] for p, _ in pts], [p["p99_ms"] for p, _ in pts], "-o", color=colors.get(key),
                        label=f"{key} (QPS@p99 target {fmt(s['qps_at_p99_target'])})")
                for p, c in pts:
                    ax.annotate(f"c{c}", (p["qps"], p["p99_ms"]), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
            if s["memory_total_bytes"]:
                names.append(key)
                totals.append(s["memory_total_bytes"] / C.MiB)
                uniques.append((s["memory_unique_bytes"] or 0) / C.MiB)
                cols.append(colors.get(key, "tab:gray"))
        ax.axhline(target, color="k", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("QPS (requests/s)")
        ax.set_ylabel("p99 latency, ms (log)")
        ax.set_title(f"{model}: p99 vs QPS over concurrency {','.join(map(str, concs))} "
                     f"(batch {result['params']['batch'][model]}); dotted: target")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        xs = range(len(names))
        axm.bar([x - 0.2 for x in xs], totals, width=0.4, color=cols, label="PSS sum, shm counted once")
        if any(uniques):
            axm.bar([x + 0.2 for x in xs], uniques, width=0.4, color=cols, alpha=0.45, hatch="//",
                    label="unique physical pages")
        for x, t in zip(xs, totals):
            axm.annotate(f"{t:.0f}", (x - 0.2, t), ha="center", fontsize=7, xytext=(0, 2), textcoords="offset points")
        axm.set_xticks(list(xs))
        axm.set_xticklabels(names, rotation=20, fontsize=8)
        axm.set_ylabel("MiB, whole process tree")
        axm.set_title(f"{model}: memory after the load test")
        axm.legend(fontsize=7)
        axm.grid(alpha=0.3, axis="y")
    C.save_figure(fig, name, f"bench_peers ({result['params']['workers']} workers x "
                  f"{result['params']['cpus_per_worker']} cores)", result["machine"])


# ------------------------------------------------------------------------------------------- main
def batching_file(model: S.ModelRef, args) -> str:
    if args.batching_parameters_file:
        return os.path.abspath(args.batching_parameters_file)
    path = os.path.join(C.CACHE_DIR, "peers", f"batching-{model.kind}.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"max_batch_size {{ value: {model.batch * args.batching_max_requests} }}\n"
                f"batch_timeout_micros {{ value: {args.batching_timeout_micros} }}\n"
                f"num_batch_threads {{ value: 1 }}\n"
                f"max_enqueued_batches {{ value: 1000 }}\n")
    return path


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="N: sgserve workers, threads, processes, replicas (default 2)")
    ap.add_argument("--cpus-per-worker", type=int, default=1, help="K cores per worker (default 1)")
    ap.add_argument("--models", default="demo,cnn", help="comma-separated: demo, cnn, embedding, widedeep (default demo,cnn)")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}")
    ap.add_argument("--concurrency", default="1,4,16,64", help="closed-loop concurrency sweep (default 1,4,16,64)")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per point (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before measuring (default 2)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over all systems, order reversed on odd rounds (default 2)")
    ap.add_argument("--p99-target-ms", type=float, default=50.0, help="latency target for 'QPS at p99 target' (default 50)")
    ap.add_argument("--demo-batch", type=int, default=32, help="rows per request for demo (default 32)")
    ap.add_argument("--cnn-batch", type=int, default=4, help="images per request for cnn (default 4)")
    ap.add_argument("--embedding-batch", type=int, default=256, help="ids per request for embedding (default 256)")
    ap.add_argument("--embedding-gib", type=float, default=1.0, help="size of the optional embedding model (default 1)")
    ap.add_argument("--widedeep-batch", type=int, default=16, help="rows per request for widedeep (default 16)")
    ap.add_argument("--request-timeout", type=float, default=30.0, help="per-request timeout in the load generator (default 30)")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds a system may take to come up (default 300)")
    ap.add_argument("--batching-parameters-file", default=None,
                    help="TF Serving batching parameters for sgserve_batching (default: written to bench/.cache/peers/)")
    ap.add_argument("--batching-max-requests", type=int, default=8,
                    help="default file's max_batch_size = request batch x this (default 8)")
    ap.add_argument("--batching-timeout-micros", type=int, default=1000, help="default file's batch_timeout_micros (1000)")
    ap.add_argument("--allow-oversubscribe", action="store_true",
                    help="allow N*K > cores (sgserve --allow-oversubscribe; peers wrap around the cores)")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="before each system and sweep, wait up to this long for other work to calm down (0: don't)")
    ap.add_argument("--max-other-load", type=float, default=0.3, help="'calm' = other processes use <= this many cores")
    ap.add_argument("--quick", action="store_true", help="smoke run: c=1,8, 3 s per point, 1 s warmup, one repeat")
    ap.add_argument("--name", default=None, help="results name (default bench_peers, or bench_peers_quick with --quick)")
    a = ap.parse_args()
    if a.quick:
        given = {x.split("=")[0] for x in sys.argv[1:]}
        if "--concurrency" not in given:
            a.concurrency = "1,8"
        if "--duration" not in given:
            a.duration = 3.0
        if "--warmup" not in given:
            a.warmup = 1.0
        if "--repeats" not in given:
            a.repeats = 1
        if "--quiet-wait" not in given:
            a.quiet_wait = 3.0
    a.name = a.name or ("bench_peers_quick" if a.quick else "bench_peers")
    a.concurrency = [int(x) for x in str(a.concurrency).split(",") if x.strip()]
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    for s in a.systems:
        if s not in S.SYSTEMS:
            ap.error(f"unknown system {s!r}; known: {', '.join(ALL_SYSTEMS)}")
    for m in a.models:
        if m not in peer_models.MODELS:
            ap.error(f"unknown model {m!r}; known: {', '.join(peer_models.MODELS)}")
    return a


def main() -> int:
    args = parse_args()
    C.sigterm_as_exit()
    nproc = len(os.sched_getaffinity(0))
    need = args.workers * args.cpus_per_worker
    oversub = args.allow_oversubscribe
    if need > nproc and not oversub:
        C.log(f"{args.workers} x {args.cpus_per_worker} cores = {need} > {nproc} cores here: pass "
              f"--allow-oversubscribe to run anyway")
        return 2
    lg = Loadgen.detect()
    C.log(f"load generator: {'sweep + http' if lg.sweep else 'one concurrency per call'}"
          f"{'' if lg.http else '; no http:// support yet: REST systems are started and checked but not load-tested'}"
          f"{'' if lg.grpc else '; no grpc:// support yet: gRPC systems are started and checked but not load-tested'}")
    batch = {"demo": args.demo_batch, "cnn": args.cnn_batch, "embedding": args.embedding_batch,
             "widedeep": args.widedeep_batch}
    model_refs = []
    for kind in args.models:
        base, info = peer_models.ensure(kind, embedding_gib=args.embedding_gib)
        model_refs.append(S.ModelRef(kind=kind, name=kind, base=base, batch=batch[kind], info=info))
    result: dict[str, Any] = {
        "benchmark": "bench_peers", "machine": C.machine_info(),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "params": {"workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "systems": args.systems,
                   "models": {m.kind: dict(m.info, base=os.path.relpath(m.base, C.REPO)) for m in model_refs},
                   "batch": {m.kind: m.batch for m in model_refs}, "concurrency": args.concurrency,
                   "duration": args.duration, "warmup": args.warmup, "repeats": args.repeats,
                   "p99_target_ms": args.p99_target_ms, "max_error_rate_at_target": MAX_ERROR_RATE,
                   "request_timeout": args.request_timeout, "allow_oversubscribe": oversub,
                   "loadgen": {"sweep": lg.sweep, "http": lg.http, "grpc": lg.grpc}},
        "packages": {p: C._pkg_version(p) for p in ("flask", "gunicorn", "ray", "werkzeug", "starlette", "uvicorn")},
        "runs": [],
    }
    t_start = time.monotonic()
    refs: dict[str, Any] = {}
    try:
        for rep in range(args.repeats):
            order = args.systems if rep % 2 == 0 else list(reversed(args.systems))
            for model in model_refs:
                layout = S.Layout(args.workers, args.cpus_per_worker, oversub,
                                  batching_file=batching_file(model, args) if "sgserve_batching" in order else None)
                for key in order:
                    result["runs"].append(run_system(key, model, layout, args, lg, refs, rep))
                    result["seconds"] = round(time.monotonic() - t_start, 1)
                    result["summary"] = summarize(result["runs"], args.concurrency, args.p99_target_ms)
                    C.write_json(args.name, result)  # after every system, so an interrupted run keeps its data
    except KeyboardInterrupt:
        C.log("interrupted: writing what was measured")
        result["interrupted"] = True
    result["seconds"] = round(time.monotonic() - t_start, 1)
    result["summary"] = summarize(result["runs"], args.concurrency, args.p99_target_ms)
    result["qps_ratios"] = qps_ratios(result["summary"], args.concurrency)
    C.write_json(args.name, result)
    print_tables(result["summary"], args.concurrency, args.p99_target_ms, result)
    plot(result["summary"], args.concurrency, args.p99_target_ms, result, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
