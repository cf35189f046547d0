"""The engine behind `sgserve bench`: closed-loop and open-loop load, sweeps and A/B comparisons.

Two ways to load a server:

- **closed loop** (``concurrency``): C threads each send the next request as soon as the previous
  answer arrives. Latency is measured from the send. Good for "how much can it do with C in flight".
- **open loop** (``rate``): requests go out on a schedule fixed in advance (``uniform``: evenly
  spaced, or ``poisson``: exponential gaps), whatever the server does. Sender threads are added as
  needed (up to ``max_senders``) so that a slow server does not slow the schedule down, and latency
  is measured from each request's *intended* send time: a server that falls behind shows it in the
  percentiles instead of quietly lowering the load (no coordinated omission). Requests sent more
  than ``late_ms`` after their intended time, or not sent at all before the window closed, are
  counted as ``late``.

Endpoints: ``tcp://`` and ``ipc://`` speak the sgserve protocol through :class:`sgserve.Client`
(its DEALER sockets are per thread, so every sender thread has its own connection);
``http://host:port`` and ``https://`` speak TF Serving's REST API (``GET /v1/models/M/metadata``
to synthesize inputs, ``POST /v1/models/M:predict`` with columnar ``{"inputs": ...}``), with one
keep-alive connection per thread. Several endpoints are measured *interleaved*: short slices
A B A B ... per point, so that noise on the machine hits every endpoint alike.

Python API::

    from sgserve.bench import loadgen
    cfg = loadgen.BenchConfig(endpoint="tcp://127.0.0.1:8510", model="demo",
                              concurrency=[1, 4, 16], batch_size=[1, 32], duration=5)
    results = loadgen.run_points(cfg)            # list[BenchResult], one per (batch, load, endpoint)
    report = loadgen.make_report(cfg, results)   # the document `sgserve bench --json` writes
    print(loadgen.format_table(results))

``run_bench(cfg)`` runs a config with exactly one point and returns its single BenchResult.
Inputs are synthesized from the model's signature by :func:`synth_inputs`.
"""
from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import math
import os
import platform
import socket
import sys
import threading
import time
import urllib.parse
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from sgserve.errors import DEADLINE_EXCEEDED, NOT_FOUND, ServeError, Unavailable

SCHEDULES = ("uniform", "poisson")
PAYLOADS_PER_THREAD = 8  # distinct pre-built requests each thread cycles through (cheap, not all identical)
DEFAULT_MAX_SENDERS = 512  # below ZeroMQ's default 1023 sockets per context
PROGRESS_TTY_S = 0.5  # seconds between progress updates on a terminal
PROGRESS_LOG_S = 2.0  # ... and between progress lines when stderr is a file or pipe
DRAIN_GRACE_S = 2.0  # past the per-request timeout, how long a slice's end waits for in-flight requests


class EndpointDown(Unavailable):
    """Nothing answers at the endpoint (refused, or no reply within the timeout)."""


