#!/usr/bin/env python
"""Segment tiers: a model about 3x the memory limit of its cgroup, served from the file tier.

One embedding table of ``--table-mib`` MiB (rows x 64 float32, in ``--shard-mib`` variables looked
up with the "div" strategy, as large tables are exported) is served by 2 workers x 1 core:

1. ``/dev/shm`` inside a cgroup v1 memory group limited to ``--limit-mib``: refused before writing
   (exit 2, the message of sgserve/models/capacity.py), no OOM kill;
2. ``--segment-dir`` (a directory under bench/.cache) inside the same limited group, madvise hints
   on and off (SGSERVE_SEGMENT_MADVISE=0);
3. ``/dev/shm`` with no limit: the same model fully in RAM, the baseline.

Each serving case runs closed-loop clients sending ``--batch`` Zipf-distributed ids (s =
``--zipf-s``; ranks scattered over the table by a fixed permutation, as hashed ids are) for
``--warmup-s`` then ``--seconds``: QPS, p50/p99, the workers' major page faults per request
(/proc/PID/stat), the cgroup's peak usage and OOM kills, and each worker's private memory (USS,
and the private part of its segment mapping: the marginal memory of one more worker).

    python bench/bench_tiers.py                                     # quick: 1920 MiB under 640 MiB
    python bench/bench_tiers.py --table-mib 3072 --limit-mib 1024   # the issue's full form
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

DIM = 64
CGROUP_V1 = "/sys/fs/cgroup/memory"


def build_model(base: str, table_mib: int, shard_mib: int) -> str:
    """The sharded embedding model, built once in a child process (its memory goes with it)."""
    if os.path.exists(os.path.join(base, "1", "saved_model.pb")):
        return base
    code = f"""
