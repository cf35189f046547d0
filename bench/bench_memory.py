#!/usr/bin/env python
"""Memory of W sgserve workers sharing one model vs W processes each loading their own copy.

For each model size (one embedding table ROWS x 64 float32 + a small dense layer, built with
tf.saved_model.save) and each worker count W:

- sgserve: `sgserve start --workers W --cpus-per-worker 1 --allow-oversubscribe --policy mod`,
  then every worker is sent requests whose ids sweep the whole table (MOD routing with
  routing_key = worker index, so each worker gathers every row and maps every page of the
  segment; a private copy of the table, if TensorFlow made one, would show in its USS), plus
  random-id requests. Then the USS/PSS of every process of the server tree (broker + workers).
- naive baseline, same run: W plain processes, each `tf.saved_model.load`s the model and runs the
  same sweep + random traffic through its signature; added one at a time.

Reported: total PSS, total USS, "USS excluding the segment + segment size", and the marginal cost
of the W-th worker/process (total with W minus total with W-1) in bytes and as % of the model.

    python bench/bench_memory.py                     # 1 GiB and 3 GiB, 1..3 workers (RAM allowing)
    python bench/bench_memory.py --sizes-gib 1       # the quick case
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import _models  # noqa: E402

MODEL_NAME = "emb"
MARGINALS = (("pss_total", "marginal_pss"), ("uss_excl_seg_plus_segment", "marginal_uss_plus_segment"),
             ("unique_bytes", "marginal_unique"))


# ------------------------------------------------------------------------------------------ traffic
def sweep_batches(rows: int, batch: int):
    for start in range(0, rows, batch):
        yield start, min(batch, rows - start)


def sgserve_traffic(endpoint: str, rows: int, workers: int, batch: int, random_requests: int, seed: int) -> dict:
    """Each worker (MOD routing, key = index) gathers every row once; then random-id requests."""
    import numpy as np  # noqa: PLC0415
    from sgserve.client import Client  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    served: dict[int, int] = {}
    misrouted = 0
    t0 = time.monotonic()
    probe = None
    with Client(endpoint, timeout=120.0) as c:
        for w in range(workers):
            for start, n in sweep_batches(rows, batch):
                ids = np.arange(start, start + n, dtype=np.int64)
                res = c.predict_full(MODEL_NAME, {"ids": ids}, routing_key=w)
                served[res.worker] = served.get(res.worker, 0) + 1
                misrouted += res.worker != w
        for i in range(random_requests):
            ids = rng.integers(0, rows, batch, dtype=np.int64)
            res = c.predict_full(MODEL_NAME, {"ids": ids}, routing_key=i % workers)
            served[res.worker] = served.get(res.worker, 0) + 1
        probe = c.predict(MODEL_NAME, {"ids": np.arange(8, dtype=np.int64) * (rows // 8)})["score"].tolist()
    return {"requests_per_worker": {str(k): v for k, v in sorted(served.items())}, "misrouted_sweep_requests": misrouted,
            "seconds": round(time.monotonic() - t0, 1), "probe_scores": probe}


# ------------------------------------------------------------------------------------ naive child
def naive_child(base: str, rows: int, batch: int, random_requests: int, seed: int) -> int:
    """One process, one private copy: tf.saved_model.load + the same traffic, then wait for EOF."""
    os.environ.update({"OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"})
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    t0 = time.monotonic()
    loaded = tf.saved_model.load(os.path.join(base, "1"))
    fn = loaded.signatures["serving_default"]
    load_s = time.monotonic() - t0
    rng = np.random.default_rng(seed)
    for start, n in sweep_batches(rows, batch):
        fn(ids=tf.constant(np.arange(start, start + n, dtype=np.int64)))["score"].numpy()
    for _ in range(random_requests):
        fn(ids=tf.constant(rng.integers(0, rows, batch, dtype=np.int64)))["score"].numpy()
    probe = fn(ids=tf.constant(np.arange(8, dtype=np.int64) * (rows // 8)))["score"].numpy().tolist()
    print(json.dumps({"ready": True, "load_seconds": round(load_s, 1),
                      "seconds": round(time.monotonic() - t0, 1), "probe_scores": probe}), flush=True)
    sys.stdin.read()  # until the driver closes our stdin (or kills us)
    return 0


# ------------------------------------------------------------------------------------------ measure
def summarize(procs: list[dict[str, Any]], segment_bytes: int) -> dict[str, int]:
    return {
        "pss_total": sum(p["pss"] for p in procs),
        "uss_total": sum(p["uss"] for p in procs),
        "rss_total": sum(p["rss"] for p in procs),
        "uss_excl_seg_total": sum(p["uss_excl_seg"] for p in procs),
        "uss_excl_seg_plus_segment": sum(p["uss_excl_seg"] for p in procs) + segment_bytes,
        "swap_total": sum(p["swap"] for p in procs),
    }


def measure_sgserve(base: str, info: dict, workers: int, args) -> dict[str, Any]:
    rows = info["rows"]
    sargs = ["--model-base-path", base, "--model-name", MODEL_NAME, "--workers", str(workers),
             "--cpus-per-worker", "1", "--allow-oversubscribe", "--policy", "mod",
             "--worker-timeout", "300"]
    with C.server(sargs, label=f"sgserve W={workers}", timeout=900) as s:
        st = s.status()
        model = st["models"][0]
        seg = model["segment"]
        seg_file = os.path.join(C.SHM, seg.lstrip("/"))
        seg_size = os.stat(seg_file).st_size
        C.log(f"sgserve W={workers}: segment {seg} {seg_size / C.GiB:.3f} GiB; sending traffic "
              f"({workers} x {rows // args.batch} sweep requests of {args.batch} ids + {args.random_requests} random)")
        traffic = sgserve_traffic(s.endpoint, rows, workers, args.batch, args.random_requests, seed=workers)
        time.sleep(args.settle)
        st = s.status()
        worker_pids = {w["pid"]: w["index"] for w in st["workers"]}
        prefix = os.path.basename(seg_file)
        procs = []
        for pid in C.tree_pids(s.pid):
            m = C.process_memory(pid, prefix)
            m["role"] = "broker" if pid == s.pid else (f"worker {worker_pids[pid]}" if pid in worker_pids else "other")
            procs.append(m)
        restarts = sum(w.get("restarts", 0) for w in st["workers"])
        uniq = C.unique_memory([p["pid"] for p in procs], prefix)
    summary = summarize(procs, seg_size)
    summary.update(uniq)
    wk = [p for p in procs if p["role"].startswith("worker")]
    summary["workers_pss"] = sum(p["pss"] for p in wk)
    # The pages that exist only because of one worker: what its exit would free = the marginal
    # cost of the last worker when W >= 2 (the segment and TF's libraries stay mapped by the others).
    summary["worker_uss_excl_seg_mean"] = int(sum(p["uss_excl_seg"] for p in wk) / len(wk))
    return {"workers": workers, "segment": seg, "segment_bytes": seg_size, "segment_data_bytes": model.get("bytes"),
            "model_load_seconds": model.get("load_seconds"), "traffic": traffic, "worker_restarts": restarts,
            "processes": procs, "summary": summary, "leftover_segments": s.leftovers,
            "server_warnings": s.problems}


def measure_naive(base: str, info: dict, max_workers: int, args) -> list[dict[str, Any]]:
    """Starts naive processes one at a time; measures all of them after each start."""
    rows = info["rows"]
    children: list[subprocess.Popen] = []
    out = []
    try:
        for w in range(1, max_workers + 1):
            cmd = [sys.executable, os.path.abspath(__file__), "--naive-child", base, "--rows", str(rows),
                   "--batch", str(args.batch), "--random-requests", str(args.random_requests), "--seed", str(w)]
            C.log(f"naive W={w}: starting process {w} (tf.saved_model.load + the same traffic)")
            env = dict(os.environ, PYTHONPATH=C.REPO)
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 start_new_session=True, env=env)
            children.append(p)
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"naive process {w} exited with {p.wait()} before it was ready")
            ready = json.loads(line)
            time.sleep(args.settle)
            procs = []
            for i, ch in enumerate(children):
                m = C.process_memory(ch.pid)
                m["role"] = f"process {i}"
                procs.append(m)
            summary = summarize(procs, 0)
            summary.update(C.unique_memory([ch.pid for ch in children]))
            summary["worker_uss_excl_seg_mean"] = int(sum(p["uss"] for p in procs) / len(procs))
            out.append({"workers": w, "processes": procs, "summary": summary, "child": ready})
            C.log(f"naive W={w}: total PSS {out[-1]['summary']['pss_total'] / C.GiB:.2f} GiB")
    finally:
        for ch in children:
            C.kill_group(ch)
    return out


def marginal(rows: list[dict[str, Any]], key: str) -> list[int | None]:
    res: list[int | None] = [None]
    for prev, cur in zip(rows, rows[1:]):
        res.append(cur["summary"][key] - prev["summary"][key])
    return res


# ------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-gib", default="1,3", help="model sizes in GiB, comma-separated (default 1,3)")
    ap.add_argument("--max-workers", type=int, default=3, help="up to this many workers, if RAM allows (default 3)")
    ap.add_argument("--batch", type=int, default=65536, help="ids per request (default 65536)")
    ap.add_argument("--random-requests", type=int, default=32, help="random-id requests after the sweep")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait before reading memory")
    ap.add_argument("--skip-naive", action="store_true", help="skip the naive baseline")
    ap.add_argument("--name", default="bench_memory", help="results name (bench/results/NAME.json/.png)")
    # internal: one naive baseline process
    ap.add_argument("--naive-child", metavar="BASE", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--replot", action="store_true", help="only redraw the table and PNG from the saved JSON")
    args = ap.parse_args()
    if args.replot:
        with open(os.path.join(C.RESULTS_DIR, f"{args.name}.json")) as f:
            saved = json.load(f)
        print_report(saved)
        plot(saved, args.name)
        return 0
    if args.naive_child:
        return naive_child(args.naive_child, args.rows, args.batch, args.random_requests, args.seed)

    import psutil  # noqa: PLC0415

    C.sigterm_as_exit()
    sizes = [float(x) for x in args.sizes_gib.split(",") if x.strip()]
    result: dict[str, Any] = {"benchmark": "bench_memory", "machine": C.machine_info(),
                              "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                              "params": {"sizes_gib": sizes, "batch": args.batch, "random_requests": args.random_requests,
                                         "max_workers": args.max_workers},
                              "notes": [C.drop_page_cache_note()], "sizes": []}
    t_start = time.monotonic()
    for size in sizes:
        base, info = _models.ensure("embedding", gib=size)
        model_bytes = info["variable_bytes"]
        avail = psutil.virtual_memory().available
        # Peak of the naive baseline: W-1 loaded copies + one loading (<= 2x) + ~0.7 GiB of TF each.
        max_w = args.max_workers
        while max_w > 1 and (max_w + 1) * model_bytes + max_w * 0.8 * C.GiB + 2 * C.GiB > avail:
            max_w -= 1
        if max_w < args.max_workers:
            msg = (f"{size:g} GiB: only up to {max_w} workers: {avail / C.GiB:.1f} GiB available RAM is too little "
                   f"for {args.max_workers}")
            C.log(msg)
            result["notes"].append(msg)
        C.log(f"=== model {size:g} GiB ({info['rows']} rows x {info['dim']} float32, {model_bytes / C.GiB:.3f} GiB "
              f"of variables), workers 1..{max_w}")
        entry: dict[str, Any] = {"size_gib": size, "model_bytes": model_bytes, "rows": info["rows"],
                                 "build": info, "sgserve": [], "naive": []}
        for w in range(1, max_w + 1):
            r = measure_sgserve(base, info, w, args)
            C.log(f"sgserve W={w}: total PSS {r['summary']['pss_total'] / C.GiB:.2f} GiB, "
                  f"USS-excl-segment + segment {r['summary']['uss_excl_seg_plus_segment'] / C.GiB:.2f} GiB")
            entry["sgserve"].append(r)
        if not args.skip_naive:
            entry["naive"] = measure_naive(base, info, max_w, args)
        for kind in ("sgserve", "naive"):
            rows = entry[kind]
            if not rows:
                continue
            for key, out_key in MARGINALS:
                if any(key not in r["summary"] for r in rows):
                    continue
                for r, m in zip(rows, marginal(rows, key)):
                    r[out_key] = m
                    r[out_key + "_pct_of_model"] = None if m is None else round(100.0 * m / model_bytes, 2)
            for r in rows:
                u = r["summary"]["worker_uss_excl_seg_mean"]
                r["worker_uss_pct_of_model"] = round(100.0 * u / model_bytes, 2) if r["workers"] > 1 else None
        sg_probe = entry["sgserve"][0]["traffic"]["probe_scores"] if entry["sgserve"] else None
        nv_probe = entry["naive"][0]["child"]["probe_scores"] if entry["naive"] else None
        if sg_probe and nv_probe:
            entry["outputs_match_naive"] = max(abs(a - b) for a, b in zip(sg_probe, nv_probe)) < 1e-5
        result["sizes"].append(entry)
        C.write_json(args.name, result)  # partial results survive a later failure
    result["seconds"] = round(time.monotonic() - t_start, 1)
    C.write_json(args.name, result)
    print_report(result)
    plot(result, args.name)
    return 0


def _g(b: float | None) -> str:
    return "" if b is None else f"{b / C.GiB:.3f}"


def _pct(v) -> str:
    return "" if v is None else f"{v:.1f}%"


def print_report(result: dict[str, Any]) -> None:
    rows = []
    for e in result["sizes"]:
        for kind in ("sgserve", "naive"):
            for r in e[kind]:
                s = r["summary"]
                rows.append([f"{e['size_gib']:g}", kind, r["workers"], _g(s["pss_total"]), _g(s["uss_total"]),
                             _g(s["uss_excl_seg_plus_segment"]), _g(s.get("unique_bytes")),
                             f"{_g(r.get('marginal_pss'))} {_pct(r.get('marginal_pss_pct_of_model'))}",
                             f"{_g(r.get('marginal_uss_plus_segment'))} {_pct(r.get('marginal_uss_plus_segment_pct_of_model'))}",
                             f"{_g(r.get('marginal_unique'))} {_pct(r.get('marginal_unique_pct_of_model'))}",
                             f"{_g(s['worker_uss_excl_seg_mean'])} {_pct(r.get('worker_uss_pct_of_model'))}"
                             if r["workers"] > 1 else ""])
    print("\nMemory of the whole tree (sgserve: broker + workers; naive: the W processes), GiB "
          "(marginal = total with W minus total with W-1, and % of the model's size)")
    print(C.table(["model GiB", "layout", "W", "PSS", "USS", "USS-seg+seg", "unique pages",
                   "marg. PSS", "marg. USS-seg+seg", "marg. unique", "USS-seg per worker"], rows))
    print("\nPer process (GiB): USS excluding the segment, USS, PSS, segment pages it maps")
    prow = []
    for e in result["sizes"]:
        for r in e["sgserve"]:
            for p in r["processes"]:
                prow.append([f"{e['size_gib']:g}", r["workers"], p["role"], _g(p["uss_excl_seg"]), _g(p["uss"]),
                             _g(p["pss"]), _g(p["seg_rss"])])
    print(C.table(["model GiB", "W", "process", "USS-seg", "USS", "PSS", "segment mapped"], prow))


def plot(result: dict[str, Any], name: str) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    ax = axes[0]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for i, e in enumerate(result["sizes"]):
        col = colors[i % len(colors)]
        for kind, key, style, lab in (("sgserve", "pss_total", "-o", "sgserve PSS"),
                                      ("sgserve", "unique_bytes", "-s", "sgserve unique pages"),
                                      ("naive", "unique_bytes", "--^", "naive unique pages")):
            pts = [(r["workers"], r["summary"][key] / C.GiB) for r in e[kind] if key in r["summary"]]
            if pts:
                ax.plot(*zip(*pts), style, color=col, label=f"{e['size_gib']:g} GiB model: {lab}",
                        alpha=0.9 if kind == "sgserve" else 0.6)
    ax.set_xticks(sorted({r["workers"] for e in result["sizes"] for r in e["sgserve"] + e["naive"]}))
    ax.set_xlabel("workers / processes")
    ax.set_ylabel("GiB")
    ax.set_title("Total memory of the serving processes")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    labels, vals, cols = [], [], []
    for e in result["sizes"]:
        for kind, key, col, lab in (("sgserve", "marginal_pss_pct_of_model", "tab:blue", "PSS"),
                                    ("sgserve", "marginal_unique_pct_of_model", "tab:green", "unique"),
                                    ("naive", "marginal_unique_pct_of_model", "tab:gray", "unique")):
            for r in e[kind][1:]:
                if r.get(key) is None:
                    continue
                labels.append(f"{e['size_gib']:g}G {kind} {lab} W={r['workers']}")
                vals.append(r[key])
                cols.append(col)
    ax.bar(range(len(vals)), vals, color=cols)
    from matplotlib.patches import Patch  # noqa: PLC0415
    ax.axhline(15, color="red", ls="--", lw=1)
    handles = [Patch(color="tab:blue", label="sgserve: marginal PSS"),
               Patch(color="tab:green", label="sgserve: marginal unique pages"),
               Patch(color="tab:gray", label="naive: marginal unique pages"),
               ax.lines[-1]]
    handles[-1].set_label("target: 15% of the model")
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(labels, fontsize=6, rotation=60, ha="right")
    ax.set_ylabel("% of model size")
    ax.set_title("Marginal cost of the W-th worker")
    ax.legend(handles=handles, fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    C.save_figure(fig, name, "bench_memory", result["machine"])


if __name__ == "__main__":
    sys.exit(main())
