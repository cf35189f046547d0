#!/usr/bin/env python
"""Model lifecycle costs through the real CLI: hot swaps under load, incremental updates, warmup.

Every server is `sgserve start --model-base-path BASE --file-system-poll-wait-seconds 0.2 ...`;
versions are published into BASE the way deploy tools do (a hidden copy, made of hard links, then a
rename), and the version table is read from `Client.status()["model_status"]`. Three parts, each
against a baseline measured in the same run:

1. swap: a model with an embedding table (--swap-table-mib) and an MLP, under an open-loop constant
   rate (--rate, or --load-fraction of the capacity a short closed-loop probe measures first). The
   sender records every request (intended send time, latency from the intended time, version,
   worker, status). Each swap: S steady seconds, then version k+1 is published; the swap window runs
   from the publish until version k is END, plus --tail seconds. Reported: p50/p99/max and errors of
   the steady window before the swap and of the swap window, and p99_swap / p99_steady (target
   <= 1.5, zero errors); also the swap window split into its phases (loader writing the segment,
   workers loading, old version unloading).
2. incremental: a model with a big table (--incr-table-mib, 1 GiB by default) and a small dense
   layer; version 2 changes only the dense layer. Once with --no-incremental-updates (the baseline:
   a full load) and once with the defaults (incremental). Reported: publish -> version 2 AVAILABLE
   (wall clock and status load_seconds), publish -> version 1 END, and the peak extra memory during
   the update: every ~20 ms the sum of the server's /dev/shm segments (allocated blocks) and the
   anonymous RSS (RssAnon) of every process of the server tree (broker, workers, loader), minus its
   median over the second before the publish. Ratios incremental / full (target < 0.2). Also
   own_bytes / shared_bytes from status.
3. warmup: the part-1 model; a new version is published and status polled every few ms; as soon as
   it is AVAILABLE one request is sent (its latency is the "first request"), then one more per
   worker until every worker has answered for the new version, then --steady-requests sequential
   requests (the steady latency). With the default warmup and with --no-model-warmup.

4. pacing (bench/_swap_pacing.py): part 1 with every tensor changing, once per `--load-bandwidth`
   setting in --load-bandwidths (a server each, rounds interleaved, one open-loop rate for all):
   load time against p99, the whole swap window and the loader's write alone (RESULTS.md 4.4).
   During parts 1 and 4 a sampler (bench/_lifecycle_probe.py) records each server process's CPU
   (user/kernel), page faults and context switches, and the machine's idle/steal, dirty/writeback
   pages and pressure stalls, reported per phase of each swap; --py-spy dumps the processes' stacks
   during the first swap, --boost-nice shields the run from other sessions' jobs. Set
   SGSERVE_SEGMENT_DIR to run on the file tier; --store-versions N cycles N built versions.

    python bench/bench_lifecycle.py                    # parts 1-3, full sizes (1 GiB incremental model)
    python bench/bench_lifecycle.py --parts pacing --swap-table-mib 1024 --store-versions 2 --swaps 2
    python bench/bench_lifecycle.py --quick            # small and fast (results: bench_lifecycle_quick)
    python bench/bench_lifecycle.py --parts swap,warmup --rate 80

Writes bench/results/NAME.json and NAME.png (NAME: bench_lifecycle, or bench_lifecycle_quick).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import _lifecycle_models as LM  # noqa: E402
import _lifecycle_probe as LP  # noqa: E402
import _swap_pacing as SP  # noqa: E402

MODEL = "m"
PARTS = ("swap", "incremental", "warmup", "pacing")
RUNS_DIR = os.path.join(C.CACHE_DIR, "lifecycle_runs")


# ------------------------------------------------------------------------------------------ helpers
def wall_now() -> float:
    return time.time()


def server_args(base: str, args, extra: list[str]) -> list[str]:
    a = ["--model-base-path", base, "--model-name", MODEL, "--file-system-poll-wait-seconds", "0.2",
         "--workers", str(args.workers), "--cpus-per-worker", str(args.cpus_per_worker), "--log-level", "info",
         "--worker-timeout", "120", "--boot-timeout", "900"]
    if args.workers * args.cpus_per_worker > len(os.sched_getaffinity(0)):
        a.append("--allow-oversubscribe")
    return a + extra


def fresh_base(tag: str) -> str:
    """An empty base path on the same file system as the model store (hard links work)."""
    os.makedirs(RUNS_DIR, exist_ok=True)
    return os.path.join(tempfile.mkdtemp(prefix=f"{tag}-", dir=RUNS_DIR), MODEL)


def drop_base(base: str) -> None:
    shutil.rmtree(os.path.dirname(base), ignore_errors=True)


def versions_of(status: dict[str, Any]) -> dict[int, dict[str, Any]]:
    for m in status.get("model_status", []):
        if m["name"] == MODEL:
            return {int(v["version"]): v for v in m["versions"]}
    return {}


def state(vs: dict[int, dict[str, Any]], v: int) -> str | None:
    return (vs.get(v) or {}).get("state")


def version_row(info: dict[str, Any] | None) -> dict[str, Any]:
    """The status fields this benchmark reports for one version."""
    if not info:
        return {}
    keys = ("version", "state", "bytes", "own_bytes", "shared_bytes", "load_seconds", "warmup", "available_since",
            "workers", "error")
    return {k: info.get(k) for k in keys}


def request_ids(batch: int, n: int, seed: int):
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, 1 << 40, batch, dtype=np.int64)} for _ in range(n)]


def stats(lat_ms: list[float]) -> dict[str, Any]:
    return {"p50_ms": round(C.pct(lat_ms, 50), 3), "p99_ms": round(C.pct(lat_ms, 99), 3),
            "max_ms": round(max(lat_ms), 3) if lat_ms else None,
            "mean_ms": round(sum(lat_ms) / len(lat_ms), 3) if lat_ms else None}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or a != a or b != b:  # None, zero or NaN
        return None
    return round(a / b, 3)


_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
_LOG_PATTERNS = [
    ("loader_start", re.compile(r"model '[^']+': loading version (\d+)")),
    ("segment", re.compile(r"version (\d+): segment written \(([\d.]+) MiB new, ([\d.]+) MiB shared\) in ([\d.]+) s")),
    ("worker_load_start", re.compile(r"worker (\d+): loading \S+ version (\d+)")),
    ("worker_loaded", re.compile(r"worker (\d+) loaded \S+ version (\d+) in ([\d.]+) s")),
    ("available", re.compile(r"version (\d+) AVAILABLE on (\d+) worker\(s\), ([\d.]+) s after it was found")),
    ("unloading", re.compile(r"version (\d+) UNLOADING")),
    ("worker_unloaded", re.compile(r"\[worker (\d+) pid \d+\] INFO unloaded \S+ version (\d+)")),
    ("end", re.compile(r"version (\d+) END")),
    ("warmup", re.compile(r"\[worker (\d+) pid \d+\] INFO \S+ version (\d+): (\d+) warmup request\(s\) from (.+) in ([\d.]+) s")),
]


def server_log_events(path: str) -> list[dict[str, Any]]:
    """Lifecycle lines of a server log (--log-level info), each with its time (epoch seconds, from the
    log's local-time stamp, so comparable with time.time())."""
    out = []
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return out
    for line in lines:
        ts = _LOG_TS.match(line)
        t = time.mktime(time.strptime(ts.group(1), "%Y-%m-%d %H:%M:%S")) + int(ts.group(2)) / 1000.0 if ts else None
        for kind, pat in _LOG_PATTERNS:
            m = pat.search(line)
            if not m:
                continue
            g = m.groups()
            e: dict[str, Any] = {"event": kind, "t": t}
            if kind in ("loader_start", "available", "unloading", "end"):
                e["version"] = int(g[0])
            if kind == "available":
                e["found_to_available_s"] = float(g[2])
            elif kind == "segment":
                e.update(version=int(g[0]), new_mib=float(g[1]), shared_mib=float(g[2]), seconds=float(g[3]))
            elif kind in ("worker_load_start", "worker_unloaded"):
                e.update(worker=int(g[0]), version=int(g[1]))
            elif kind == "worker_loaded":
                e.update(worker=int(g[0]), version=int(g[1]), seconds=float(g[2]))
            elif kind == "warmup":
                e.update(worker=int(g[0]), version=int(g[1]), requests=int(g[2]), source=g[3], seconds=float(g[4]))
            out.append(e)
            break
    return out


def events_for(events: list[dict[str, Any]], version: int, t_pub: float | None = None) -> dict[str, Any]:
    """What the server log says about loading ``version`` and unloading ``version - 1``; times in
    seconds after ``t_pub`` (the publish) when given."""
    def first(kind: str, v: int) -> dict[str, Any] | None:
        return next((e for e in events if e["event"] == kind and e.get("version") == v), None)

    def rel(e: dict[str, Any] | None) -> float | None:
        if e is None or e.get("t") is None or t_pub is None:
            return None
        return round(e["t"] - t_pub, 3)

    seg, start = first("segment", version), first("loader_start", version)
    avail = first("available", version)
    unloaded = [e for e in events if e["event"] == "worker_unloaded" and e["version"] == version - 1]
    out = {"loader_seconds": seg["seconds"] if seg else None,
           "loader_new_mib": seg["new_mib"] if seg else None,
           "loader_shared_mib": seg["shared_mib"] if seg else None,
           # loader process start -> segment written, minus the write itself: Python + TensorFlow start-up
           "loader_process_s": round(seg["t"] - start["t"], 3) if seg and start and seg["t"] and start["t"] else None,
           "worker_load_seconds": [e["seconds"] for e in events if e["event"] == "worker_loaded" and e["version"] == version],
           "worker_warmup_seconds": [e["seconds"] for e in events if e["event"] == "warmup" and e["version"] == version],
           # per worker: AVAILABLE -> "unloaded VERSION-1" (the worker's serve loop runs the unload)
           "old_unload_done_after_available_s": {
               str(e["worker"]): round(e["t"] - avail["t"], 3) for e in unloaded
               if avail and e.get("t") is not None and avail.get("t") is not None},
           "t_rel": {"loader_start": rel(start), "segment_written": rel(seg), "available": rel(avail),
                     "old_end": rel(first("end", version - 1))}}
    return out


def quiet(args) -> float:
    return C.wait_quiet(max_cores=0.3, timeout=args.quiet_wait)


# ------------------------------------------------------------------------------------ status watch
class StatusWatch:
    """Polls the server's status from a thread; remembers when each (version, state) was first seen,
    and when each version's segment was first reported written (bytes > 0)."""

    def __init__(self, endpoint: str, every: float = 0.05) -> None:
        from sgserve.client import Client  # noqa: PLC0415

        self.client = Client(endpoint, timeout=10.0)
        self.every = every
        self.first_seen: dict[tuple[int, str], float] = {}
        self.latest: dict[int, dict[str, Any]] = {}
        self.polls = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="status-watch")

    def __enter__(self) -> "StatusWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(15)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                vs = versions_of(self.client.status())
            except Exception:  # noqa: BLE001 - a missed poll is not fatal
                self.errors += 1
                self._stop.wait(self.every)
                continue
            now = wall_now()
            self.polls += 1
            for v, info in vs.items():
                self.first_seen.setdefault((v, info["state"]), now)
                if info.get("bytes", 0) > 0:
                    self.first_seen.setdefault((v, "SEGMENT"), now)
            self.latest = vs
            self._stop.wait(self.every)

    def wait_for(self, what: str, pred: Callable[[dict[int, dict[str, Any]]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        last_note = time.monotonic()
        while time.monotonic() < deadline:
            if pred(self.latest):
                return True
            if time.monotonic() - last_note > 15:
                last_note = time.monotonic()
                now = {v: i["state"] for v, i in sorted(self.latest.items())}
                C.log(f"  still waiting for {what}: {now}")
            time.sleep(0.01)
        C.log(f"  TIMED OUT after {timeout:.0f} s waiting for {what}; status: "
              f"{ {v: i['state'] for v, i in self.latest.items()} }")
        return False


# ------------------------------------------------------------------------------------ open loop
class OpenLoop:
    """Constant-rate open-loop sender: request i is due at t0 + i / rate whatever the server does.

    A fixed pool of sender threads claims the due times in order; the latency counts from the due
    (intended) time, so a stall shows in the latencies instead of lowering the load. Every request
    is recorded: (intended wall time, latency ms, version, worker, status code, send lag ms).
    """

    def __init__(self, endpoint: str, rate: float, payloads: list[dict[str, Any]], senders: int,
                 timeout: float = 30.0) -> None:
        from sgserve.client import Client  # noqa: PLC0415

        self.client = Client(endpoint, timeout=timeout)
        self.rate, self.payloads, self.timeout = rate, payloads, timeout
        self.records: list[tuple[float, float, int, int, str, float]] = []
        self._lock = threading.Lock()
        self._i = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True, name=f"open-loop-{k}")
                         for k in range(senders)]
        self._perf0 = self._wall0 = 0.0

    def start(self) -> "OpenLoop":
        self._perf0 = time.perf_counter() + 0.05
        self._wall0 = wall_now() + 0.05
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        self.client.close()

    def _claim(self) -> float:
        with self._lock:
            i = self._i
            self._i += 1
        return self._perf0 + i / self.rate

    def _run(self, k: int) -> None:
        from sgserve.errors import ServeError  # noqa: PLC0415

        n = 0
        while True:
            due = self._claim()
            delay = due - time.perf_counter()
            if delay > 0 and self._stop.wait(delay):
                return
            if self._stop.is_set():
                return
            sent = time.perf_counter()
            version = worker = -1
            try:
                r = self.client.predict_full(MODEL, self.payloads[(k + n) % len(self.payloads)])
                code, version, worker = "200", int(r.version), int(r.worker)
            except ServeError as exc:
                code = str(exc.code)
            except Exception as exc:  # noqa: BLE001 - count it, keep the load going
                code = f"client:{type(exc).__name__}"
            done = time.perf_counter()
            n += 1
            self.records.append((self._wall0 + (due - self._perf0), (done - due) * 1000.0, version, worker, code,
                                 (sent - due) * 1000.0))


def window(records: list[tuple], t0: float, t1: float) -> dict[str, Any]:
    """Requests whose intended send time is in [t0, t1)."""
    sel = [r for r in records if t0 <= r[0] < t1]
    ok = [r[1] for r in sel if r[4] == "200"]
    codes = collections.Counter(r[4] for r in sel if r[4] != "200")
    out = {"seconds": round(t1 - t0, 3), "requests": len(sel), "ok": len(ok), "errors": sum(codes.values()),
           "error_codes": dict(codes), "late_sends": sum(1 for r in sel if r[5] > 10.0),
           "versions": {str(k): v for k, v in sorted(collections.Counter(r[2] for r in sel if r[4] == "200").items())}}
    out.update(stats(ok))
    return out


def probe_capacity(endpoint: str, batch: int, concurrency: int, seconds: float) -> dict[str, Any]:
    from sgserve.bench import loadgen  # noqa: PLC0415

    cfg = loadgen.BenchConfig(endpoint=endpoint, model=MODEL, concurrency=concurrency, duration=seconds,
                              warmup=1.0, batch_size=batch, timeout=30.0)
    r = loadgen.run_bench(cfg, progress=False)
    return {"qps": r.qps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors, "concurrency": concurrency,
            "seconds": seconds, "loadgen_cpu": r.loadgen_cpu}


# ------------------------------------------------------------------------------------ part 1: swap
def swap_store(args, versions: int) -> tuple[str, dict]:
    """The swap model's store; with --store-versions N, N versions published in turn (1..N, 1, ...)."""
    return LM.ensure("swap", table_mib=args.swap_table_mib, versions=args.store_versions or versions,
                     width=args.swap_width, depth=args.swap_depth, change=args.swap_change)


def stored(args, info: dict, k: int) -> int:
    """Which stored version is published as version k (they cycle with --store-versions)."""
    n = len(info["versions"])
    return (k - 1) % n + 1


def swap_versions_needed(args) -> int:
    """One store serves parts 1 and 3 (same cache key for both)."""
    return max(args.swaps, args.warmup_rounds * 2) + 1


def part_swap(args, extra: list[str] | None = None) -> dict[str, Any]:
    store, info = swap_store(args, swap_versions_needed(args))
    base = fresh_base("swap")
    extra = list(args.server_arg) if extra is None else extra
    out: dict[str, Any] = {"model": info, "batch": args.batch, "swaps": [], "server_extra": extra,
                           "segment_dir": os.environ.get("SGSERVE_SEGMENT_DIR")}
    try:
        LM.publish(store, base, 1)
        out["other_load_before"] = quiet(args)
        with C.server(server_args(base, args, extra), label="lifecycle-swap", timeout=900) as s, \
                LP.SwapProbe(s.pid, every=0.05) as sampler:
            if args.boost_nice:
                out["boost_failed"] = LP.boost_autogroups([s.pid, os.getpid()], args.boost_nice)
                out["boost_nice"] = args.boost_nice
            if args.rate:
                rate = args.rate
                out["rate_source"] = "--rate"
            else:
                C.log(f"swap: closed-loop capacity probe ({args.probe_seconds:g} s, concurrency {2 * args.workers}, "
                      f"batch {args.batch})")
                out["probe"] = probe_capacity(s.endpoint, args.batch, 2 * args.workers, args.probe_seconds)
                rate = max(1.0, round(out["probe"]["qps"] * args.load_fraction, 1))
                out["rate_source"] = f"{args.load_fraction:g} x probed capacity {out['probe']['qps']:g}/s"
            out["rate"] = rate
            C.log(f"swap: open loop at {rate:g} requests/s ({out['rate_source']}), {args.senders} sender threads")
            sender = OpenLoop(s.endpoint, rate, request_ids(args.batch, 16, seed=1), args.senders).start()
            try:
                with StatusWatch(s.endpoint, every=0.05) as watch:
                    time.sleep(args.warm_seconds)  # not measured
                    for k in range(2, 2 + args.swaps):
                        t_steady = wall_now()
                        time.sleep(args.steady_seconds)
                        t_pub = wall_now()
                        LM.publish(store, base, k, source=stored(args, info, k))
                        C.log(f"swap {k - 1}/{args.swaps}: published version {k}")
                        if args.py_spy and k == 2:
                            out["stacks"] = LP.dump_stacks_when(sampler, lambda: (k, "LOADING") in watch.first_seen,
                                                                args.py_spy_delay)
                        okay = watch.wait_for(f"version {k} AVAILABLE and {k - 1} END",
                                              lambda vs, k=k: state(vs, k) == "AVAILABLE" and state(vs, k - 1) == "END",
                                              args.swap_timeout)
                        snap = version_row(watch.latest.get(k))
                        t_end = watch.first_seen.get((k - 1, "END"), wall_now())
                        time.sleep(args.tail_seconds)
                        rel = {name: (round(watch.first_seen[(k, st)] - t_pub, 3) if (k, st) in watch.first_seen else None)
                               for name, st in (("found", "LOADING"), ("segment_written", "SEGMENT"),
                                                ("available_seen", "AVAILABLE"))}
                        rel["available"] = round(snap["available_since"] - t_pub, 3) if snap.get("available_since") else None
                        rel["old_unloading_seen"] = (round(watch.first_seen[(k - 1, "UNLOADING")] - t_pub, 3)
                                                     if (k - 1, "UNLOADING") in watch.first_seen else None)
                        rel["old_end_seen"] = round(t_end - t_pub, 3)
                        out["swaps"].append({"to_version": k, "completed": okay, "t_steady": t_steady, "t_publish": t_pub,
                                             "t_old_end": t_end, "t_window_end": t_end + args.tail_seconds,
                                             "timeline_s": rel, "new_version_status": snap})
                        C.log(f"swap {k - 1}: version {k} AVAILABLE {rel['available']} s, version {k - 1} END "
                              f"{rel['old_end_seen']} s after the publish")
                        if not okay:
                            break
                    t_after = wall_now()
                    time.sleep(args.steady_seconds)
                    t_done = wall_now()
                    out["status_polls"] = watch.polls
            finally:
                sender.stop()
            records = sender.records
            events = server_log_events(s.log_file.name)
        out["server_warnings"] = s.problems
        out["leftover_segments"] = s.leftovers
    finally:
        drop_base(base)
    # ---- analysis
    steady_all: list[float] = []
    for sw in out["swaps"]:
        t_pub = sw["t_publish"]
        steady = window(records, sw["t_steady"], t_pub)
        steady["machine"] = sampler.deltas(sw["t_steady"], t_pub)
        swap = window(records, t_pub, sw["t_window_end"])
        swap["machine"] = sampler.deltas(t_pub, sw["t_window_end"])
        steady_all += [r[1] for r in records if sw["t_steady"] <= r[0] < t_pub and r[4] == "200"]
        tl = dict(sw["timeline_s"])
        logt = events_for(events, sw["to_version"], t_pub)["t_rel"]
        seg_t = logt["segment_written"] if logt["segment_written"] is not None else tl.get("segment_written")
        avail_t = tl.get("available") if tl.get("available") is not None else logt["available"]
        end_t = logt["old_end"] if logt["old_end"] is not None else tl.get("old_end_seen")
        bounds = [("loader writes segment", 0.0, seg_t),
                  ("workers load + warm", seg_t, avail_t),
                  ("old version drains + unloads", avail_t, end_t)]
        phases = []
        for name, a, b in bounds:
            if a is None or b is None or b <= a:
                continue
            ph = window(records, t_pub + a, t_pub + b)
            ph["phase"] = name
            ph["from_s"], ph["to_s"] = a, b
            ph["machine"] = sampler.deltas(t_pub + a, t_pub + b)
            phases.append(ph)
        k = sw["to_version"]
        answered = sorted((r[0], r[2]) for r in records if r[4] == "200" and r[2] in (k - 1, k))
        first_new = next((t for t, v in answered if v == k), None)
        last_old = max((t for t, v in answered if v == k - 1), default=None)
        sw.update(steady=steady, swap=swap, phases=phases, p99_ratio=ratio(swap["p99_ms"], steady["p99_ms"]),
                  max_ratio=ratio(swap["max_ms"], steady["max_ms"]),
                  first_new_answer_s=round(first_new - t_pub, 3) if first_new else None,
                  last_old_answer_s=round(last_old - t_pub, 3) if last_old else None,
                  old_answers_after_first_new=sum(1 for t, v in answered if v == k - 1 and first_new and t > first_new),
                  server_log=events_for(events, k, t_pub))
    out["steady_all"] = {**stats(steady_all), "ok": len(steady_all)}
    for sw in out["swaps"]:
        sw["p99_ratio_vs_all_steady"] = ratio(sw["swap"]["p99_ms"], out["steady_all"]["p99_ms"])
    t_first = records[0][0] if records else 0.0
    out["after"] = window(records, t_after, t_done) if out["swaps"] else None
    out["total"] = window(records, t_first, float("inf"))
    out["t0"] = t_first
    # requests for the plot, [t since the first intended send, latency ms, version, ok]: every error and
    # every slow one (above the overall p99), plus an even sample of the rest (keeps the JSON small)
    p99_all = out["total"]["p99_ms"]
    slow = [r for r in records if r[4] != "200" or r[1] > p99_all]
    rest = [r for r in records if not (r[4] != "200" or r[1] > p99_all)]
    step = max(1, len(rest) // max(1, args.plot_points - len(slow)))
    keep = sorted(slow + rest[::step])
    out["records"] = [[round(r[0] - t_first, 3), round(r[1], 2), r[2], 1 if r[4] == "200" else 0] for r in keep]
    out["records_note"] = (f"{len(keep)} of {len(records)} requests: all errors and all above the overall p99, "
                           f"and every {step}th of the rest")
    return out


# ------------------------------------------------------------------------------------ part 2: incremental
class MemSampler:
    """Every `every` s: bytes allocated by the server's /dev/shm segments, and RssAnon of every
    process in the server's tree (loader counted separately)."""

    def __init__(self, server_pid: int, every: float = 0.02) -> None:
        self.pid = server_pid
        self.prefix = f"sgserve_{server_pid}_"
        self.every = every
        self.samples: list[tuple[float, int, int, int, int]] = []  # (wall, shm, anon total, anon loader, #procs)
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mem-sampler")

    def __enter__(self) -> "MemSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _children(self, pid: int) -> list[int]:
        kids = []
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        kids += [int(x) for x in f.read().split()]
                except OSError:
                    pass
        except OSError:
            pass
        return kids

    def _tree(self) -> list[int]:
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += self._children(p)
        return out

    def _role(self, pid: int) -> str:
        r = self._roles.get(pid)
        if r is None:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                return "gone"
            r = self._roles[pid] = "loader" if "sgserve.models.loader" in cmd else "other"
        return r

    @staticmethod
    def _anon(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def shm_bytes(self) -> int:
        total = 0
        try:
            with os.scandir(C.SHM) as it:
                for e in it:
                    if e.name.startswith(self.prefix):
                        try:
                            total += e.stat().st_blocks * 512
                        except OSError:
                            pass
        except OSError:
            pass
        return total

    def sample(self) -> tuple[float, int, int, int, int]:
        pids = self._tree()
        anon = loader = 0
        for p in pids:
            a = self._anon(p)
            anon += a
            if self._role(p) == "loader":
                loader += a
        return (wall_now(), self.shm_bytes(), anon, loader, len(pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.every)


def incremental_round(args, store: str, incremental: bool) -> dict[str, Any]:
    label = "incremental" if incremental else "full"
    base = fresh_base(f"incr-{label}")
    extra = [] if incremental else ["--no-incremental-updates"]
    out: dict[str, Any] = {"mode": label, "flags": extra}
    try:
        LM.publish(store, base, 1)
        with C.server(server_args(base, args, extra), label=f"lifecycle-{label}", timeout=900) as s:
            with s.client(30.0) as c:  # touch the model once (both workers), so steady memory is steady
                for p in request_ids(64, 2 * args.workers, seed=3):
                    c.predict(MODEL, p)
            out["other_load_before"] = quiet(args)
            with MemSampler(s.pid, every=args.mem_interval) as mem, StatusWatch(s.endpoint, every=0.02) as watch:
                time.sleep(args.mem_baseline_seconds)
                t_pub = wall_now()
                LM.publish(store, base, 2)
                C.log(f"{label}: published version 2")
                okay = watch.wait_for("version 2 AVAILABLE and 1 END",
                                      lambda vs: state(vs, 2) == "AVAILABLE" and state(vs, 1) == "END",
                                      args.swap_timeout)
                t_end = watch.first_seen.get((1, "END"), wall_now())
                time.sleep(args.mem_after_seconds)
                v2 = version_row(watch.latest.get(2))
                v1 = version_row(watch.latest.get(1))
            with s.client(30.0) as c:
                answered = {c.predict_full(MODEL, p).version for p in request_ids(16, 4, seed=4)}
            events = server_log_events(s.log_file.name)
            samples = mem.samples
        out["server_warnings"] = s.problems
        out["leftover_segments"] = s.leftovers
    finally:
        drop_base(base)
    before = [x for x in samples if x[0] < t_pub and x[0] >= t_pub - args.mem_baseline_seconds + 0.2]
    during = [x for x in samples if x[0] >= t_pub]
    after = [x for x in samples if x[0] >= t_end + max(0.0, args.mem_after_seconds - 0.5)]

    def med(rows, idx):
        return int(C.median([r[idx] for r in rows])) if rows else None

    def tot(r):
        return r[1] + r[2]

    steady_total = int(C.median([tot(r) for r in before])) if before else None
    peak = max(during, key=tot) if during else None
    out.update({
        "completed": okay,
        "answered_versions_after": sorted(answered),
        "publish_to_available_s": round(v2["available_since"] - t_pub, 3) if v2.get("available_since") else None,
        "publish_to_old_end_s": round(t_end - t_pub, 3),
        "status_load_seconds": v2.get("load_seconds"),
        "timeline_s": {name: (round(watch.first_seen[key] - t_pub, 3) if key in watch.first_seen else None)
                       for name, key in (("found", (2, "LOADING")), ("segment_written", (2, "SEGMENT")),
                                         ("available_seen", (2, "AVAILABLE")), ("old_end_seen", (1, "END")))},
        "version2_status": v2, "version1_status": v1,
        "server_log": events_for(events, 2, t_pub),
        "memory": {
            "interval_s": args.mem_interval, "samples": len(samples),
            "steady_total_bytes": steady_total,
            "steady_shm_bytes": med(before, 1), "steady_anon_bytes": med(before, 2),
            "peak_total_bytes": tot(peak) if peak else None,
            "peak_extra_bytes": tot(peak) - steady_total if peak and steady_total is not None else None,
            "peak_extra_at_s": round(peak[0] - t_pub, 3) if peak else None,
            "peak_extra_shm_bytes": (max(r[1] for r in during) - med(before, 1)) if during and before else None,
            "peak_extra_anon_bytes": (max(r[2] for r in during) - med(before, 2)) if during and before else None,
            "peak_loader_anon_bytes": max((r[3] for r in during), default=0),
            "after_extra_bytes": (int(C.median([tot(r) for r in after])) - steady_total) if after and before else None,
            "after_shm_bytes": med(after, 1),
            # [t since publish, shm MiB, anon MiB, loader anon MiB], thinned to <= 800 points, for the plot
            "timeline": [[round(r[0] - t_pub, 3), round(r[1] / C.MiB, 1), round(r[2] / C.MiB, 1), round(r[3] / C.MiB, 1)]
                         for r in samples[::max(1, len(samples) // 800)]],
        },
    })
    m = out["memory"]
    C.log(f"{label}: version 2 AVAILABLE {out['publish_to_available_s']} s after the publish "
          f"(status load_seconds {out['status_load_seconds']}), version 1 END {out['publish_to_old_end_s']} s; "
          f"peak extra memory {_mib(m['peak_extra_bytes'])} MiB (shm {_mib(m['peak_extra_shm_bytes'])}, "
          f"anon {_mib(m['peak_extra_anon_bytes'])}, loader anon {_mib(m['peak_loader_anon_bytes'])}); "
          f"own {_mib(v2.get('own_bytes'))} MiB, shared {_mib(v2.get('shared_bytes'))} MiB")
    return out


def part_incremental(args) -> dict[str, Any]:
    store, info = LM.ensure("incremental", table_mib=args.incr_table_mib, versions=2)
    out: dict[str, Any] = {"model": info, "rounds": []}
    for rep in range(args.incr_repeats):
        for incremental in (False, True):  # the baseline first, interleaved when repeated
            r = incremental_round(args, store, incremental)
            r["repeat"] = rep
            out["rounds"].append(r)

    def med(mode: str, key: Callable[[dict], Any]) -> float | None:
        vals = [key(r) for r in out["rounds"] if r["mode"] == mode and key(r) is not None]
        return C.median(vals) if vals else None

    summary = {}
    for mode in ("full", "incremental"):
        summary[mode] = {
            "publish_to_available_s": med(mode, lambda r: r["publish_to_available_s"]),
            "status_load_seconds": med(mode, lambda r: r["status_load_seconds"]),
            "publish_to_old_end_s": med(mode, lambda r: r["publish_to_old_end_s"]),
            "loader_seconds": med(mode, lambda r: r["server_log"]["loader_seconds"]),
            "loader_process_s": med(mode, lambda r: r["server_log"]["loader_process_s"]),
            "peak_extra_bytes": med(mode, lambda r: r["memory"]["peak_extra_bytes"]),
            "peak_extra_shm_bytes": med(mode, lambda r: r["memory"]["peak_extra_shm_bytes"]),
            "peak_extra_anon_bytes": med(mode, lambda r: r["memory"]["peak_extra_anon_bytes"]),
            "after_extra_bytes": med(mode, lambda r: r["memory"]["after_extra_bytes"]),
            "own_bytes": med(mode, lambda r: r["version2_status"].get("own_bytes")),
            "shared_bytes": med(mode, lambda r: r["version2_status"].get("shared_bytes")),
        }
    f, i = summary["full"], summary["incremental"]
    summary["ratios_incremental_over_full"] = {
        k: ratio(i[k], f[k]) for k in ("publish_to_available_s", "status_load_seconds", "publish_to_old_end_s",
                                       "loader_seconds", "loader_process_s", "peak_extra_bytes",
                                       "peak_extra_shm_bytes")}
    out["summary"] = summary
    return out


# ------------------------------------------------------------------------------------ part 3: warmup
def warmup_round(c, store: str, base: str, k: int, args, payloads, trigger: str) -> dict[str, Any]:
    """Publishes version k; once status says it is AVAILABLE (trigger "available") or once the old
    version is END as well ("old_end"), sends requests one at a time until every worker has
    answered for version k (the first ones), then the steady ones."""
    t_pub = wall_now()
    LM.publish(store, base, k)
    deadline = time.monotonic() + args.swap_timeout
    polls = 0
    vs: dict[int, dict[str, Any]] = {}

    def ready(vs: dict[int, dict[str, Any]]) -> bool:
        if state(vs, k) != "AVAILABLE":
            return False
        return trigger == "available" or state(vs, k - 1) in ("END", None)

    while time.monotonic() < deadline:
        vs = versions_of(c.status())
        polls += 1
        if ready(vs):
            break
        time.sleep(args.poll_interval)
    else:
        raise RuntimeError(f"version {k} not ready ({trigger}) after {args.swap_timeout:g} s: {vs}")
    t_seen = wall_now()
    firsts = []  # (latency ms, version, worker) until every worker answered once for version k
    workers_seen: set[int] = set()
    for n in range(4 * args.workers + 4):
        t0 = time.perf_counter()
        r = c.predict_full(MODEL, payloads[n % len(payloads)])
        firsts.append((round((time.perf_counter() - t0) * 1000.0, 3), int(r.version), int(r.worker)))
        if r.version == k:
            workers_seen.add(int(r.worker))
        if len(workers_seen) >= args.workers:
            break
    first_per_worker: dict[int, float] = {}
    for lat, v, w in firsts:
        if v == k and w not in first_per_worker:
            first_per_worker[w] = lat
    # steady: once the old version is gone (its unload is part of the swap, not of the new version)
    while time.monotonic() < deadline and state(versions_of(c.status()), k - 1) not in ("END", None):
        time.sleep(0.05)
    steady = []
    for n in range(args.steady_requests):
        t0 = time.perf_counter()
        c.predict_full(MODEL, payloads[n % len(payloads)])
        steady.append((time.perf_counter() - t0) * 1000.0)
    info = version_row(vs.get(k))
    steady_p50 = C.median(steady)
    worst = max(first_per_worker.values()) if first_per_worker else None
    return {"version": k, "trigger": trigger, "t_publish": t_pub, "t_trigger_seen": t_seen,
            "available_after_publish_s": round(info["available_since"] - t_pub, 3)
            if info.get("available_since") else None,
            "trigger_seen_after_available_s": round(t_seen - info["available_since"], 4)
            if info.get("available_since") else None,
            "status_polls": polls, "first_ms": firsts[0][0], "first_version": firsts[0][1],
            "first_worker": firsts[0][2],
            "first_per_worker_ms": {str(w): v for w, v in sorted(first_per_worker.items())},
            "worst_first_per_worker_ms": worst, "first_requests": firsts, "steady_p50_ms": round(steady_p50, 3),
            "steady_p99_ms": round(C.pct(steady, 99), 3), "steady_max_ms": round(max(steady), 3),
            "first_ratio": ratio(firsts[0][0], steady_p50), "worst_first_ratio": ratio(worst, steady_p50),
            "warmup": info.get("warmup"), "load_seconds": info.get("load_seconds")}


def part_warmup(args) -> dict[str, Any]:
    triggers = ["available"] + (["old_end"] if args.warmup_after_end else [])
    store, info = swap_store(args, swap_versions_needed(args))
    out: dict[str, Any] = {"model": info, "batch": args.batch, "triggers": triggers, "modes": {}}
    payloads = request_ids(args.batch, 8, seed=5)
    for warm in (True, False):
        label = "warmup" if warm else "no-warmup"
        base = fresh_base(f"warm-{label}")
        rounds = []
        try:
            LM.publish(store, base, 1)
            extra = [] if warm else ["--no-model-warmup"]
            with C.server(server_args(base, args, extra), label=f"lifecycle-{label}", timeout=900) as s:
                with s.client(60.0) as c:
                    for _ in range(3):
                        c.predict_full(MODEL, payloads[0])
                    k = 2
                    for _ in range(args.warmup_rounds):
                        for trigger in triggers:  # interleaved
                            load = quiet(args)
                            r = warmup_round(c, store, base, k, args, payloads, trigger)
                            r["other_load_before"] = load
                            rounds.append(r)
                            C.log(f"{label}: version {k} ({trigger}): first request {r['first_ms']:.1f} ms (first per "
                                  f"worker {r['first_per_worker_ms']}), steady p50 {r['steady_p50_ms']:.2f} ms "
                                  f"(x{r['first_ratio']}); warmup {r['warmup']}")
                            k += 1
                events = server_log_events(s.log_file.name)
            warnings = s.problems
        finally:
            drop_base(base)
        for r in rounds:
            r["server_log"] = events_for(events, r["version"], r["t_publish"])
        by_trigger = {}
        for trigger in triggers:
            rs = [r for r in rounds if r["trigger"] == trigger]
            by_trigger[trigger] = {
                "rounds": len(rs),
                "first_ms_median": C.median([r["first_ms"] for r in rs]),
                "worst_first_per_worker_ms_median": C.median([r["worst_first_per_worker_ms"] for r in rs
                                                               if r["worst_first_per_worker_ms"] is not None]),
                "steady_p50_ms_median": C.median([r["steady_p50_ms"] for r in rs]),
                "first_ratio_median": C.median([r["first_ratio"] for r in rs if r["first_ratio"] is not None]),
                "worst_first_ratio_median": C.median([r["worst_first_ratio"] for r in rs
                                                      if r["worst_first_ratio"] is not None]),
            }
        out["modes"][label] = {"flags": extra, "rounds": rounds, "server_warnings": warnings,
                               "by_trigger": by_trigger}
    out["no_warmup_over_warmup_first_ms"] = {
        t: ratio(out["modes"]["no-warmup"]["by_trigger"][t]["first_ms_median"],
                 out["modes"]["warmup"]["by_trigger"][t]["first_ms_median"]) for t in triggers}
    out["no_warmup_over_warmup_worst_first_ms"] = {
        t: ratio(out["modes"]["no-warmup"]["by_trigger"][t]["worst_first_per_worker_ms_median"],
                 out["modes"]["warmup"]["by_trigger"][t]["worst_first_per_worker_ms_median"]) for t in triggers}
    return out


# ------------------------------------------------------------------------------------------- report
def _mib(b: float | None) -> str:
    return "" if b is None else f"{b / C.MiB:.1f}"


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_report(result: dict[str, Any]) -> None:
    parts = result["parts"]
    if "swap" in parts:
        p = parts["swap"]
        m = p["model"]
        print(f"\n1. Swap under load: {m['table_bytes'] / C.MiB:.0f} MiB table + MLP {m['depth']}x{m['width']} "
              f"(versions change: {m['change']}), batch {p['batch']}, open loop {p['rate']:g} req/s "
              f"({p['rate_source']}); latency from the intended send time, ms")
        rows = []
        for sw in p["swaps"]:
            for name, w in (("steady before", sw["steady"]), ("swap window", sw["swap"])):
                rows.append([f"{sw['to_version'] - 1}->{sw['to_version']}", name, _f(w["seconds"], 1), w["requests"],
                             w["errors"], w["late_sends"], _f(w["p50_ms"]), _f(w["p99_ms"]), _f(w["max_ms"]),
                             _f(sw["p99_ratio"], 3) if name == "swap window" else ""])
            for ph in sw["phases"]:
                rows.append(["", f"  {ph['phase']}", _f(ph["seconds"], 1), ph["requests"], ph["errors"],
                             ph["late_sends"], _f(ph["p50_ms"]), _f(ph["p99_ms"]), _f(ph["max_ms"]), ""])
        print(C.table(["swap", "window", "s", "requests", "errors", "late sends", "p50", "p99", "max",
                       "p99 swap/steady"], rows))
        rows = []
        for sw in p["swaps"]:
            tl, st, lg = sw["timeline_s"], sw["new_version_status"], sw["server_log"]
            unl = lg.get("old_unload_done_after_available_s", {})
            rows.append([f"{sw['to_version'] - 1}->{sw['to_version']}", _f(tl.get("found")), _f(tl.get("segment_written")),
                         _f(tl.get("available")), _f(tl.get("old_end_seen")), _f(st.get("load_seconds")),
                         _f(lg.get("loader_process_s")), _f(lg.get("loader_seconds")),
                         ",".join(f"{x:g}" for x in lg.get("worker_load_seconds", [])),
                         " ".join(f"w{w}:{v * 1000:.0f}" for w, v in sorted(unl.items())),
                         _mib(st.get("own_bytes")), _mib(st.get("shared_bytes")), _f(sw["first_new_answer_s"]),
                         _f(sw["last_old_answer_s"]), sw["old_answers_after_first_new"]])
        print("\nSwap timeline, seconds after the publish (status polled every 50 ms; loader/worker times from the "
              "server log)")
        print(C.table(["swap", "found", "segment", "AVAILABLE", "old END", "load_seconds", "loader process s",
                       "segment write s", "worker load s", "old unload done ms after AVAIL", "own MiB", "shared MiB",
                       "1st new answer", "last old answer", "old after 1st new"], rows))
    if "incremental" in parts:
        p = parts["incremental"]
        m = p["model"]
        print(f"\n2. Update of a {m['table_bytes'] / C.GiB:.3f} GiB table + {m['dense_bytes'] / 1024:.1f} KiB dense "
              f"model where version 2 changes only the dense layer (memory: /dev/shm segments + RssAnon of the "
              f"server tree, peak minus the steady value)")
        rows = []
        for r in p["rounds"]:
            mm, v2 = r["memory"], r["version2_status"]
            rows.append([r["mode"], r["repeat"], _f(r["publish_to_available_s"]), _f(r["status_load_seconds"]),
                         _f(r["server_log"]["loader_process_s"]), _f(r["server_log"]["loader_seconds"]),
                         _f(r["publish_to_old_end_s"]),
                         _mib(mm["peak_extra_bytes"]), _mib(mm["peak_extra_shm_bytes"]), _mib(mm["peak_extra_anon_bytes"]),
                         _mib(mm["peak_loader_anon_bytes"]), _mib(mm["after_extra_bytes"]), _mib(v2.get("own_bytes")),
                         _mib(v2.get("shared_bytes")), _f(r.get("other_load_before"))])
        s = p["summary"]
        ra = s["ratios_incremental_over_full"]
        rows.append(["incr/full", "", _f(ra["publish_to_available_s"], 3), _f(ra["status_load_seconds"], 3),
                     _f(ra["loader_process_s"], 3), _f(ra["loader_seconds"], 3), _f(ra["publish_to_old_end_s"], 3), _f(ra["peak_extra_bytes"], 3),
                     _f(ra["peak_extra_shm_bytes"], 3), "", "", "", "", "", ""])
        print(C.table(["mode", "rep", "publish->AVAIL s", "load_seconds", "loader process s", "segment write s",
                       "publish->v1 END s",
                       "peak extra MiB", "shm part", "anon part", "loader anon", "extra after", "own MiB",
                       "shared MiB", "other load"], rows))
    if "warmup" in parts:
        p = parts["warmup"]
        print(f"\n3. First request after a version becomes AVAILABLE (batch {p['batch']}), ms; trigger 'available': "
              f"sent as soon as status says AVAILABLE; 'old_end': once the old version is END too")
        rows = []
        for label, md in p["modes"].items():
            for r in md["rounds"]:
                unl = r.get("server_log", {}).get("old_unload_done_after_available_s", {})
                rows.append([label, r["trigger"], r["version"], _f(r["first_ms"]), f"w{r['first_worker']}",
                             " ".join(f"w{w}:{v:.1f}" for w, v in r["first_per_worker_ms"].items()),
                             _f(r["steady_p50_ms"]), _f(r["first_ratio"]), _f(r["worst_first_ratio"]),
                             " ".join(f"w{w}:{v * 1000:.0f}" for w, v in sorted(unl.items())),
                             (r["warmup"] or {}).get("source", "")])
            for trigger, bt in md["by_trigger"].items():
                rows.append([label, trigger, "median", _f(bt["first_ms_median"]), "",
                             _f(bt["worst_first_per_worker_ms_median"]), _f(bt["steady_p50_ms_median"]),
                             _f(bt["first_ratio_median"]), _f(bt["worst_first_ratio_median"]), "", ""])
        print(C.table(["mode", "trigger", "version", "first", "by", "first per worker", "steady p50",
                       "first/steady", "worst first/steady", "old unload done ms after AVAIL", "warmup source"], rows))
        print(f"first request, no warmup / warmup (medians): {p['no_warmup_over_warmup_first_ms']}; "
              f"worst first per worker: {p['no_warmup_over_warmup_worst_first_ms']}")


def plot(result: dict[str, Any], name: str) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    parts = result["parts"]
    if not set(parts) & {"swap", "incremental", "warmup"}:
        return  # part pacing alone: report_pacing draws it
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ax = axes[0][0]
    if "swap" in parts and parts["swap"]["records"]:
        p = parts["swap"]
        recs = p["records"]
        t0 = p["t0"]
        vers = sorted({r[2] for r in recs if r[3]})
        for i, v in enumerate(vers):
            pts = [(r[0], r[1]) for r in recs if r[3] and r[2] == v]
            ax.scatter(*zip(*pts), s=3, color=f"C{i % 10}", label=f"version {v}")
        bad = [(r[0], max(r[1], 0.1)) for r in recs if not r[3]]
        if bad:
            ax.scatter(*zip(*bad), s=12, marker="x", color="red", label="errors")
        for j, sw in enumerate(p["swaps"]):
            ax.axvline(sw["t_publish"] - t0, color="k", ls="--", lw=0.8, label="publish" if j == 0 else None)
            ax.axvspan(sw["t_publish"] - t0, sw["t_window_end"] - t0, color="orange", alpha=0.15,
                       label="swap window" if j == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("seconds")
        ax.set_ylabel("latency from intended send (ms)")
        ax.set_title(f"Swap under load: {p['rate']:g} req/s open loop", fontsize=9)
        ax.legend(fontsize=7, markerscale=3)
        ax.grid(alpha=0.3)
    else:
        ax.set_axis_off()
    ax = axes[0][1]
    if "swap" in parts and parts["swap"]["swaps"]:
        p = parts["swap"]
        labels = [f"{s['to_version'] - 1}->{s['to_version']}" for s in p["swaps"]]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [s["steady"]["p99_ms"] for s in p["swaps"]], 0.4, label="p99 steady")
        ax.bar([x + 0.2 for x in xs], [s["swap"]["p99_ms"] for s in p["swaps"]], 0.4, label="p99 swap window")
        for x, s in zip(xs, p["swaps"]):
            ax.annotate(f"x{s['p99_ratio']}", (x + 0.2, s["swap"]["p99_ms"]), ha="center", fontsize=7,
                        textcoords="offset points", xytext=(0, 2))
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels)
        ax.set_ylabel("ms")
        ax.set_title("p99: steady vs swap window (target ratio <= 1.5)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    else:
        ax.set_axis_off()
    ax = axes[1][0]
    if "incremental" in parts:
        p = parts["incremental"]
        for r in p["rounds"]:
            tl = r["memory"]["timeline"]
            if not tl:
                continue
            base_mib = (r["memory"]["steady_total_bytes"] or 0) / C.MiB
            col = "tab:red" if r["mode"] == "full" else "tab:green"
            ax.plot([x[0] for x in tl], [x[1] + x[2] - base_mib for x in tl], color=col, lw=1,
                    label=f"{r['mode']} (rep {r['repeat']})")
            if r.get("publish_to_available_s") is not None:
                ax.axvline(r["publish_to_available_s"], color=col, ls=":", lw=0.8)
        ax.axvline(0, color="k", ls="--", lw=0.8)
        ax.set_xlabel("seconds after the publish (dotted: AVAILABLE)")
        ax.set_ylabel("extra MiB (shm + anon RSS of the tree)")
        ax.set_title(f"Update memory: {p['model']['table_bytes'] / C.GiB:.3f} GiB table, dense-only change", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    else:
        ax.set_axis_off()
    ax = axes[1][1]
    if "incremental" in parts or "warmup" in parts:
        labels, vals, cols = [], [], []
        if "incremental" in parts:
            ra = parts["incremental"]["summary"]["ratios_incremental_over_full"]
            for key, lab in (("publish_to_available_s", "update time\nincr/full"),
                             ("peak_extra_bytes", "peak extra mem\nincr/full")):
                if ra.get(key) is not None:
                    labels.append(lab)
                    vals.append(ra[key])
                    cols.append("tab:green")
        if "warmup" in parts:
            for label, md in parts["warmup"]["modes"].items():
                for trigger, bt in md["by_trigger"].items():
                    if bt.get("worst_first_ratio_median") is not None:
                        labels.append(f"worst 1st req/steady\n{label}, {trigger}")
                        vals.append(bt["worst_first_ratio_median"])
                        cols.append("tab:blue" if label == "warmup" else "tab:gray")
        ax.bar(range(len(vals)), vals, color=cols)
        for x, v in enumerate(vals):
            ax.annotate(f"{v:g}", (x, v), ha="center", fontsize=7, textcoords="offset points", xytext=(0, 2))
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, fontsize=6, rotation=20, ha="right")
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_title("Ratios (incremental: target < 0.2)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    else:
        ax.set_axis_off()
    C.save_figure(fig, name, "bench_lifecycle", result["machine"])


# ------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small and fast: 32 MiB swap table, 128 MiB incremental table, 4 s windows, 2 swaps/rounds")
    ap.add_argument("--parts", default="swap,incremental,warmup",
                    help=f"comma list of {', '.join(PARTS)} (default: the first three; pacing takes one server per setting)")
    ap.add_argument("--name", default=None, help="results name (default bench_lifecycle, or bench_lifecycle_quick)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=int, default=1)
    # part 1
    ap.add_argument("--swap-table-mib", type=float, default=None, help="swap model's table (default 128; quick 32)")
    ap.add_argument("--swap-width", type=int, default=256)
    ap.add_argument("--swap-depth", type=int, default=3)
    ap.add_argument("--store-versions", type=int, default=None,
                    help="build only this many swap versions and publish them in turn (any number of full swaps)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra `sgserve start` argument for the swap part (repeat; e.g. --server-arg=--load-bandwidth=200MiB)")
    ap.add_argument("--load-bandwidths", default="0,400MiB,200MiB,100MiB",
                    help="part pacing: the --load-bandwidth settings compared (comma list)")
    ap.add_argument("--pacing-rounds", type=int, default=2, help="part pacing: rounds over the settings, interleaved")
    ap.add_argument("--boost-nice", type=int, default=0,
                    help="swap/pacing: autogroup nice of the server's and this script's sessions (e.g. -10: other "
                         "people's jobs on a shared machine disturb less); 0: unchanged")
    ap.add_argument("--py-spy", action="store_true",
                    help="during the first swap, py-spy dumps of the loader, a worker and the broker (in the JSON)")
    ap.add_argument("--py-spy-delay", type=float, default=0.2, help="seconds after LOADING is seen before the dumps")
    ap.add_argument("--swap-change", choices=["all", "dense"], default="all",
                    help="what differs between swap versions: every tensor (default, a full load each swap) or "
                         "only the MLP (the table is shared by an incremental update)")
    ap.add_argument("--batch", type=int, default=128, help="ids per request (parts 1 and 3)")
    ap.add_argument("--rate", type=float, default=None, help="open-loop rate (default: --load-fraction x probed capacity)")
    ap.add_argument("--load-fraction", type=float, default=0.35)
    ap.add_argument("--probe-seconds", type=float, default=None, help="capacity probe length (default 5; quick 3)")
    ap.add_argument("--senders", type=int, default=32, help="open-loop sender threads")
    ap.add_argument("--swaps", type=int, default=None, help="swaps in a row (default 3; quick 2)")
    ap.add_argument("--steady-seconds", type=float, default=None, help="steady window before each swap (default 10; quick 4)")
    ap.add_argument("--warm-seconds", type=float, default=2.0, help="unmeasured load before the first window")
    ap.add_argument("--tail-seconds", type=float, default=0.5, help="the swap window runs this long past the old END")
    ap.add_argument("--swap-timeout", type=float, default=600.0)
    ap.add_argument("--plot-points", type=int, default=3000, help="requests kept in the JSON for the plot")
    # part 2
    ap.add_argument("--incr-table-mib", type=float, default=None, help="incremental model's table (default 1024; quick 128)")
    ap.add_argument("--incr-repeats", type=int, default=None, help="full/incremental pairs (default 2; quick 1)")
    ap.add_argument("--mem-interval", type=float, default=0.02, help="memory sampling interval, s")
    ap.add_argument("--mem-baseline-seconds", type=float, default=1.5)
    ap.add_argument("--mem-after-seconds", type=float, default=1.5)
    # part 3
    ap.add_argument("--warmup-rounds", type=int, default=None, help="versions published per mode (default 3; quick 2)")
    ap.add_argument("--steady-requests", type=int, default=30)
    ap.add_argument("--no-warmup-after-end", dest="warmup_after_end", action="store_false",
                    help="part 3: skip the rounds that wait for the old version's END before the first request")
    ap.add_argument("--poll-interval", type=float, default=0.005, help="status poll interval while waiting, s")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="wait up to this long for other load to drop before a measurement (default 10; quick 3)")
    ap.add_argument("--replot", action="store_true", help="only redraw the table and PNG from the saved JSON")
    args = ap.parse_args()
    q = args.quick
    for key, full, quick in (("swap_table_mib", 128.0, 32.0), ("probe_seconds", 5.0, 3.0), ("swaps", 3, 2),
                             ("steady_seconds", 10.0, 4.0), ("incr_table_mib", 1024.0, 128.0),
                             ("incr_repeats", 2, 1), ("warmup_rounds", 3, 2), ("quiet_wait", 10.0, 3.0)):
        if getattr(args, key) is None:
            setattr(args, key, quick if q else full)
    name = args.name or ("bench_lifecycle_quick" if q else "bench_lifecycle")
    if args.replot:
        with open(os.path.join(C.RESULTS_DIR, f"{name}.json")) as f:
            saved = json.load(f)
        print_report(saved)
        plot(saved, name)
        report_pacing(saved, name)
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")

    C.sigterm_as_exit()
    result: dict[str, Any] = {
        "benchmark": "bench_lifecycle", "machine": C.machine_info(),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "params": {k: v for k, v in vars(args).items() if k != "replot"},
        "notes": ["latencies in ms; open-loop latency counts from each request's intended send time",
                  "memory = allocated blocks of the server's /dev/shm segments + RssAnon of every process of the "
                  "server tree; " + C.drop_page_cache_note(),
                  "shared machine: other_load_* fields are the cores other processes used just before a measurement"],
        "parts": {}}
    t_start = time.monotonic()
    runners = {"swap": part_swap, "incremental": part_incremental, "warmup": part_warmup,
               "pacing": lambda a: SP.part_pacing(a, part_swap)}
    for part in parts:
        C.log(f"=== part: {part}")
        t0 = time.monotonic()
        result["parts"][part] = runners[part](args)
        result["parts"][part]["seconds"] = round(time.monotonic() - t0, 1)
        C.write_json(name, result)  # partial results survive a later failure
    result["seconds"] = round(time.monotonic() - t_start, 1)
    C.write_json(name, result)
    print_report(result)
    plot(result, name)
    report_pacing(result, name)
    return 0


def report_pacing(result: dict[str, Any], name: str) -> None:
    """Part pacing has its own table and PNG (NAME_pacing.png)."""
    if "pacing" in result["parts"]:
        p = result["parts"]["pacing"]
        SP.print_pacing(p)
        table = p["runs"][0]["swap"]["model"]["table_bytes"] / C.MiB if p["runs"] else 0
        SP.plot_pacing(p, f"{name}_pacing", result["machine"],
                       f"{table:.0f} MiB table, all tensors change, {p.get('segment_dir') or '/dev/shm'}")


if __name__ == "__main__":
    sys.exit(main())
