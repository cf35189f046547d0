"""The Prometheus page: the broker's counters and status, under TF Serving's metric names.

The gateway asks the broker for ``{"stats": Stats.snapshot(), "status": Broker.status()}`` (the
``metrics`` request) on each scrape and serves ``render(snapshot)``. Rendering goes through
prometheus-client (a Collector of metric families, ``generate_latest``), so escaping and the text
format are the library's.

What TF Serving exports, read in its sources (github.com/tensorflow/serving at 9d981c5, and
TensorFlow's tensorflow/cc/saved_model/loader.cc), and what we take:

- servables/tensorflow/util.cc:66-68 ``/tensorflow/serving/request_count``, Counter (model_name,
  status); :117-123 status is ``error::Code_Name``, the canonical gRPC code name ("OK", "NOT_FOUND").
- util.cc:80-88 ``/tensorflow/serving/request_latency``, Sampler (model_name, API, entrypoint),
  microseconds, ``Buckets::Exponential(10, 1.8, 33)``. model_servers/prediction_service_impl.cc:52-59
  (and :91-98, :119-126): gRPC Predict / Classify / Regress record latency only when the status is
  OK and count every request; API "Predict", "Classify", "Regress", entrypoint "GRPC"; MultiInference
  and GetModelMetadata are not counted. model_servers/http_server.cc:194-201: REST counts every
  request, API is the URL's method ("predict", "classify", "regress"), entrypoint "REST".
- util.cc:70-78 ``/tensorflow/serving/runtime_latency`` (model_name, API, runtime): the TF run alone.
  Not exported: the worker does not report its run time.
- util.cc:54-63 ``request_example_counts`` / ``request_example_count_total``: tf.Examples per
  Classify/Regress request. Not exported: the broker does not parse Examples.
- servables/tensorflow/saved_model_warmup_util.cc:51-63 ``/tensorflow/serving/model_warmup_latency``
  Sampler (model_path, status), Exponential(10, 1.8, 33) microseconds, and
  ``/tensorflow/serving/model_warmup_records_read`` Counter (model_path, status); :227-229 status is
  ``Status::ToString()``, "OK" on success.
- tensorflow/cc/saved_model/loader.cc: ``/tensorflow/cc/saved_model/load_attempt_count`` Counter
  (model_path, status: "success" / "fail") and ``/tensorflow/cc/saved_model/load_latency`` Counter
  (model_path), microseconds of successful loads.
- batching/batching_util.h:117-153 ``/tensorflow/serving/batching_session/{input_batch_size,
  processed_batch_size,padding_size}`` (Exponential(1, 2, 14)) and batching/batching_session.cc:59-68
  ``queuing_latency``, ``wrapped_run_count``: recorded once per batch, which the broker does not see
  (it sees one reply per request). We export the per-request view as ``sgserve_batch_size``.
- core/request_logger.cc:34 ``/tensorflow/serving/request_log_count``: request logging, not in sgserve.
- util/prometheus_exporter.cc:53-63: the name is the path with every ``[^a-zA-Z0-9_]`` made ``:``
  (``/tensorflow/serving/request_count`` -> ``:tensorflow:serving:request_count``); :42-51 label names
  ``[^a-zA-Z0-9]`` -> ``_``; :32-40 label values escape ``\\`` and ``"``. :65-111 a histogram is
  ``# TYPE n histogram``, ``n_bucket{...,le="<bound>"}`` cumulative with the last ``le="+Inf"``, then
  ``n_sum`` and ``n_count``; bounds printed by absl::StrCat(double), 6 significant digits. :113-142
  counters and gauges are ``# TYPE n counter`` and ``n{...} <int>``: NO ``_total`` suffix, no HELP.
  :156-157 the default path is /monitoring/prometheus/metrics.

Our own metrics are named ``sgserve_*`` with Prometheus's conventions (``_total`` counters, base
units: seconds, bytes): the colon form is TF Serving's mechanical rewrite of its slash paths, and
Prometheus reserves colons for recording rules, so new names follow the convention instead.
"""
from __future__ import annotations

import os
from bisect import bisect_left
from typing import Any, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from sgserve.errors import CODE_NAMES, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED

