"""Request counters for Prometheus: one pure accumulator the broker feeds as it answers requests.

Every request from every front door (native ZeroMQ, gRPC, REST) passes through the broker, so the
broker alone counts, and counts exactly. It holds no lock, touches no socket and formats nothing:
``request`` and ``batch`` are on the hot path (a dict update and a bisect); ``snapshot`` copies the
counts into plain data that crosses the wire in the ``metrics`` reply, and the gateway renders it
for Prometheus (sgserve/frontdoor/metrics.py).

Bucket layouts are TF Serving's, so its dashboards' quantiles read the same: request latency in
microseconds, ``Buckets::Exponential(10, 1.8, 33)`` (tensorflow_serving/servables/tensorflow/util.cc),
and batch sizes ``Buckets::Exponential(1, 2, 14)`` (tensorflow_serving/batching/batching_util.h).
TF builds the bounds by repeated multiplication; so do we, for the same doubles.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Any

OK = 200  # sgserve.errors.OK; TF Serving records latency for successful requests only


def exponential_bounds(scale: float, growth: float, count: int) -> list[float]:
    """The finite bucket bounds of TF's ``monitoring::Buckets::Exponential`` (TF adds DBL_MAX after
    them; here the last bucket is +Inf)."""
    bounds, bound = [], float(scale)
    for _ in range(count):
        bounds.append(bound)
        bound *= growth
    return bounds


LATENCY_BOUNDS_US = exponential_bounds(10, 1.8, 33)  # 10 us .. ~25 min
BATCH_BOUNDS = exponential_bounds(1, 2, 14)  # 1 .. 8192 rows


class Stats:
    """Counts per (model, api, entrypoint, code), latency histograms per (model, api, entrypoint),
    batch-size histograms per model. See ``snapshot`` for what comes out.

    A bucket counts the values <= its bound (Prometheus's ``le``); TF counts values < its bound, which
    differs only for a value exactly on a bound.
    """

    __slots__ = ("_counts", "_latency", "_batches")

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str, int], int] = {}
        # keyed like _counts (code always 200): one tuple per call. Value: bucket counts, then the sum.
        self._latency: dict[tuple[str, str, str, int], list[float]] = {}
        self._batches: dict[str, list[float]] = {}

    def request(self, model: str, api: str, entrypoint: str, code: int, latency_s: float) -> None:
        """One answered request: ``api`` e.g. "predict", ``entrypoint`` "ZMQ", "GRPC" or "REST",
        ``code`` sgserve's HTTP-style status, ``latency_s`` from its arrival to its answer."""
        key = (model, api, entrypoint, code)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        if code == OK:
            us = latency_s * 1e6
            hist = self._latency.get(key)
            if hist is None:
                hist = self._latency[key] = [0] * (len(LATENCY_BOUNDS_US) + 1) + [0.0]
            hist[bisect_left(LATENCY_BOUNDS_US, us)] += 1
            hist[-1] += us

    def batch(self, model: str, size: int) -> None:
        """The size (rows, padding included) of the batched model call one request ran in."""
        hist = self._batches.get(model)
        if hist is None:
            hist = self._batches[model] = [0] * (len(BATCH_BOUNDS) + 1) + [0.0]
        hist[bisect_left(BATCH_BOUNDS, size)] += 1
        hist[-1] += size

    def snapshot(self) -> dict[str, Any]:
        """Plain msgpack-able data, counts since the broker started::

            {"requests": [{"model", "api", "entrypoint", "code", "count"}, ...],
             "latency": {"bounds_us": [33 floats],
                         "series": [{"model", "api", "entrypoint", "buckets": [34 ints], "sum_us"}, ...]},
             "batch": {"bounds": [14 floats],
                       "series": [{"model", "buckets": [15 ints], "sum"}, ...]}}

        ``buckets`` are per bucket, not cumulative: ``buckets[i]`` counts values <= ``bounds[i]`` and
        above the bound before; the last one counts values above every bound (+Inf). Latency covers
        successful (200) requests only, as TF Serving's request_latency does; ``requests`` all.
        Rows are sorted, so equal counts give equal snapshots.
        """
        requests = [{"model": m, "api": a, "entrypoint": e, "code": c, "count": n}
                    for (m, a, e, c), n in sorted(self._counts.items())]
        latency = [{"model": m, "api": a, "entrypoint": e, "buckets": [int(b) for b in h[:-1]], "sum_us": h[-1]}
                   for (m, a, e, _), h in sorted(self._latency.items())]
        batches = [{"model": m, "buckets": [int(b) for b in h[:-1]], "sum": float(h[-1])}
                   for m, h in sorted(self._batches.items())]
        return {"requests": requests,
                "latency": {"bounds_us": list(LATENCY_BOUNDS_US), "series": latency},
                "batch": {"bounds": list(BATCH_BOUNDS), "series": batches}}


__all__ = ["Stats", "LATENCY_BOUNDS_US", "BATCH_BOUNDS", "exponential_bounds"]
