"""What a benchmark run is asked to do: the endpoints, the load points and how long each runs.

Kept apart from the engine so that the CLI can build and validate a config without importing the
endpoints, the sender threads or numpy's random generators.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

SCHEDULES = ("uniform", "poisson")
DEFAULT_MAX_SENDERS = 512  # below ZeroMQ's default 1023 sockets per context


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


def as_list(value: Any) -> list[Any]:
    """A swept setting as a list: None is no values, a scalar is one."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def endpoint_kind(url: str) -> str:
    """'sgserve' for ZeroMQ endpoints, 'http' for TF Serving REST ones, 'grpc' for its gRPC ones."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("tcp", "ipc"):
        return "sgserve"
    if scheme in ("http", "https"):
        return "http"
    if scheme == "grpc":
        return "grpc"
    raise ValueError(f"endpoint {url!r}: use tcp://HOST:PORT or ipc://PATH (sgserve), http(s)://HOST:PORT "
                     f"(TF Serving REST) or grpc://HOST:PORT (TF Serving gRPC)")


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
        return "open" if as_list(self.rate) else "closed"

    def points(self) -> list[PointSpec]:
        """Every (batch size, load) pair, batch size outermost."""
        rates = [float(r) for r in as_list(self.rate)]
        loads = ([PointSpec(1, rate=r) for r in rates] if rates
                 else [PointSpec(1, concurrency=int(c)) for c in as_list(self.concurrency)])
        return [dataclasses.replace(p, batch_size=int(b)) for b in as_list(self.batch_size) for p in loads]

    def validate(self) -> None:
        """Raises ValueError naming the first setting that cannot work."""
        eps = self.endpoints()
        if not eps:
            raise ValueError("no endpoint given")
        for e in eps:
            endpoint_kind(e)
        if not as_list(self.batch_size) or any(int(b) < 1 for b in as_list(self.batch_size)):
            raise ValueError("batch sizes must be >= 1")
        if self.mode == "open":
            self._validate_open_loop()
        elif not as_list(self.concurrency) or any(int(c) < 1 for c in as_list(self.concurrency)):
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

    def _validate_open_loop(self) -> None:
        if any(float(r) <= 0 for r in as_list(self.rate)):
            raise ValueError("rates must be > 0 requests/s")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.requests is not None:
            raise ValueError("--requests works with the closed loop only; give the open loop a --duration")
        if self.senders is not None and not 1 <= self.senders <= self.max_senders:
            raise ValueError(f"senders must be between 1 and {self.max_senders}")

    def to_dict(self) -> dict[str, Any]:
        """The config as the JSON report shows it: lists always lists, the mode spelled out."""
        d = dataclasses.asdict(self)
        d.update(endpoints=self.endpoints(), mode=self.mode, batch_size=[int(b) for b in as_list(self.batch_size)])
        if self.mode == "open":
            d.update(rate=[float(r) for r in as_list(self.rate)], concurrency=None)
        else:
            d.update(concurrency=[int(c) for c in as_list(self.concurrency)], rate=None, schedule=None,
                     senders=None, max_senders=None, late_ms=None)
        return d