# The page's Content-Type: generate_latest writes text format 0.0.4 (prometheus-client's
# CONTENT_TYPE_LATEST says version=1.0.0 in recent releases; this page is 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY = ":tensorflow:serving:request_latency"
LOAD_ATTEMPT_COUNT = ":tensorflow:cc:saved_model:load_attempt_count"
LOAD_LATENCY = ":tensorflow:cc:saved_model:load_latency"
WARMUP_LATENCY = ":tensorflow:serving:model_warmup_latency"
WARMUP_RECORDS_READ = ":tensorflow:serving:model_warmup_records_read"
TF_COUNTERS = (REQUEST_COUNT, LOAD_ATTEMPT_COUNT, LOAD_LATENCY, WARMUP_RECORDS_READ)

# TF Serving's API label on gRPC (prediction_service_impl.cc); REST and ZMQ keep sgserve's lowercase
# name, which is what TF Serving's REST API label is for predict, classify and regress.
GRPC_API = {"predict": "Predict", "classify": "Classify", "regress": "Regress", "multi_inference": "MultiInference"}
SYNTHETIC_WARMUP = "synthetic inputs"  # worker/serve.py's warmup source when it read no warmup file


def render(snapshot: dict[str, Any]) -> bytes:
    """The Prometheus text page (format 0.0.4) for the broker's ``metrics`` reply."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    page = generate_latest(registry)
    # prometheus-client names a counter's HELP and TYPE lines NAME_total; TF Serving's counters have no
    # _total (prometheus_exporter.cc:113-142) and dashboards query the bare name: put it back.
    for name in TF_COUNTERS:
        page = page.replace(f"# HELP {name}_total ".encode(), f"# HELP {name} ".encode())
        page = page.replace(f"# TYPE {name}_total counter\n".encode(), f"# TYPE {name} counter\n".encode())
    return page


class SnapshotCollector:
    """A prometheus-client collector over one snapshot: the families are built on ``collect``."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.stats: dict[str, Any] = snapshot.get("stats") or {}
        self.status: dict[str, Any] = snapshot.get("status") or {}

    def collect(self) -> Iterator[Metric]:
        bounds_us = (self.stats.get("latency") or {}).get("bounds_us") or []
        yield from tf_request_metrics(self.stats)
        yield from tf_model_metrics(self.status.get("model_status") or [], bounds_us)
        yield from sgserve_request_metrics(self.stats)
        yield from sgserve_status_metrics(self.status)
        yield from sgserve_worker_metrics(self.status.get("workers") or [])
        yield from sgserve_version_metrics(self.status.get("model_status") or [])


# -- TF Serving's names ----------------------------------------------------------------------------
def tf_request_metrics(stats: dict[str, Any]) -> Iterator[Metric]:
    """request_count (model_name, status) and request_latency (model_name, API, entrypoint)."""
    counts: dict[tuple[str, str], int] = {}
    for row in stats.get("requests", ()):
        key = (row["model"], code_name(row["code"]))
        counts[key] = counts.get(key, 0) + row["count"]
    family = Metric(REQUEST_COUNT, "The total number of requests.", "counter")
    for (model, status), n in sorted(counts.items()):
        family.add_sample(REQUEST_COUNT, {"model_name": model, "status": status}, n)
    yield family

    latency = stats.get("latency") or {}
    bounds = [tf_bound(b) for b in latency.get("bounds_us", ())]
    family = HistogramMetricFamily(REQUEST_LATENCY, "Distribution of wall time (in microseconds) for Tensorflow "
                                   "Serving request.", labels=["model_name", "API", "entrypoint"])
    for row in latency.get("series", ()):
        api = GRPC_API.get(row["api"], row["api"]) if row["entrypoint"] == "GRPC" else row["api"]
        family.add_metric([row["model"], api, row["entrypoint"]], cumulative(bounds, row["buckets"]),
                          row["sum_us"])
    yield family