# ------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class PointSpec:
    """One load point: a concurrency (closed loop) or a rate (open loop), at one batch size."""

    batch_size: int
    concurrency: int | None = None
    rate: float | None = None

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"

    def label(self) -> str:
        return f"rate={self.rate:g}/s" if self.rate is not None else f"c={self.concurrency}"


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@dataclasses.dataclass
class BenchConfig:
    """What to load, how, and for how long. List-valued fields are swept (one point per value).

    ``endpoint`` may be a comma list (``"tcp://a:1,http://b:2"``); ``compare`` adds one more. With
    more than one endpoint every point is run against each, interleaved in slices of ``slice_s``.
    ``rate`` set means open loop (and ``concurrency`` is ignored). ``duration`` and ``requests``
    (closed loop only) bound each point's measured part; whichever comes first ends it.
    """

    endpoint: str
    model: str = "demo"
    concurrency: int | Sequence[int] = 8
    duration: float | None = 10.0
    requests: int | None = None
    batch_size: int | Sequence[int] = 1
    warmup: float = 1.0
    signature: str = "serving_default"
    timeout: float = 10.0
    version: int | None = None
    rate: float | Sequence[float] | None = None
    schedule: str = "uniform"
    senders: int | None = None  # open loop: a fixed number of sender threads (default: grow as needed)
    max_senders: int = DEFAULT_MAX_SENDERS
    late_ms: float = 10.0
    compare: str | None = None
    slice_s: float = 1.0
    seed: int = 0

    def endpoints(self) -> list[str]:
        eps = [e.strip() for e in self.endpoint.split(",") if e.strip()]
        eps += [e.strip() for e in (self.compare or "").split(",") if e.strip()]
        return eps

    @property
    def mode(self) -> str:
        return "open" if _as_list(self.rate) else "closed"

    def points(self) -> list[PointSpec]:
        """Every (batch size, load) pair, batch size outermost."""
        rates = [float(r) for r in _as_list(self.rate)]
        loads = ([PointSpec(1, rate=r) for r in rates] if rates
                 else [PointSpec(1, concurrency=int(c)) for c in _as_list(self.concurrency)])
        return [dataclasses.replace(p, batch_size=int(b)) for b in _as_list(self.batch_size) for p in loads]

    def validate(self) -> None:
        """Raises ValueError naming the first setting that cannot work."""
        eps = self.endpoints()
        if not eps:
            raise ValueError("no endpoint given")
        for e in eps:
            endpoint_kind(e)
        if not _as_list(self.batch_size) or any(int(b) < 1 for b in _as_list(self.batch_size)):
            raise ValueError("batch sizes must be >= 1")
        if self.mode == "open":
            if any(float(r) <= 0 for r in _as_list(self.rate)):
                raise ValueError("rates must be > 0 requests/s")
            if self.schedule not in SCHEDULES:
                raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
            if self.requests is not None:
                raise ValueError("--requests works with the closed loop only; give the open loop a --duration")
            if self.senders is not None and not 1 <= self.senders <= self.max_senders:
                raise ValueError(f"senders must be between 1 and {self.max_senders}")
        elif not _as_list(self.concurrency) or any(int(c) < 1 for c in _as_list(self.concurrency)):
            raise ValueError("concurrency values must be >= 1")
        if self.duration is None and self.requests is None:
            raise ValueError("give a duration or a number of requests")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be > 0 seconds")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be >= 1")
        if self.requests is not None and len(eps) > 1:
            raise ValueError("comparing endpoints needs a --duration (slices are timed), not --requests")
        if self.warmup < 0 or self.timeout <= 0 or self.slice_s <= 0:
            raise ValueError("warmup must be >= 0, timeout and slice must be > 0 seconds")

    def to_dict(self) -> dict[str, Any]:
        """The config as the JSON report shows it: lists always lists, the mode spelled out."""
        d = dataclasses.asdict(self)
        d.update(endpoints=self.endpoints(), mode=self.mode, batch_size=[int(b) for b in _as_list(self.batch_size)])
        if self.mode == "open":
            d.update(rate=[float(r) for r in _as_list(self.rate)], concurrency=None)
        else:
            d.update(concurrency=[int(c) for c in _as_list(self.concurrency)], rate=None, schedule=None,
                     senders=None, max_senders=None, late_ms=None)
        return d


# ------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class BenchResult:
    """One measured point against one endpoint. Latencies are in ms, over successful requests.

    Open loop: latency counts from the intended send time; ``sent`` requests went out in the window
    (``achieved_rate`` = sent / seconds); ``late`` were sent more than ``late_ms`` after their
    intended time or (``unsent``) not at all.
    """

    endpoint: str
    model: str
    mode: str
    endpoint_index: int  # position in the config's endpoint list (0 = the baseline of comparisons)
    concurrency: int | None
    offered_rate: float | None
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
    p999_ms: float
    max_ms: float
    mean_ms: float
    workers_seen: dict[str, int]
    sent: int = 0
    achieved_rate: float | None = None
    late: int | None = None
    unsent: int | None = None
    schedule: str | None = None
    senders: int | None = None
    loadgen_cpu: float = 0.0  # cores the load generator used while measuring (near 1.0: it is the bottleneck)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_label(self) -> str:
        return f"rate={self.offered_rate:g}/s" if self.offered_rate is not None else f"c={self.concurrency}"