import os, numpy as np, tensorflow as tf
shards, rows = {max(1, table_mib // shard_mib)}, {shard_mib * C.MiB // (DIM * 4)}
class Sharded(tf.Module):
    def __init__(self):
        self.emb = [tf.Variable(np.repeat(np.arange(s * rows, (s + 1) * rows, dtype="float32")[:, None], {DIM}, 1))
                    for s in range(shards)]
    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
    def serve(self, ids):
        return {{"y": tf.reduce_sum(tf.nn.embedding_lookup(self.emb, ids), axis=1)}}
m = Sharded()
tf.saved_model.save(m, {os.path.join(base, "1")!r}, signatures={{"serving_default": m.serve}})
"""
    C.log(f"building a {table_mib} MiB sharded embedding model in {base} ...")
    subprocess.run([sys.executable, "-c", code], check=True)
    return base


@contextlib.contextmanager
def memory_cgroup(limit_mib: int) -> Iterator[str]:
    path = os.path.join(CGROUP_V1, f"sgserve-bench-{os.getpid()}")
    os.mkdir(path)
    try:
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit_mib * C.MiB))
        yield path
    finally:
        deadline = time.monotonic() + 20
        while _read(os.path.join(path, "cgroup.procs")) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.rmdir(path)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def cgroup_figures(cg: str) -> dict[str, int]:
    oom = dict(line.split() for line in _read(os.path.join(cg, "memory.oom_control")).splitlines())
    return {"max_usage": int(_read(os.path.join(cg, "memory.max_usage_in_bytes"))),
            "limit": int(_read(os.path.join(cg, "memory.limit_in_bytes"))), "oom_kill": int(oom.get("oom_kill", 0))}


class CgroupServer(C.Server):
    """C.Server whose command first moves itself into ``cgroup`` (None: no cgroup)."""

    def __init__(self, args: list[str], label: str, cgroup: str | None, env: dict[str, str]) -> None:
        super().__init__(args, label)
        self.cgroup, self.env = cgroup, env

    def start(self, timeout: float = 900.0) -> "CgroupServer":
        cmd = [sys.executable, "-m", "sgserve.cli", "start", "--endpoint", self.endpoint] + self.args
        if self.cgroup:
            cmd = ["sh", "-c", f'echo $$ > {self.cgroup}/cgroup.procs && exec "$0" "$@"'] + cmd
        C.log(f"{self.label}: starting: {' '.join(cmd)}")
        env = dict(os.environ, PYTHONPATH=C.REPO, **self.env)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env, cwd=C.REPO)
        self.wait_ready(timeout)
        return self


def zipf_ids(rows: int, n: int, s: float, seed: int) -> np.ndarray:
    """Zipf(s) ranks over ``rows`` ids, scattered by a fixed permutation (hot ids are not adjacent)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, rows + 1, dtype=np.float64) ** s
    cdf = np.cumsum(weights)
    ranks = np.searchsorted(cdf, rng.random(n) * cdf[-1])
    perm = np.random.default_rng(12345).permutation(rows)
    return perm[np.minimum(ranks, rows - 1)].astype(np.int64)


def majflt(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(_read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[9])
    return total


def drive(srv: C.Server, ids: np.ndarray, batch: int, clients: int, seconds: float) -> dict[str, Any]:
    """Closed-loop clients for ``seconds``; latencies of every request, and errors."""
    stop = time.monotonic() + seconds
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def run(i: int) -> None:
        with contextlib.closing(srv.client(60.0)) as c:
            k = i * 7919
            while time.monotonic() < stop:
                part = ids[(k * batch) % (len(ids) - batch):][:batch]
                k += 1
                t0 = time.perf_counter()
                try:
                    y = c.predict("emb", {"ids": part})["y"]
                    if not np.allclose(y, DIM * part.astype(np.float64), rtol=1e-5):
                        errors.append("wrong answer")
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    errors.append(repr(exc)[:200])
                lat[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    all_lat = [x for one in lat for x in one]
    return {"requests": len(all_lat), "qps": len(all_lat) / wall, "p50_ms": 1e3 * C.pct(all_lat, 50),
            "p99_ms": 1e3 * C.pct(all_lat, 99), "errors": len(errors), "error_sample": errors[:3]}


def serve_case(label: str, base: str, args: Any, cgroup: str | None, segdir: str | None,
               env: dict[str, str]) -> dict[str, Any]:
    extra = ["--segment-dir", segdir] if segdir else []
    srv = CgroupServer(["--model-base-path", base, "--model-name", "emb", "--workers", str(args.workers),
                        "--split-min-rows", "0"] + extra, label, cgroup, env)
    rows = args.table_mib * C.MiB // (DIM * 4)
    ids = zipf_ids(rows, 400_000, args.zipf_s, seed=1)
    try:
        t_load = time.monotonic()
        srv.start()
        load_s = time.monotonic() - t_load
        st = srv.status()
        workers = [w["pid"] for w in st["workers"]]
        version = st["model_status"][0]["versions"][0]
        C.log(f"{label}: warming up {args.warmup_s:.0f} s (Zipf s={args.zipf_s}, batch {args.batch})")
        drive(srv, ids, args.batch, args.clients, args.warmup_s)
        faults0 = majflt(workers)
        C.log(f"{label}: measuring {args.seconds:.0f} s")
        out = drive(srv, ids, args.batch, args.clients, args.seconds)
        out["majflt_per_request"] = (majflt(workers) - faults0) / max(out["requests"], 1)
        prefix = os.path.basename(version["segments"][0])
        mem = [C.process_memory(pid, prefix) for pid in workers]
        out.update(label=label, tier=version.get("tier"), bytes=version["bytes"], start_s=load_s,
                   worker_uss_mib=[round(m["uss_excl_seg"] / C.MiB, 1) for m in mem],
                   worker_seg_private_mib=[round(m["seg_private"] / C.MiB, 1) for m in mem],
                   worker_seg_rss_mib=[round(m["seg_rss"] / C.MiB, 1) for m in mem],
                   worker_pss_mib=[round(m["pss"] / C.MiB, 1) for m in mem])
        if cgroup:
            out["cgroup"] = cgroup_figures(cgroup)
        C.log(f"{label}: {out['qps']:.0f} QPS, p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms, "
              f"{out['majflt_per_request']:.2f} major faults/request, errors {out['errors']}")
        return out
    finally:
        srv.stop()


def refused_case(base: str, args: Any, cgroup: str) -> dict[str, Any]:
    cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$@"', sys.executable, "-m", "sgserve.cli",
           "start", "--endpoint", f"tcp://127.0.0.1:{C.free_port()}", "--model-base-path", base, "--model-name",
           "emb", "--workers", str(args.workers)]
    C.log("/dev/shm under the limit: expecting a refusal")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=C.REPO))
    msg = next((ln for ln in r.stderr.splitlines() if "cannot load model" in ln), r.stderr[-500:])
    C.log(f"exit {r.returncode}: {msg}")
    return {"exit_code": r.returncode, "message": msg, "cgroup": cgroup_figures(cgroup)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table-mib", type=int, default=1920)
    ap.add_argument("--shard-mib", type=int, default=128, help="MiB per table variable (the loader holds one)")
    ap.add_argument("--limit-mib", type=int, default=640, help="memory limit of the cgroup the server runs in")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="ids per request")
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--warmup-s", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--segment-dir", default=os.path.join(C.CACHE_DIR, "tiers", "segments"))
    ap.add_argument("--skip-madvise-off", action="store_true")
    args = ap.parse_args()
    C.sigterm_as_exit()
    base = build_model(os.path.join(C.CACHE_DIR, "tiers", f"emb{args.table_mib}x{args.shard_mib}"),
                       args.table_mib, args.shard_mib)
    os.makedirs(args.segment_dir, exist_ok=True)
    result: dict[str, Any] = {"machine": C.machine_info(), "args": vars(args), "date": time.strftime("%Y-%m-%d"),
                              "disk_free_gib": shutil.disk_usage(args.segment_dir).free / C.GiB}
    with memory_cgroup(args.limit_mib) as cg:
        result["shm_limited"] = refused_case(base, args, cg)
        result["file_limited"] = serve_case("file tier, limited", base, args, cg, args.segment_dir, {})
        if not args.skip_madvise_off:
            result["file_limited_no_madvise"] = serve_case("file tier, limited, no madvise", base, args, cg,
                                                           args.segment_dir, {"SGSERVE_SEGMENT_MADVISE": "0"})
    result["shm_unlimited"] = serve_case("/dev/shm, no limit", base, args, None, None, {})
    result["file_vs_ram_qps"] = result["file_limited"]["qps"] / result["shm_unlimited"]["qps"]
    path = C.write_json(f"tiers_{args.table_mib}mib_under_{args.limit_mib}mib", result)
    print_report(result)
    plot(result, f"tiers_{args.table_mib}mib_under_{args.limit_mib}mib")
    C.log(f"results: {path}")
    return 0