def tf_model_metrics(models: list[dict[str, Any]], bounds_us: list[float]) -> Iterator[Metric]:
    """SavedModel load attempts and latency, warmup latency and records read, per model_path
    (base path/version). Read from status as it is now: a version's last load, not each retry, and
    a version that left status leaves the page (Prometheus reads that as a counter reset)."""
    attempts = Metric(LOAD_ATTEMPT_COUNT, "The number of times a SavedModel was successfully loaded.", "counter")
    load = Metric(LOAD_LATENCY, "Latency in microseconds for SavedModels that were successfully loaded.", "counter")
    records = Metric(WARMUP_RECORDS_READ, "Total number of warmup records read during model warmup.", "counter")
    warmup = HistogramMetricFamily(WARMUP_LATENCY, "Distribution of wall time (in microseconds) for warming up "
                                   "the model.", labels=["model_path", "status"])
    bounds = [tf_bound(b) for b in bounds_us]  # TF's warmup layout is request_latency's: (10, 1.8, 33)
    for model, row in versions_of(models):
        path = os.path.join(model["base_path"], str(row["version"]))
        if row.get("load_seconds") is not None:
            attempts.add_sample(LOAD_ATTEMPT_COUNT, {"model_path": path, "status": "success"}, 1)
            load.add_sample(LOAD_LATENCY, {"model_path": path}, round(row["load_seconds"] * 1e6))
        elif row.get("state") == "FAILED":
            attempts.add_sample(LOAD_ATTEMPT_COUNT, {"model_path": path, "status": "fail"}, 1)
        warmed = row.get("warmup") or {}
        source = str(warmed.get("source") or "")
        if source and source != SYNTHETIC_WARMUP and not source.startswith("disabled"):  # a warmup file
            records.add_sample(WARMUP_RECORDS_READ, {"model_path": path, "status": "OK"}, warmed.get("requests", 0))
        seconds = warmed.get("seconds")  # the worker's warmup time, when it reports one
        if isinstance(seconds, (int, float)) and bounds:
            us = seconds * 1e6
            buckets = [0] * (len(bounds_us) + 1)
            buckets[bisect_left(bounds_us, us)] = 1
            warmup.add_metric([path, "OK"], cumulative(bounds, buckets), us)
    yield from (attempts, load, warmup, records)


# -- sgserve's own --------------------------------------------------------------------------------
def sgserve_request_metrics(stats: dict[str, Any]) -> Iterator[Metric]:
    """Every count by model, API, entrypoint and code; 429s and 504s apart; batch sizes."""
    requests = CounterMetricFamily("sgserve_requests", "Requests answered, by model, API, front door and status "
                                   "code (HTTP-style).", labels=["model", "api", "entrypoint", "code"])
    rejected = CounterMetricFamily("sgserve_requests_rejected", "Requests turned away because the server was "
                                   "overloaded (429 RESOURCE_EXHAUSTED).", labels=["model"])
    late = CounterMetricFamily("sgserve_deadline_exceeded", "Requests answered 504 DEADLINE_EXCEEDED (their "
                               "deadline passed before a worker answered).", labels=["model"])
    by_model: dict[str, list[int]] = {}
    for row in stats.get("requests", ()):
        requests.add_metric([row["model"], row["api"], row["entrypoint"], str(row["code"])], row["count"])
        pair = by_model.setdefault(row["model"], [0, 0])
        pair[0] += row["count"] if row["code"] == RESOURCE_EXHAUSTED else 0
        pair[1] += row["count"] if row["code"] == DEADLINE_EXCEEDED else 0
    for model, (n_rejected, n_late) in sorted(by_model.items()):
        rejected.add_metric([model], n_rejected)
        late.add_metric([model], n_late)
    yield from (requests, rejected, late)

    batch = stats.get("batch") or {}
    bounds = [floatToGoString(b) for b in batch.get("bounds", ())]
    family = HistogramMetricFamily("sgserve_batch_size", "Rows (padding included) of the batched model call "
                                   "each request ran in (server-side batching).", labels=["model"])
    for row in batch.get("series", ()):
        family.add_metric([row["model"]], cumulative(bounds, row["buckets"]), row["sum"])
    yield family


