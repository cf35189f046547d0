"""The sender threads that load one endpoint at one point, closed loop or open loop.

A runner keeps its threads and their connections between slices, so that endpoints measured
interleaved (A B A B ...) pay no reconnect cost and a slice's end leaves nothing in flight.
"""
from __future__ import annotations

import itertools
import math
import threading
import time
from typing import Any, Callable

import numpy as np

from sgserve.bench.config import BenchConfig, PointSpec
from sgserve.bench.results import BenchResult, percentile
from sgserve.bench.targets import Endpoint, Session, synth_inputs

PAYLOADS_PER_THREAD = 8  # distinct pre-built requests each thread cycles through (cheap, not all identical)
DRAIN_GRACE_S = 2.0  # past the per-request timeout, how long a slice's end waits for in-flight requests


class Tally:
    """What one runner measured; written by its sender threads, read by the progress display."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies_ms: list[float] = []
        self.codes: dict[str, int] = {}
        self.workers: dict[str, int] = {}
        self.sent = 0
        self.late = 0
        self.unsent = 0
        self.seconds = 0.0  # measured wall time (closed loop: slices until drained; open loop: schedule windows)
        self.cpu_s = 0.0

    def record(self, code: str, worker: str | None, latency_ms: float, late: bool = False) -> None:
        with self.lock:
            self.sent += 1
            self.late += late
            self.codes[code] = self.codes.get(code, 0) + 1
            if worker is not None:
                self.workers[worker] = self.workers.get(worker, 0) + 1
            if code == "200":
                self.latencies_ms.append(latency_ms)

    def live(self) -> tuple[int, int, float, float]:
        """(answers, errors, p50 ms, p99 ms) so far."""
        with self.lock:
            done = sum(self.codes.values())
            errors = done - self.codes.get("200", 0)
            lat = sorted(self.latencies_ms)
        return done, errors, percentile(lat, 50), percentile(lat, 99)


class _Schedule:
    """Intended send times for one open-loop window [start, end)."""

    def __init__(self, rate: float, kind: str, start: float, end: float, rng: np.random.Generator) -> None:
        self.rate, self.kind, self.start, self.end, self.rng = rate, kind, start, end, rng
        self._i = 0
        self._next = start if kind == "uniform" else start + rng.exponential(1.0 / rate)

    def claim(self) -> float | None:
        """The next intended time inside the window (and moves past it), or None when none is left."""
        t = self._next
        if t >= self.end:
            return None
        self._i += 1
        self._next = (self.start + self._i / self.rate if self.kind == "uniform"
                      else t + self.rng.exponential(1.0 / self.rate))
        return t

    def left(self) -> int:
        """How many intended times in the window were never claimed."""
        n = 0
        while self.claim() is not None:
            n += 1
        return n


def _send(session: Session, request: Any) -> tuple[str, str | None]:
    """session.send, with an unexpected client-side failure counted under its type, never fatal."""
    try:
        return session.send(request)
    except Exception as exc:  # noqa: BLE001 - a sender thread must survive to keep the load (and the count) going
        return f"client:{type(exc).__name__}", None


class Runner:
    """Sender threads for one endpoint at one point, measuring in slices the caller starts and ends.

    Between slices the threads are parked with their connections open, so that interleaved
    endpoints pay no reconnect cost and a slice's end leaves nothing in flight.
    """

    def __init__(self, ep: Endpoint, index: int, sig: dict[str, Any], spec: PointSpec, cfg: BenchConfig,
                 seed: int) -> None:
        self.ep, self.index, self.sig, self.spec, self.cfg, self.seed = ep, index, sig, spec, cfg, seed
        self.tally = Tally()
        self.planned_s = 0.0  # measured seconds asked for so far (interleaving stops at cfg.duration)
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._active = False
        self._measure = False
        self._inflight = 0
        self._started = 0  # requests started in the current slice
        self._quota: int | None = None
        self._schedule: _Schedule | None = None
        self._slice_seconds: float | None = None
        self._slice_start = self._slice_cpu = 0.0
        self._late_s = cfg.late_ms / 1000.0
        self._rng = np.random.default_rng(seed)  # the open-loop schedule's
        self._max_threads = cfg.senders or cfg.max_senders
        self._spawned = itertools.count()
        n = spec.concurrency if spec.mode == "closed" else (cfg.senders or self._initial_senders())
        with self._cond:
            for _ in range(n):
                self._spawn()

    def _initial_senders(self) -> int:
        # Enough for ~10 ms per request; more are added as soon as the schedule falls behind.
        return min(self._max_threads, max(2, math.ceil(self.spec.rate * 0.01)))

    def _spawn(self) -> None:
        """Starts one more sender thread (called with self._cond held)."""
        target = self._closed_sender if self.spec.mode == "closed" else self._open_sender
        t = threading.Thread(target=self._sender, args=(target, next(self._spawned)), daemon=True,
                             name=f"bench-sender-{len(self._threads)}")
        self._threads.append(t)
        t.start()

    def _sender(self, loop: Callable[[Session, list[Any]], None], index: int) -> None:
        session = self.ep.session()
        try:
            rng = np.random.default_rng([self.seed, index])
            requests = [session.prepare(synth_inputs(self.sig, self.spec.batch_size, rng))
                        for _ in range(PAYLOADS_PER_THREAD)]
            loop(session, requests)
        finally:
            session.close()

    def _closed_sender(self, session: Session, requests: list[Any]) -> None:
        for request in itertools.cycle(requests):
            with self._cond:
                while not self._closing and not (self._active and (self._quota is None or self._started < self._quota)):
                    self._cond.wait()
                if self._closing:
                    return
                self._started += 1
                self._inflight += 1
                measure = self._measure
            t0 = time.perf_counter()
            code, worker = _send(session, request)
            latency_ms = (time.perf_counter() - t0) * 1000.0
            if measure:
                self.tally.record(code, worker, latency_ms)
            self._finished_one()

    def _open_sender(self, session: Session, requests: list[Any]) -> None:
        for request in itertools.cycle(requests):
            with self._cond:
                while True:
                    if self._closing:
                        return
                    intended = self._schedule.claim() if self._schedule is not None else None
                    if intended is not None:
                        break
                    self._cond.wait()
                self._inflight += 1
                measure = self._measure
                if time.perf_counter() - intended > self._late_s and len(self._threads) < self._max_threads:
                    self._spawn()  # every sender is busy: the schedule needs another one
            delay = intended - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            late = time.perf_counter() - intended > self._late_s
            code, worker = _send(session, request)
            latency_ms = (time.perf_counter() - intended) * 1000.0  # from the INTENDED send time
            if measure:
                self.tally.record(code, worker, latency_ms, late=late)
            self._finished_one()

    def _finished_one(self) -> None:
        with self._cond:
            self._inflight -= 1
            if self._inflight == 0:
                self._cond.notify_all()

    # -- slices (called by one controlling thread) -----------------------------------------------
    def begin(self, seconds: float | None, measure: bool, quota: int | None = None) -> None:
        self._slice_seconds, self._slice_start = seconds, time.perf_counter()
        self._slice_cpu = time.process_time()
        with self._cond:
            self._measure, self._started = measure, 0
            self._quota = quota if self.spec.mode == "closed" else None
            if self.spec.mode == "open":
                self._schedule = _Schedule(self.spec.rate, self.cfg.schedule, self._slice_start,
                                           self._slice_start + seconds, self._rng)
            self._active = True
            self._cond.notify_all()
        if measure and seconds is not None:
            self.planned_s += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self._slice_start

    def done(self) -> bool:
        if self._slice_seconds is not None and self.elapsed() >= self._slice_seconds:
            return True
        with self._cond:
            return self._quota is not None and self._started >= self._quota

    def started(self) -> int:
        with self._cond:
            return self._started

    def end(self) -> None:
        """Stops new sends, waits for in-flight requests, and books the slice's time."""
        with self._cond:
            self._active = False
            schedule, self._schedule = self._schedule, None
            self._cond.wait_for(lambda: self._inflight == 0, timeout=self.cfg.timeout + DRAIN_GRACE_S)
        unsent = schedule.left() if schedule is not None else 0  # no sender can claim from it any more
        if not self._measure:
            return
        wall = time.perf_counter() - self._slice_start
        with self.tally.lock:
            if self.spec.mode == "open":
                self.tally.seconds += self._slice_seconds  # the schedule's window
                self.tally.unsent += unsent
            else:
                self.tally.seconds += wall
            self.tally.cpu_s += time.process_time() - self._slice_cpu

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + self.cfg.timeout + DRAIN_GRACE_S
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def stuck(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def result(self) -> BenchResult:
        t, spec = self.tally, self.spec
        lat = sorted(t.latencies_ms)
        ok = t.codes.get("200", 0)
        errors = {k: v for k, v in sorted(t.codes.items()) if k != "200"}
        secs = t.seconds
        open_loop = spec.mode == "open"
        return BenchResult(
            endpoint=self.ep.url, model=self.cfg.model, mode=spec.mode, endpoint_index=self.index,
            concurrency=spec.concurrency, offered_rate=spec.rate, batch_size=spec.batch_size, seconds=round(secs, 3),
            ok=ok, errors=sum(errors.values()), error_codes=errors, qps=round(ok / secs, 1) if secs else 0.0,
            rows_per_s=round(ok * spec.batch_size / secs, 1) if secs else 0.0,
            p50_ms=round(percentile(lat, 50), 3), p90_ms=round(percentile(lat, 90), 3), p99_ms=round(percentile(lat, 99), 3),
            p999_ms=round(percentile(lat, 99.9), 3), max_ms=round(lat[-1], 3) if lat else 0.0,
            mean_ms=round(sum(lat) / len(lat), 3) if lat else 0.0,
            workers_seen=dict(sorted(t.workers.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0, kv[0]))),
            sent=t.sent, achieved_rate=round(t.sent / secs, 1) if open_loop and secs else None,
            late=t.late + t.unsent if open_loop else None, unsent=t.unsent if open_loop else None,
            schedule=self.cfg.schedule if open_loop else None, senders=len(self._threads),
            loadgen_cpu=round(t.cpu_s / secs, 2) if secs else 0.0)
