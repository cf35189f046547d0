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

Layouts (``--layouts``): ``sgserve`` is the server as it starts by default (workers forked from the
zygote, sgserve/worker/zygote.py); ``sgserve-nozygote`` is the same server with
SGSERVE_WORKER_ZYGOTE=0 (each worker its own process that imports TensorFlow itself); ``naive``
as above.

Marginal memory of an extra worker, and what it is made of: each process's private memory (USS) is
split by /proc/PID/smaps into
- heap: the main thread's malloc heap ([heap]: Python objects over 512 B, TensorFlow's op/kernel
  registries and runtime objects);
- anon: other anonymous mappings (pymalloc's 1 MiB arenas, i.e. small Python objects, and malloc
  blocks too large for the heap);
- arenas: glibc's malloc arenas of the other threads (64 MiB-aligned heaps);
- stacks: thread stacks (the mapping holding a thread's stack pointer, or below a guard page);
- lib data: file-backed pages of libraries made private (relocations, .data, GOT);
- lib bss: the libraries' zero-initialized static data (from their ELF headers, via pagemap);
- other: vdso and the like.
Before the memory is read, ``--tiny-requests`` requests of 16 ids also measure the client's round
trip and the workers' CPU time per request, so that a layout that saves memory but slows requests
shows it.

    python bench/bench_memory.py                     # 1 GiB and 3 GiB, 1..3 workers (RAM allowing)
    python bench/bench_memory.py --sizes-gib 1       # the quick case
    python bench/bench_memory.py --sizes-gib 1 --skip-naive --layouts sgserve,sgserve-nozygote
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import _models  # noqa: E402

MODEL_NAME = "emb"
LAYOUT_ENV = {"sgserve": {}, "sgserve-nozygote": {"SGSERVE_WORKER_ZYGOTE": "0"}}
SG_LAYOUTS = tuple(LAYOUT_ENV)
CATEGORIES = ("heap", "anon", "arenas", "stacks", "lib data", "lib bss", "other")
HEAP_MAX = 64 << 20  # glibc: each non-main malloc arena is a 64 MiB-aligned heap of at most this size
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


def tiny_traffic(endpoint: str, workers: int, n: int, worker_pids: list[int]) -> dict[str, Any]:
    """n requests of 16 random ids (round robin over the workers by routing key): client round trip
    and the workers' CPU time per request, read from their CPU times."""
    import numpy as np  # noqa: PLC0415
    import psutil  # noqa: PLC0415
    from sgserve.client import Client  # noqa: PLC0415

    if n <= 0:
        return {}
    rng = np.random.default_rng(1)
    procs = [psutil.Process(p) for p in worker_pids]
    with Client(endpoint, timeout=60.0) as c:
        for i in range(min(200, n)):  # first calls of this shape
            c.predict(MODEL_NAME, {"ids": rng.integers(0, 1000, 16, dtype=np.int64)}, routing_key=i % workers)
        cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        lat = []
        for i in range(n):
            ids = rng.integers(0, 1000, 16, dtype=np.int64)
            t = time.perf_counter()
            c.predict(MODEL_NAME, {"ids": ids}, routing_key=i % workers)
            lat.append(time.perf_counter() - t)
        cpu1 = sum(sum(p.cpu_times()[:2]) for p in procs)
    return {"requests": n, "p50_us": round(statistics.median(lat) * 1e6, 1),
            "mean_us": round(statistics.mean(lat) * 1e6, 1),
            "worker_cpu_us_per_request": round((cpu1 - cpu0) / n * 1e6, 1)}


# ------------------------------------------------------------------------------ USS breakdown
def _read_smaps(pid: int) -> list[dict[str, Any]]:
    maps: list[dict[str, Any]] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                parts = line.split(None, 5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.append({"lo": lo, "hi": hi, "perms": parts[1], "offset": int(parts[2], 16),
                             "path": parts[5].strip() if len(parts) > 5 else ""})
            elif maps:
                k, _, v = line.partition(":")
                v = v.strip()
                if v.endswith(" kB"):
                    maps[-1][k] = int(v[:-3]) * 1024
    return maps


def _elf_bss(path: str, cache: dict[str, list[tuple[int, int, int]]]) -> list[tuple[int, int, int]]:
    """(first PT_LOAD vaddr, bss start, bss end) vaddr ranges of an ELF file's zero-filled data."""
    if path in cache:
        return cache[path]
    out: list[tuple[int, int, int]] = []
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if ident[:4] == b"\x7fELF" and ident[4] == 2:  # 64-bit, little endian assumed (x86-64, arm64)
                phoff, = struct.unpack_from("<Q", ident, 32)
                phentsize, phnum = struct.unpack_from("<HH", ident, 54)
                f.seek(phoff)
                table = f.read(phentsize * phnum)
                loads = []
                for i in range(phnum):
                    p_type, _flags, _off, vaddr, _pa, filesz, memsz, _align = struct.unpack_from(
                        "<IIQQQQQQ", table, i * phentsize)
                    if p_type == 1:  # PT_LOAD
                        loads.append((vaddr, filesz, memsz))
                if loads:
                    first = min(v for v, _, _ in loads)
                    out = [(first, v + fs, v + ms) for v, fs, ms in loads if ms > fs]
    except OSError:
        pass
    cache[path] = out
    return out


def _exclusive_pages(pid: int, lo: int, hi: int, page: int) -> int:
    """Pages of [lo, hi) that are present and mapped by this process only (pagemap bit 56)."""
    try:
        with open(f"/proc/{pid}/pagemap", "rb") as f:
            f.seek(lo // page * 8)
            buf = f.read((hi - lo) // page * 8)
    except OSError:
        return 0
    n = 0
    for (e,) in struct.iter_unpack("<Q", buf):
        if e >> 63 & 1 and e >> 56 & 1:
            n += 1
    return n


def _thread_stack_pointers(pid: int) -> list[int]:
    sps = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return sps
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                parts = f.read().split()
            if len(parts) >= 3:  # "NR args... SP PC"; a running thread says only "running"
                sps.append(int(parts[-2], 16))
        except (OSError, ValueError):
            pass
    return sps


def smaps_breakdown(pid: int, segment_prefix: str | None = None,
                    elf_cache: dict[str, list[tuple[int, int, int]]] | None = None) -> dict[str, Any]:
    """The process's private memory (USS, bytes) by CATEGORIES (see the module docstring), the
    segment's private part apart, and the libraries that hold most of "lib data" + "lib bss"."""
    page = os.sysconf("SC_PAGE_SIZE")
    elf_cache = {} if elf_cache is None else elf_cache
    maps = _read_smaps(pid)
    sps = _thread_stack_pointers(pid)
    cats = dict.fromkeys(CATEGORIES, 0)
    seg = 0
    libs: dict[str, int] = {}
    bss_ranges: list[tuple[int, int, str]] = []
    bases: dict[str, int] = {}
    for m in maps:
        if m["path"].startswith("/") and m["offset"] == 0 and m["path"] not in bases:
            bases[m["path"]] = m["lo"]
    for path, base in bases.items():
        for first, lo, hi in _elf_bss(path, elf_cache):
            bias = base - (first & ~(page - 1))
            bss_ranges.append((bias + lo, bias + hi, os.path.basename(path)))
    for i, m in enumerate(maps):
        priv = m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)
        if not priv:
            continue
        path = m["path"]
        if segment_prefix and os.path.basename(path).startswith(segment_prefix):
            seg += priv
        elif path == "[heap]":
            cats["heap"] += priv
        elif path == "[stack]":
            cats["stacks"] += priv
        elif path.startswith("["):
            cats["other"] += priv
        elif path:
            cats["lib data"] += priv
            name = os.path.basename(path.split(" (deleted)")[0])
            libs[name] = libs.get(name, 0) + priv
        else:
            prev = maps[i - 1] if i else None
            nxt = maps[i + 1] if i + 1 < len(maps) else None
            if any(m["lo"] <= sp < m["hi"] for sp in sps) or (
                    prev is not None and not prev["path"] and prev["perms"].startswith("---")
                    and prev["hi"] == m["lo"] and prev["hi"] - prev["lo"] <= 1 << 20):
                cats["stacks"] += priv
                continue
            if m["lo"] % HEAP_MAX == 0 and (m["hi"] - m["lo"] == HEAP_MAX or (
                    nxt is not None and not nxt["path"] and nxt["perms"].startswith("---")
                    and nxt["lo"] == m["hi"] and nxt["hi"] - m["lo"] == HEAP_MAX)):
                cats["arenas"] += priv
                continue
            bss = 0
            for lo, hi, name in bss_ranges:
                a, b = max(lo, m["lo"]) // page * page, min(hi, m["hi"])
                if a < b:
                    n = _exclusive_pages(pid, a, b, page) * page
                    bss += n
                    libs[name + " (bss)"] = libs.get(name + " (bss)", 0) + n
            bss = min(bss, priv)
            cats["lib bss"] += bss
            cats["anon"] += priv - bss
    top = sorted(libs.items(), key=lambda kv: -kv[1])[:10]
    return {"categories": cats, "uss_excl_seg": sum(cats.values()), "segment_private": seg,
            "threads": len(os.listdir(f"/proc/{pid}/task")), "top_libraries": dict(top)}


def _role(pid: int, broker: int, worker_pids: dict[int, int]) -> str:
    if pid == broker:
        return "broker"
    if pid in worker_pids:
        return f"worker {worker_pids[pid]}"
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if comm == "sgserve-zygote" or "sgserve.worker.zygote" in cmd:
        return "zygote"
    if "sgserve.models.loader" in cmd:
        return "loader"
    return "other"


def wait_tree_idle(root: int, timeout: float = 90.0, sample: float = 1.0, busy: float = 0.05) -> None:
    """Waits until the server's processes together use under ``busy`` cores, so that every one of
    them (the loader service starts in the background) is measured in its steady state."""
    deadline = time.monotonic() + timeout
    before = C.cpu_of(C.tree_pids(root))
    while time.monotonic() < deadline:
        time.sleep(sample)
        now = C.cpu_of(C.tree_pids(root))
        if now - before < busy * sample:
            return
        before = now
    C.log(f"the server's processes were still busy after {timeout:.0f} s; measuring anyway")


@contextlib.contextmanager
def environment(extra: dict[str, str]) -> Iterator[None]:
    """os.environ with ``extra`` set (the server started inside inherits it), then restored."""
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


def measure_sgserve(base: str, info: dict, workers: int, args, layout: str = "sgserve") -> dict[str, Any]:
    rows = info["rows"]
    sargs = ["--model-base-path", base, "--model-name", MODEL_NAME, "--workers", str(workers),
             "--cpus-per-worker", "1", "--allow-oversubscribe", "--policy", "mod",
             "--worker-timeout", "300"]
    with environment(LAYOUT_ENV[layout]), C.server(sargs, label=f"{layout} W={workers}", timeout=900) as s:
        st = s.status()
        model = st["models"][0]
        seg = model["segment"]
        seg_file = os.path.join(C.SHM, seg.lstrip("/"))
        seg_size = os.stat(seg_file).st_size
        C.log(f"sgserve W={workers}: segment {seg} {seg_size / C.GiB:.3f} GiB; sending traffic "
              f"({workers} x {rows // args.batch} sweep requests of {args.batch} ids + {args.random_requests} random)")
        traffic = sgserve_traffic(s.endpoint, rows, workers, args.batch, args.random_requests, seed=workers)
        tiny = tiny_traffic(s.endpoint, workers, args.tiny_requests, [w["pid"] for w in s.status()["workers"]])
        time.sleep(args.settle)
        wait_tree_idle(s.pid)  # e.g. the loader service, which imports TensorFlow in the background
        st = s.status()
        worker_pids = {w["pid"]: w["index"] for w in st["workers"]}
        prefix = os.path.basename(seg_file)
        procs = []
        elf_cache: dict[str, list[tuple[int, int, int]]] = {}
        for pid in C.tree_pids(s.pid):
            m = C.process_memory(pid, prefix)
            m["role"] = _role(pid, s.pid, worker_pids)
            if m["role"] != "broker":
                m["breakdown"] = smaps_breakdown(pid, prefix, elf_cache)
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
    summary["worker_breakdown_mean"] = {c: int(sum(p["breakdown"]["categories"][c] for p in wk) / len(wk))
                                        for c in CATEGORIES}
    zy = [p for p in procs if p["role"] == "zygote"]
    summary["zygote_uss"] = zy[0]["uss"] if zy else None
    return {"layout": layout, "workers": workers, "tiny_requests": tiny,
            "segment": seg, "segment_bytes": seg_size, "segment_data_bytes": model.get("bytes"),
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
    ap.add_argument("--layouts", default="sgserve,sgserve-nozygote",
                    help="sgserve layouts to measure, comma-separated: sgserve (default server: workers forked "
                         "from the zygote), sgserve-nozygote (SGSERVE_WORKER_ZYGOTE=0)")
    ap.add_argument("--tiny-requests", type=int, default=1000,
                    help="requests of 16 ids before reading memory: round trip and worker CPU per request "
                         "(0: none)")
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
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    unknown = [x for x in layouts if x not in LAYOUT_ENV]
    if unknown:
        ap.error(f"unknown layout(s) {unknown}; known: {', '.join(LAYOUT_ENV)}")
    result: dict[str, Any] = {"benchmark": "bench_memory", "machine": C.machine_info(),
                              "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                              "params": {"sizes_gib": sizes, "batch": args.batch, "random_requests": args.random_requests,
                                         "max_workers": args.max_workers, "layouts": layouts,
                                         "tiny_requests": args.tiny_requests},
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
                                 "build": info, "naive": []}
        for layout in layouts:
            entry[layout] = []
            for w in range(1, max_w + 1):
                r = measure_sgserve(base, info, w, args, layout)
                C.log(f"{layout} W={w}: total PSS {r['summary']['pss_total'] / C.GiB:.2f} GiB, "
                      f"USS-excl-segment + segment {r['summary']['uss_excl_seg_plus_segment'] / C.GiB:.2f} GiB, "
                      f"worker USS-excl-segment {r['summary']['worker_uss_excl_seg_mean'] / C.MiB:.1f} MiB")
                entry[layout].append(r)
        if not args.skip_naive:
            entry["naive"] = measure_naive(base, info, max_w, args)
        for kind in _kinds(entry):
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
        first = next((entry[k] for k in SG_LAYOUTS if entry.get(k)), None)
        sg_probe = first[0]["traffic"]["probe_scores"] if first else None
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


def _kinds(entry: dict[str, Any]) -> list[str]:
    """The layouts measured for one model size, sgserve's first (older results have "sgserve" only)."""
    return [k for k in (*SG_LAYOUTS, "naive") if entry.get(k)]


def _g(b: float | None) -> str:
    return "" if b is None else f"{b / C.GiB:.3f}"


def _m(b: float | None) -> str:
    return "" if b is None else f"{b / C.MiB:.1f}"


def _pct(v) -> str:
    return "" if v is None else f"{v:.1f}%"


def print_report(result: dict[str, Any]) -> None:
    rows = []
    for e in result["sizes"]:
        for kind in _kinds(e):
            for r in e[kind]:
                s = r["summary"]
                rows.append([f"{e['size_gib']:g}", kind, r["workers"], _g(s["pss_total"]), _g(s["uss_total"]),
                             _g(s["uss_excl_seg_plus_segment"]), _g(s.get("unique_bytes")),
                             f"{_g(r.get('marginal_pss'))} {_pct(r.get('marginal_pss_pct_of_model'))}",
                             f"{_g(r.get('marginal_uss_plus_segment'))} {_pct(r.get('marginal_uss_plus_segment_pct_of_model'))}",
                             f"{_g(r.get('marginal_unique'))} {_pct(r.get('marginal_unique_pct_of_model'))}",
                             f"{_g(s['worker_uss_excl_seg_mean'])} {_pct(r.get('worker_uss_pct_of_model'))}"
                             if r["workers"] > 1 else ""])
    print("\nMemory of the whole tree (sgserve: broker + workers + zygote + loader service; naive: the W "
          "processes), GiB (marginal = total with W minus total with W-1, and % of the model's size)")
    print(C.table(["model GiB", "layout", "W", "PSS", "USS", "USS-seg+seg", "unique pages",
                   "marg. PSS", "marg. USS-seg+seg", "marg. unique", "USS-seg per worker"], rows))

    print("\nMarginal memory of the W-th worker, MiB: the growth of the tree's unique pages and PSS, and "
          "one worker's own memory (its USS without the segment: what its exit would free); requests of "
          "16 ids: round trip p50 and the workers' CPU per request")
    mrows = []
    for e in result["sizes"]:
        for kind in (k for k in _kinds(e) if k != "naive"):
            for r in e[kind]:
                s, t = r["summary"], r.get("tiny_requests") or {}
                mrows.append([f"{e['size_gib']:g}", kind, r["workers"], _m(r.get("marginal_unique")),
                              _m(r.get("marginal_pss")), _m(s["worker_uss_excl_seg_mean"]), _m(s.get("zygote_uss")),
                              _m(s["pss_total"]), t.get("p50_us", ""), t.get("worker_cpu_us_per_request", "")])
    print(C.table(["model GiB", "layout", "W", "marg. unique", "marg. PSS", "worker USS-seg", "zygote USS",
                   "tree PSS", "p50 us", "worker CPU us/req"], mrows))

    print("\nWhat one worker's USS (without the segment) is made of, MiB (mean over the workers; the "
          "zygote on its own row)")
    brows = []
    for e in result["sizes"]:
        for kind in (k for k in _kinds(e) if k != "naive"):
            for r in e[kind]:
                b = r["summary"].get("worker_breakdown_mean")
                if b:
                    brows.append([f"{e['size_gib']:g}", kind, r["workers"], "worker"] + [_m(b[c]) for c in CATEGORIES]
                                 + [_m(sum(b.values()))])
                for p in r["processes"]:
                    if p["role"] == "zygote" and p.get("breakdown"):
                        c = p["breakdown"]["categories"]
                        brows.append([f"{e['size_gib']:g}", kind, r["workers"], "zygote"]
                                     + [_m(c[k]) for k in CATEGORIES] + [_m(sum(c.values()))])
    if brows:
        print(C.table(["model GiB", "layout", "W", "process", *CATEGORIES, "total"], brows))

    print("\nPer process (GiB): USS excluding the segment, USS, PSS, segment pages it maps")
    prow = []
    for e in result["sizes"]:
        for kind in (k for k in _kinds(e) if k != "naive"):
            for r in e[kind]:
                for p in r["processes"]:
                    prow.append([f"{e['size_gib']:g}", kind, r["workers"], p["role"], _g(p["uss_excl_seg"]),
                                 _g(p["uss"]), _g(p["pss"]), _g(p["seg_rss"])])
    print(C.table(["model GiB", "layout", "W", "process", "USS-seg", "USS", "PSS", "segment mapped"], prow))


STYLE = {"sgserve": ("tab:blue", "-o"), "sgserve-nozygote": ("tab:orange", "-s"), "naive": ("tab:gray", "--^")}


def plot(result: dict[str, Any], name: str) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    ax = axes[0]
    alphas = [1.0, 0.55, 0.35, 0.25]
    for i, e in enumerate(result["sizes"]):
        for kind in _kinds(e):
            key = "unique_bytes" if all("unique_bytes" in r["summary"] for r in e[kind]) else "pss_total"
            col, style = STYLE.get(kind, ("tab:red", "-x"))
            pts = [(r["workers"], r["summary"][key] / C.GiB) for r in e[kind]]
            ax.plot(*zip(*pts), style, color=col, alpha=alphas[i % len(alphas)],
                    label=f"{e['size_gib']:g} GiB model: {kind} ({'unique pages' if key == 'unique_bytes' else 'PSS'})")
    ax.set_xticks(sorted({r["workers"] for e in result["sizes"] for k in _kinds(e) for r in e[k]}))
    ax.set_xlabel("workers / processes")
    ax.set_ylabel("GiB")
    ax.set_title("Total memory of the serving processes")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    labels, vals, cols = [], [], []
    for e in result["sizes"]:
        for kind in _kinds(e):
            for r in e[kind][1:]:
                v = r.get("marginal_unique")
                if v is None:
                    v = r.get("marginal_pss")
                if v is None:
                    continue
                labels.append(f"{e['size_gib']:g}G {kind} W={r['workers']}")
                vals.append(v / C.MiB)
                cols.append(STYLE.get(kind, ("tab:red", ""))[0])
    ax.bar(range(len(vals)), vals, color=cols)
    ax.axhline(150, color="red", ls="--", lw=1, label="target: 150 MiB")
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(labels, fontsize=6, rotation=60, ha="right")
    ax.set_ylabel("MiB")
    ax.set_title("Marginal memory of the W-th worker (unique pages)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    C.save_figure(fig, name, "bench_memory", result["machine"])


if __name__ == "__main__":
    sys.exit(main())