def _pct(sorted_ms: list[float], p: float) -> float:
    """Nearest-rank percentile of a sorted list (bench/_common.py uses the same definition)."""
    if not sorted_ms:
        return 0.0
    k = min(len(sorted_ms) - 1, max(0, int(round(p / 100.0 * len(sorted_ms) + 0.5)) - 1))
    return sorted_ms[k]


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


# ------------------------------------------------------------------------------------ endpoints
class Session(Protocol):
    """One thread's connection to an endpoint."""

    def prepare(self, inputs: dict[str, np.ndarray]) -> Any:
        """Encodes a request once, so that sending it again costs no encoding."""

    def send(self, request: Any) -> tuple[str, str | None]:
        """Sends one request and waits for it: (status code as a string, worker index or None)."""

    def close(self) -> None: ...


def endpoint_kind(url: str) -> str:
    """'sgserve' for ZeroMQ endpoints, 'http' for TF Serving REST ones."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("tcp", "ipc"):
        return "sgserve"
    if scheme in ("http", "https"):
        return "http"
    raise ValueError(f"endpoint {url!r}: use tcp://HOST:PORT or ipc://PATH (sgserve), or http(s)://HOST:PORT "
                     f"(TF Serving REST)")


class SgserveEndpoint:
    """An sgserve broker, through one Client whose sockets are per thread."""

    def __init__(self, url: str, cfg: BenchConfig) -> None:
        from sgserve.client import Client  # noqa: PLC0415 - keeps `import sgserve.bench.loadgen` light

        self.url, self.cfg = url, cfg
        self.client = Client(url, timeout=cfg.timeout)

    def signature(self) -> dict[str, Any]:
        cfg = self.cfg
        try:
            meta = self.client.metadata(cfg.model, version=cfg.version)
        except ServeError as exc:
            if exc.code == DEADLINE_EXCEEDED:
                raise EndpointDown(f"no server answering at {self.url} (no reply within about "
                                   f"{cfg.timeout:g} s)") from None
            if exc.code == NOT_FOUND:
                raise ServeError(f"{self.url}: {exc.message}", NOT_FOUND) from None
            raise ServeError(f"{self.url} refused the metadata request: {exc.message}", exc.code) from None
        sig = meta["signatures"].get(cfg.signature)
        if sig is None:
            raise ServeError(f"model '{cfg.model}' at {self.url} has no signature '{cfg.signature}' "
                             f"(it has {', '.join(sorted(meta['signatures']))})", NOT_FOUND)
        return sig

    def session(self) -> "SgserveSession":
        return SgserveSession(self)

    def close(self) -> None:
        self.client.close()


class SgserveSession:
    def __init__(self, ep: SgserveEndpoint) -> None:
        self._ep = ep

    def prepare(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return inputs

    def send(self, request: dict[str, np.ndarray]) -> tuple[str, str | None]:
        cfg = self._ep.cfg
        try:
            res = self._ep.client.predict_full(cfg.model, request, version=cfg.version, signature=cfg.signature,
                                               timeout=cfg.timeout)
        except ServeError as exc:
            return str(exc.code), None
        return "200", str(res.worker)

    def close(self) -> None:
        pass  # the Client closes every thread's socket


_TF_DTYPES = {"DT_FLOAT": "float32", "DT_DOUBLE": "float64", "DT_HALF": "float16", "DT_INT8": "int8",
              "DT_INT16": "int16", "DT_INT32": "int32", "DT_INT64": "int64", "DT_UINT8": "uint8",
              "DT_UINT16": "uint16", "DT_UINT32": "uint32", "DT_UINT64": "uint64", "DT_BOOL": "bool",
              "DT_STRING": "string"}


def signature_from_tfserving(meta: dict[str, Any], name: str) -> dict[str, Any]:
    """TF Serving's metadata JSON -> the signature form synth_inputs reads ({"inputs": {n: {dtype, shape}}}).

    Sizes may be strings (protobuf's JSON writes int64 as strings); -1 is an unknown dimension and
    ``unknown_rank`` an unknown shape.
    """
    try:
        sigs = meta["metadata"]["signature_def"]["signature_def"]
    except (KeyError, TypeError):
        raise ValueError("metadata has no metadata.signature_def.signature_def") from None
    if name not in sigs:
        raise KeyError(name)
    inputs = {}
    for inp, spec in sigs[name].get("inputs", {}).items():
        dtype = _TF_DTYPES.get(spec.get("dtype", ""))
        if dtype is None:
            raise ValueError(f"input '{inp}' has dtype {spec.get('dtype')}, which bench cannot synthesize")
        ts = spec.get("tensor_shape") or {}
        shape = None if ts.get("unknown_rank") else [int(d.get("size", -1)) for d in ts.get("dim", [])]
        inputs[inp] = {"dtype": dtype, "shape": shape}
    return {"inputs": inputs}


class HttpEndpoint:
    """A TF Serving compatible REST endpoint (TF Serving itself, or any server speaking its API)."""

    def __init__(self, url: str, cfg: BenchConfig) -> None:
        self.url, self.cfg = url, cfg
        u = urllib.parse.urlsplit(url)
        if not u.hostname:
            raise ValueError(f"endpoint {url!r} has no host")
        self.https = u.scheme.lower() == "https"
        self.host, self.port = u.hostname, u.port or (443 if self.https else 80)
        model = urllib.parse.quote(cfg.model, safe="")
        base = u.path.rstrip("/") + f"/v1/models/{model}"
        if cfg.version is not None:
            base += f"/versions/{int(cfg.version)}"
        self.metadata_path, self.predict_path = base + "/metadata", base + ":predict"

    def connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.cfg.timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle stall on small bodies
        return conn

    def signature(self) -> dict[str, Any]:
        cfg = self.cfg
        try:
            conn = self.connect()
            try:
                conn.request("GET", self.metadata_path)
                resp = conn.getresponse()
                body = resp.read()
            finally:
                conn.close()
        except TimeoutError:
            raise EndpointDown(f"no server answering at {self.url} (no answer within {cfg.timeout:g} s)") from None
        except (OSError, http.client.HTTPException) as exc:
            why = "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc) or type(exc).__name__
            raise EndpointDown(f"no server answering at {self.url} ({why})") from None
        text = body.decode("utf-8", "replace")[:300]
        if resp.status != 200:
            raise ServeError(f"{self.url}: GET {self.metadata_path} answered HTTP {resp.status}: {text}",
                             resp.status if resp.status in (400, 404, 429, 500, 503, 504) else 500)
        try:
            return signature_from_tfserving(json.loads(body), cfg.signature)
        except KeyError:
            raise ServeError(f"model '{cfg.model}' at {self.url} has no signature '{cfg.signature}'",
                             NOT_FOUND) from None
        except ValueError as exc:
            raise ServeError(f"{self.url}: unusable metadata: {exc}", 500) from None

    def session(self) -> "HttpSession":
        return HttpSession(self)

    def close(self) -> None:
        pass


class HttpSession:
    """One keep-alive connection; reconnects after an error or a server-side close."""

    def __init__(self, ep: HttpEndpoint) -> None:
        self._ep = ep
        self._conn: http.client.HTTPConnection | None = None
        self._used = 0  # requests answered on the current connection
        self._headers = {"Content-Type": "application/json"}

    def prepare(self, inputs: dict[str, np.ndarray]) -> bytes:
        cols = {k: (np.char.decode(v.astype("S"), "utf-8").tolist() if v.dtype == object else v.tolist())
                for k, v in inputs.items()}
        return json.dumps({"signature_name": self._ep.cfg.signature, "inputs": cols}).encode()

    def send(self, request: bytes) -> tuple[str, str | None]:
        for attempt in (0, 1):
            reused = self._used > 0
            try:
                if self._conn is None:
                    self._conn, self._used = self._ep.connect(), 0
                self._conn.request("POST", self._ep.predict_path, body=request, headers=self._headers)
                resp = self._conn.getresponse()
                body = resp.read()
            except TimeoutError:
                self._drop()
                return "timeout", None
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                # A kept-alive connection the server closed while idle: retry once on a fresh one.
                if attempt == 0 and reused and isinstance(exc, (ConnectionResetError, BrokenPipeError,
                                                                http.client.RemoteDisconnected)):
                    continue
                return "connection", None
            break
        self._used += 1
        if resp.will_close:
            self._drop()
        if resp.status != 200:
            return str(resp.status), None
        try:
            reply = json.loads(body)
        except ValueError:
            return "bad_reply", None
        return ("200" if isinstance(reply, dict) and ("outputs" in reply or "predictions" in reply)
                else "bad_reply"), None

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._used = None, 0

    def close(self) -> None:
        self._drop()


Endpoint = SgserveEndpoint | HttpEndpoint


def open_endpoint(url: str, cfg: BenchConfig) -> Endpoint:
    return SgserveEndpoint(url, cfg) if endpoint_kind(url) == "sgserve" else HttpEndpoint(url, cfg)


# ------------------------------------------------------------------------------------ load
class _Tally:
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
        return done, errors, _pct(lat, 50), _pct(lat, 99)


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


class _Runner:
    """Sender threads for one endpoint at one point, measuring in slices the caller starts and ends.

    Between slices the threads are parked with their connections open, so that interleaved
    endpoints pay no reconnect cost and a slice's end leaves nothing in flight.
    """

    def __init__(self, ep: Endpoint, index: int, sig: dict[str, Any], spec: PointSpec, cfg: BenchConfig,
                 seed: int) -> None:
        self.ep, self.index, self.sig, self.spec, self.cfg, self.seed = ep, index, sig, spec, cfg, seed
        self.tally = _Tally()
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
            p50_ms=round(_pct(lat, 50), 3), p90_ms=round(_pct(lat, 90), 3), p99_ms=round(_pct(lat, 99), 3),
            p999_ms=round(_pct(lat, 99.9), 3), max_ms=round(lat[-1], 3) if lat else 0.0,
            mean_ms=round(sum(lat) / len(lat), 3) if lat else 0.0,
            workers_seen=dict(sorted(t.workers.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else kv[0])),
            sent=t.sent, achieved_rate=round(t.sent / secs, 1) if open_loop and secs else None,
            late=t.late + t.unsent if open_loop else None, unsent=t.unsent if open_loop else None,
            schedule=self.cfg.schedule if open_loop else None, senders=len(self._threads),
            loadgen_cpu=round(t.cpu_s / secs, 2) if secs else 0.0)


# ------------------------------------------------------------------------------------ progress
class _Progress:
    """One updating line on a terminal, a line every few seconds otherwise; always "[bench]"-prefixed."""

    def __init__(self, enabled: bool, stream: Any = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = -math.inf

    def update(self, line: str, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self._last < (PROGRESS_TTY_S if self.tty else PROGRESS_LOG_S):
            return
        self._last = now
        line = "[bench] " + line
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _run_slice(runner: _Runner, seconds: float | None, measure: bool, progress: _Progress, head: str,
               quota: int | None = None) -> None:
    runner.begin(seconds, measure, quota)
    try:
        while not runner.done():
            wait = 0.1 if seconds is None else min(0.1, max(0.0, seconds - runner.elapsed()))
            time.sleep(wait)
            progress.update(_live_line(runner, head, measure, seconds, quota))
    finally:
        runner.end()


def _live_line(runner: _Runner, head: str, measure: bool, seconds: float | None, quota: int | None) -> str:
    if not measure:
        return f"{head}: warmup {runner.elapsed():.1f}/{seconds:g} s"
    done, errors, p50, p99 = runner.tally.live()
    so_far = runner.tally.seconds + runner.elapsed()
    goal = (f"{runner.started()}/{quota} req" if quota is not None and seconds is None
            else f"{so_far:.1f}/{runner.cfg.duration:g} s")
    return (f"{head}: {goal}, {done} answers, {done / max(so_far, 1e-9):.0f}/s, p50 {p50:.2f} ms, "
            f"p99 {p99:.2f} ms, {errors} errors")


def _final_line(head: str, r: BenchResult) -> str:
    extra = f", sent {r.achieved_rate:g}/s of {r.offered_rate:g}/s, {r.late} late" if r.mode == "open" else ""
    return (f"{head}: done, {r.qps:.0f} QPS, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, "
            f"{r.errors} errors{extra}")


# ------------------------------------------------------------------------------------ running
def run_points(cfg: BenchConfig, progress: bool = True) -> list[BenchResult]:
    """Runs every point of ``cfg`` against every endpoint; one BenchResult per (point, endpoint).

    Order: batch size, then load, then endpoint (as given). Raises ValueError for a config that
    cannot work, EndpointDown when an endpoint does not answer, ServeError when it cannot serve the
    model. Refusals during the run (429, 503, ...) are counted in ``error_codes``, not raised.
    """
    cfg.validate()
    urls = cfg.endpoints()
    show = _Progress(progress)
    endpoints: list[Endpoint] = []
    try:
        sigs = []
        for url in urls:  # every endpoint must answer before any load starts
            endpoints.append(open_endpoint(url, cfg))
            sigs.append(endpoints[-1].signature())
            try:  # a signature bench cannot feed fails here, not later in every sender thread
                synth_inputs(sigs[-1], 1, np.random.default_rng(0))
            except (TypeError, ValueError) as exc:
                raise ServeError(f"{url}: cannot synthesize inputs for signature '{cfg.signature}': {exc}",
                                 400) from None
        specs = cfg.points()
        results: list[BenchResult] = []
        for n, spec in enumerate(specs, 1):
            results += _run_point(endpoints, sigs, spec, cfg, show, f"{n}/{len(specs)}")
        return results
    finally:
        for ep in endpoints:
            ep.close()


def _run_point(endpoints: list[Endpoint], sigs: list[dict[str, Any]], spec: PointSpec, cfg: BenchConfig,
               show: _Progress, counter: str) -> list[BenchResult]:
    runners: list[_Runner] = []
    names = [f"{endpoint_letter(i)}: {ep.url}" for i, ep in enumerate(endpoints)] if len(endpoints) > 1 \
        else [endpoints[0].url]
    heads = [f"{counter} {name} {spec.label()} b={spec.batch_size}" for name in names]
    try:
        for i, (ep, sig) in enumerate(zip(endpoints, sigs)):
            runners.append(_Runner(ep, i, sig, spec, cfg, seed=cfg.seed * 7919 + i))
        for runner, head in zip(runners, heads):
            if cfg.warmup > 0:
                _run_slice(runner, cfg.warmup, False, show, head)
        if len(runners) == 1:
            _run_slice(runners[0], cfg.duration, True, show, heads[0], quota=cfg.requests)
        else:  # interleaved: A B A B ... until each has had cfg.duration measured seconds
            while any(r.planned_s < cfg.duration - 1e-9 for r in runners):
                for runner, head in zip(runners, heads):
                    left = cfg.duration - runner.planned_s
                    if left > 1e-9:
                        _run_slice(runner, min(cfg.slice_s, left), True, show, head)
        results = [r.result() for r in runners]
        for head, r in zip(heads, results):
            show.update(_final_line(head, r), final=True)
        return results
    finally:
        for r in runners:
            r.close()
        if any(r.stuck() for r in runners):
            show.update("warning: some sender threads did not finish in time", final=True)


def run_bench(cfg: BenchConfig, progress: bool = True) -> BenchResult:
    """Runs a config that has exactly one point and one endpoint; see run_points for sweeps."""
    cfg.validate()
    if len(cfg.points()) != 1 or len(cfg.endpoints()) != 1:
        raise ValueError("run_bench runs one point against one endpoint; use run_points for sweeps and comparisons")
    return run_points(cfg, progress)[0]


# ------------------------------------------------------------------------------------ reporting
def machine_info() -> dict[str, Any]:
    """Where the numbers were taken: enough to tell two runs' machines apart."""
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu_model)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_count": os.cpu_count(), "cpus_usable": usable, "cpu_model": cpu_model,
            "platform": platform.platform(), "python": platform.python_version()}