def sgserve_status_metrics(status: dict[str, Any]) -> Iterator[Metric]:
    """Server-wide figures from status: queue, splits, uptime, config health."""
    server = status.get("server") or {}
    split = status.get("split") or {}
    yield GaugeMetricFamily("sgserve_queue_depth", "Requests queued in the broker, waiting for a free worker.",
                            value=status.get("queued", 0))
    yield CounterMetricFamily("sgserve_split_requests", "Requests split across several workers (scatter-gather).",
                              value=split.get("requests", 0))
    yield CounterMetricFamily("sgserve_split_parts", "Parts the split requests were cut into.",
                              value=split.get("parts", 0))
    yield GaugeMetricFamily("sgserve_uptime_seconds", "Seconds since the broker started.",
                            value=server.get("uptime_s", 0))
    yield GaugeMetricFamily("sgserve_model_config_error", "1 while the last model config read was refused (the "
                            "running config stays), else 0.", value=int(bool(status.get("config_error"))))


def sgserve_worker_metrics(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per worker slot (label ``worker``: its index, stable across restarts)."""
    ready = GaugeMetricFamily("sgserve_worker_ready", "1 when the worker is READY to take requests.",
                              labels=["worker"])
    inflight = GaugeMetricFamily("sgserve_worker_inflight", "Requests the worker holds now.", labels=["worker"])
    served = CounterMetricFamily("sgserve_worker_served", "Requests the worker answered.", labels=["worker"])
    restarts = CounterMetricFamily("sgserve_worker_restarts", "Times the worker process was restarted.",
                                   labels=["worker"])
    for w in workers:
        index = [str(w["index"])]
        ready.add_metric(index, int(w.get("state") == "READY"))
        inflight.add_metric(index, w.get("inflight", 0))
        served.add_metric(index, w.get("served", 0))
        restarts.add_metric(index, w.get("restarts", 0))
    yield from (ready, inflight, served, restarts)


def sgserve_version_metrics(models: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per model version: its state, its shared-memory bytes and its load time."""
    labels = ["model", "version"]
    state = GaugeMetricFamily("sgserve_model_version_state", "1 for the version's current state (LOADING, "
                              "AVAILABLE, UNLOADING, END, FAILED).", labels=[*labels, "state"])
    total = GaugeMetricFamily("sgserve_model_version_bytes", "Bytes of shared memory the version maps, shared "
                              "tensors included.", labels=labels)
    own = GaugeMetricFamily("sgserve_model_version_own_bytes", "Bytes of shared memory only this version holds "
                            "(their sum over versions is what the models take).", labels=labels)
    load = GaugeMetricFamily("sgserve_model_version_load_seconds", "Seconds from the start of the version's "
                             "load to AVAILABLE.", labels=labels)
    for model, row in versions_of(models):
        key = [model["name"], str(row["version"])]
        state.add_metric([*key, str(row.get("state"))], 1)
        total.add_metric(key, row.get("bytes", 0))
        own.add_metric(key, row.get("own_bytes", 0))
        if row.get("load_seconds") is not None:
            load.add_metric(key, row["load_seconds"])
    yield from (state, total, own, load)


# -- helpers ---------------------------------------------------------------------------------------
def versions_of(models: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(model, version row) for every version in status's ``model_status``."""
    for model in models:
        for row in model.get("versions") or ():
            yield model, row


def code_name(code: int) -> str:
    """TF Serving's status label for one of sgserve's HTTP-style codes: the gRPC code name."""
    return CODE_NAMES.get(code, "UNKNOWN")


def tf_bound(bound: float) -> str:
    """A bucket bound as TF Serving prints it (absl::StrCat(double): six significant digits)."""
    return "%.6g" % bound


def cumulative(bounds: list[str], buckets: list[int]) -> list[tuple[str, float]]:
    """prometheus-client's buckets, (le, cumulative count) up to +Inf, from per-bucket counts."""
    out, total = [], 0
    for le, n in zip([*bounds, "+Inf"], buckets):
        total += n
        out.append((le, total))
    return out


__all__ = ["render", "SnapshotCollector", "CONTENT_TYPE", "REQUEST_COUNT", "REQUEST_LATENCY", "LOAD_ATTEMPT_COUNT",
           "LOAD_LATENCY", "WARMUP_LATENCY", "WARMUP_RECORDS_READ", "code_name"]
