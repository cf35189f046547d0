"""`sgserve bench`: a closed-loop load generator that speaks the sgserve protocol.

N client threads, each with its own socket, send the next request as soon as the previous answer
arrives. Latency is measured per request on the client side (perf_counter), after a warmup whose
requests are not counted. Inputs are synthesized from the model's metadata.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import time
from typing import Any

import numpy as np

from sgserve.errors import ServeError, Unavailable


@dataclasses.dataclass
class BenchConfig:
    endpoint: str
    model: str = "demo"
    concurrency: int = 8
    duration: float | None = 10.0
    requests: int | None = None
    batch_size: int = 1
    warmup: float = 1.0
    signature: str = "serving_default"
    timeout: float = 10.0
    version: int | None = None


@dataclasses.dataclass
class BenchResult:
    endpoint: str
    model: str
    concurrency: int
    batch_size: int
    seconds: float
    ok: int
    errors: int
    error_codes: dict[str, int]
    qps: float
    rows_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    workers_seen: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def synth_inputs(signature: dict[str, Any], batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs that fit a signature: -1 in the first dim is the batch, other -1 dims are 1."""
    out = {}
    for name, spec in signature["inputs"].items():
        shape = spec["shape"] if spec["shape"] is not None else [-1]
        dims = [batch if (i == 0 and d == -1) else (1 if d == -1 else d) for i, d in enumerate(shape)]
        dt = spec["dtype"]
        if dt == "string":
            out[name] = np.full(dims, b"a", dtype=object)
        elif dt == "bool":
            out[name] = rng.integers(0, 2, dims).astype(bool)
        elif np.dtype(dt).kind in "iu":
            out[name] = rng.integers(0, 1000, dims).astype(dt)
        else:
            out[name] = rng.standard_normal(dims).astype(dt)
    return out


def _pct(sorted_ms: list[float], p: float) -> float:
    if not sorted_ms:
        return 0.0
    k = min(len(sorted_ms) - 1, max(0, int(round(p / 100.0 * len(sorted_ms) + 0.5)) - 1))
    return sorted_ms[k]


def run_bench(cfg: BenchConfig, progress: bool = True) -> BenchResult:
    from sgserve.client import Client  # noqa: PLC0415

    client = Client(cfg.endpoint, timeout=cfg.timeout)
    try:
        try:
            meta = client.metadata(cfg.model, version=cfg.version)
        except ServeError as exc:
            if exc.code in (504, 503):
                raise Unavailable(f"no sgserve server answered at {cfg.endpoint} ({exc.message})") from None
            raise
        sig = meta["signatures"].get(cfg.signature)
        if sig is None:
            raise ServeError(f"model '{cfg.model}' has no signature '{cfg.signature}'", 404)
        lock = threading.Lock()
        lat: list[float] = []
        codes: dict[str, int] = {}
        workers: dict[str, int] = {}
        stop = threading.Event()
        measuring = threading.Event()
        counter = {"sent": 0}

        def worker(seed: int) -> None:
            rng = np.random.default_rng(seed)
            local_lat: list[float] = []
            while not stop.is_set():
                if cfg.requests is not None and measuring.is_set():
                    with lock:
                        if counter["sent"] >= cfg.requests:
                            break
                        counter["sent"] += 1
                inputs = synth_inputs(sig, cfg.batch_size, rng)
                t0 = time.perf_counter()
                try:
                    res = client.predict_full(cfg.model, inputs, version=cfg.version, signature=cfg.signature,
                                              timeout=cfg.timeout)
                    code, w = "200", str(res.worker)
                except ServeError as exc:
                    code, w = str(exc.code), None
                dt = (time.perf_counter() - t0) * 1000.0
                if measuring.is_set():
                    with lock:
                        codes[code] = codes.get(code, 0) + 1
                        if w is not None:
                            workers[w] = workers.get(w, 0) + 1
                    if code == "200":
                        local_lat.append(dt)
            with lock:
                lat.extend(local_lat)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(cfg.concurrency)]
        for t in threads:
            t.start()
        if cfg.warmup > 0:
            time.sleep(cfg.warmup)
        with lock:
            codes.clear()
            workers.clear()
        measuring.set()
        t_start = time.perf_counter()
        last_print = 0.0
        tty = sys.stderr.isatty()
        while True:
            time.sleep(0.1)
            elapsed = time.perf_counter() - t_start
            with lock:
                done = sum(codes.values())
                errs = done - codes.get("200", 0)
            finished = (cfg.duration is not None and elapsed >= cfg.duration) or \
                       (cfg.requests is not None and done >= cfg.requests) or not any(t.is_alive() for t in threads)
            if progress and (elapsed - last_print >= (0.5 if tty else 2.0) or finished):
                last_print = elapsed
                goal = f"{elapsed:.1f}/{cfg.duration:.0f} s" if cfg.duration else f"{done}/{cfg.requests} req"
                line = f"[bench] {goal}: {done} requests, {done / max(elapsed, 1e-9):.0f} req/s, {errs} errors"
                sys.stderr.write(("\r" + line) if tty else (line + "\n"))
                sys.stderr.flush()
            if finished:
                break
        stop.set()
        seconds = time.perf_counter() - t_start
        for t in threads:
            t.join(timeout=cfg.timeout + 5)
        if progress and tty:
            sys.stderr.write("\n")
        lat.sort()
        ok = codes.get("200", 0)
        total_err = sum(v for k, v in codes.items() if k != "200")
        return BenchResult(
            endpoint=cfg.endpoint, model=cfg.model, concurrency=cfg.concurrency, batch_size=cfg.batch_size,
            seconds=round(seconds, 3), ok=ok, errors=total_err, error_codes={k: v for k, v in codes.items() if k != "200"},
            qps=round(ok / seconds, 1) if seconds else 0.0, rows_per_s=round(ok * cfg.batch_size / seconds, 1) if seconds else 0.0,
            p50_ms=round(_pct(lat, 50), 3), p90_ms=round(_pct(lat, 90), 3), p99_ms=round(_pct(lat, 99), 3),
            max_ms=round(lat[-1], 3) if lat else 0.0, mean_ms=round(sum(lat) / len(lat), 3) if lat else 0.0,
            workers_seen=workers)
    finally:
        client.close()


def format_result(r: BenchResult) -> str:
    return (f"model {r.model} @ {r.endpoint}: concurrency {r.concurrency}, batch {r.batch_size}, {r.seconds:.1f} s\n"
            f"  QPS {r.qps:.1f} ({r.rows_per_s:.1f} rows/s), ok {r.ok}, errors {r.errors} {r.error_codes or ''}\n"
            f"  latency ms: p50 {r.p50_ms:.3f}  p90 {r.p90_ms:.3f}  p99 {r.p99_ms:.3f}  max {r.max_ms:.3f}  "
            f"mean {r.mean_ms:.3f}\n"
            f"  requests per worker: {dict(sorted(r.workers_seen.items()))}")