def _cases(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [result[k] for k in ("file_limited", "file_limited_no_madvise", "shm_unlimited") if k in result]


def print_report(result: dict[str, Any]) -> None:
    a = result["args"]
    print(f"\n{a['table_mib']} MiB table, cgroup limit {a['limit_mib']} MiB, {a['workers']} workers, "
          f"{a['clients']} clients x {a['batch']} Zipf(s={a['zipf_s']}) ids")
    r = result["shm_limited"]
    print(f"/dev/shm under the limit: exit {r['exit_code']}, OOM kills {r['cgroup']['oom_kill']}: {r['message']}")
    rows = [[c["label"], f"{c['qps']:.0f}", f"{c['p50_ms']:.2f}", f"{c['p99_ms']:.2f}", f"{c['majflt_per_request']:.2f}",
             c["errors"], "/".join(map(str, c["worker_uss_mib"])), "/".join(map(str, c["worker_seg_private_mib"])),
             f"{c['cgroup']['max_usage'] / C.MiB:.0f}" if "cgroup" in c else "-",
             c["cgroup"]["oom_kill"] if "cgroup" in c else "-"] for c in _cases(result)]
    print(C.table(["case", "QPS", "p50 ms", "p99 ms", "majflt/req", "errors", "worker USS MiB",
                   "seg private MiB", "cgroup peak MiB", "OOM kills"], rows))
    print(f"file tier under the limit / fully in RAM: {100 * result['file_vs_ram_qps']:.0f}% of the QPS")


def plot(result: dict[str, Any], name: str) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    cases = _cases(result)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [c["label"] for c in cases]
    ax1.bar(labels, [c["qps"] for c in cases], color=["tab:blue", "tab:cyan", "tab:gray"][:len(cases)])
    ax1.set_ylabel("QPS")
    ax1.set_title(f"throughput: {result['args']['table_mib']} MiB table, limit {result['args']['limit_mib']} MiB", fontsize=8)
    x = np.arange(len(cases))
    ax2.bar(x - 0.2, [c["p50_ms"] for c in cases], 0.4, label="p50")
    ax2.bar(x + 0.2, [c["p99_ms"] for c in cases], 0.4, label="p99")
    ax2.set_xticks(x, labels)
    ax2.set_ylabel("ms")
    ax2.set_title("latency")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=7)
    a = result["args"]
    fig.suptitle(f"{a['table_mib']} MiB table under a {a['limit_mib']} MiB cgroup limit (file tier) vs in RAM")
    C.save_figure(fig, name, "bench_tiers", result["machine"])


if __name__ == "__main__":
    sys.exit(main())