def _point_key(r: BenchResult) -> tuple[Any, ...]:
    return (r.batch_size, r.mode, r.concurrency, r.offered_rate)


def _ratio(b: float, a: float) -> float | None:
    return round(b / a, 3) if a else None


def compare_results(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """For every point, each later endpoint (B, C, ...) against the first (A): ratios of QPS, p50, p99."""
    by_point: dict[tuple[Any, ...], dict[int, BenchResult]] = {}
    for r in results:
        by_point.setdefault(_point_key(r), {})[r.endpoint_index] = r
    out = []
    for point in by_point.values():
        a = point.get(0)
        if a is None:
            continue
        for i, b in sorted(point.items()):
            if i == 0:
                continue
            out.append({"baseline": a.endpoint, "endpoint": b.endpoint, "endpoint_index": i,
                        "label": f"{endpoint_letter(i)}/A", "mode": a.mode, "concurrency": a.concurrency,
                        "offered_rate": a.offered_rate, "batch_size": a.batch_size,
                        "qps_ratio": _ratio(b.qps, a.qps), "p50_ratio": _ratio(b.p50_ms, a.p50_ms),
                        "p99_ratio": _ratio(b.p99_ms, a.p99_ms)})
    return out


def endpoint_letter(index: int) -> str:
    """A, B, C ... : how tables and comparisons name the endpoints of one run."""
    return chr(ord("A") + index) if index < 26 else f"E{index}"


def make_report(cfg: BenchConfig, results: Sequence[BenchResult]) -> dict[str, Any]:
    """The JSON document: {"config", "machine", "points", "comparisons"}.

    With exactly one point, that point's fields are also repeated at the top level, so readers of
    the single-result format of earlier versions (``report["qps"]``) keep working.
    """
    report: dict[str, Any] = {}
    if len(results) == 1:
        report.update(results[0].to_dict())
    report.update(config=cfg.to_dict(), machine=machine_info(), points=[r.to_dict() for r in results],
                  comparisons=compare_results(results))
    return report


def _errors_cell(r: BenchResult) -> str:
    if not r.errors:
        return "0"
    return f"{r.errors} (" + ", ".join(f"{k}:{v}" for k, v in r.error_codes.items()) + ")"


def format_table(results: Sequence[BenchResult]) -> str:
    """The summary table, one row per point and endpoint."""
    open_loop = any(r.mode == "open" for r in results)
    headers = ["endpoint", "load", "batch", "QPS", "rows/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"]
    if open_loop:
        headers[5:5] = ["sent/s", "late"]
    several = any(r.endpoint_index for r in results)
    rows = []
    for r in results:
        name = f"{endpoint_letter(r.endpoint_index)}: {r.endpoint}" if several else r.endpoint
        row = [name, r.load_label(), str(r.batch_size), f"{r.qps:.1f}", f"{r.rows_per_s:.1f}",
               f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}", f"{r.max_ms:.3f}", _errors_cell(r)]
        if open_loop:
            row[5:5] = [f"{r.achieved_rate:.1f}" if r.achieved_rate is not None else "-",
                        str(r.late) if r.late is not None else "-"]
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    left = {0, 1}  # text columns; numbers are right-aligned

    def line(cells: Iterable[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers)] + [line(r) for r in rows]).rstrip()


def format_comparisons(comparisons: Sequence[dict[str, Any]]) -> str:
    lines = []
    for c in comparisons:
        load = f"rate={c['offered_rate']:g}/s" if c["offered_rate"] is not None else f"c={c['concurrency']}"

        def x(v: float | None) -> str:
            return f"x{v:.3f}" if v is not None else "n/a"

        lines.append(f"{c['label']} at {load} b={c['batch_size']}: QPS {x(c['qps_ratio'])}, "
                     f"p50 {x(c['p50_ratio'])}, p99 {x(c['p99_ratio'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ plot
MATPLOTLIB_MISSING = "--plot needs matplotlib, which is not installed: pip install matplotlib"


def require_matplotlib() -> None:
    """Raises RuntimeError with the pip command when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        raise RuntimeError(MATPLOTLIB_MISSING) from None


def _series(results: Sequence[BenchResult]) -> dict[str, list[BenchResult]]:
    """Lines to draw: along the load axis when load was swept, else along the batch-size axis."""
    loads = {(r.concurrency, r.offered_rate) for r in results}
    several = any(r.endpoint_index for r in results)
    series: dict[str, list[BenchResult]] = {}
    for r in results:
        ep = f"{endpoint_letter(r.endpoint_index)}: {r.endpoint}" if several else r.endpoint
        name = f"{ep} b={r.batch_size}" if len(loads) > 1 else f"{ep} {r.load_label()}"
        series.setdefault(name, []).append(r)
    return series


def plot_results(results: Sequence[BenchResult], path: str, title: str | None = None) -> None:
    """Latency (p50 solid, p99 dashed) against achieved QPS, one colour per endpoint/config, to a PNG."""
    require_matplotlib()
    from matplotlib.figure import Figure  # noqa: PLC0415 - optional dependency, imported when plotting

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    lows, highs = [], []
    for i, (name, pts) in enumerate(_series(results).items()):
        color = f"C{i % 10}"
        xs = [p.qps for p in pts]
        ax.plot(xs, [p.p50_ms for p in pts], "o-", color=color, label=f"{name} p50")
        ax.plot(xs, [p.p99_ms for p in pts], "s--", color=color, label=f"{name} p99")
        for p in pts:
            tag = f"b={p.batch_size}" if name.endswith(p.load_label()) else p.load_label()
            ax.annotate(tag, (p.qps, p.p99_ms), textcoords="offset points", xytext=(3, 4), fontsize=7, color=color)
        lows += [p.p50_ms for p in pts if p.p50_ms > 0]
        highs += [p.p99_ms for p in pts]
    if lows and highs and max(highs) / min(lows) > 20:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel("achieved QPS (successful requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    m = machine_info()
    ax.set_title(title or f"sgserve bench: {results[0].model if results else ''}", fontsize=10)
    fig.text(0.01, 0.005, f"{m['cpus_usable']} cpus, {m['cpu_model']}, {m['platform']}", fontsize=6, alpha=0.7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)


__all__ = ["BenchConfig", "BenchResult", "PointSpec", "EndpointDown", "run_points", "run_bench", "make_report",
           "compare_results", "format_table", "format_comparisons", "plot_results",
           "require_matplotlib", "synth_inputs", "signature_from_tfserving", "machine_info", "SCHEDULES"]
