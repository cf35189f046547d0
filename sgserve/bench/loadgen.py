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

The pieces live next to this module: ``config`` (BenchConfig, PointSpec), ``targets`` (the sgserve
and REST endpoints), ``runner`` (the sender threads), ``results`` (BenchResult, the report and the
table), ``plot`` and ``progress``; their public names are re-exported here.
"""
from __future__ import annotations

import time

import numpy as np

from sgserve.bench.config import SCHEDULES, BenchConfig, PointSpec, endpoint_kind
from sgserve.bench.plot import MATPLOTLIB_MISSING, plot_results, require_matplotlib
from sgserve.bench.progress import BenchProgress
from sgserve.bench.results import (BenchResult, compare_results, endpoint_letter, format_comparisons, format_table,
                                   machine_info, make_report)
from sgserve.bench.runner import Runner
from sgserve.bench.targets import Endpoint, EndpointDown, open_endpoint, signature_from_tfserving, synth_inputs
from sgserve.errors import ServeError

TICK_S = 0.1  # how often the controlling thread checks a slice's end and updates the progress


def run_points(cfg: BenchConfig, progress: bool = True) -> list[BenchResult]:
    """Runs every point of ``cfg`` against every endpoint; one BenchResult per (point, endpoint).

    Order: batch size, then load, then endpoint (as given). Raises ValueError for a config that
    cannot work, EndpointDown when an endpoint does not answer, ServeError when it cannot serve the
    model. Refusals during the run (429, 503, ...) are counted in ``error_codes``, not raised.
    """
    cfg.validate()
    show = BenchProgress(progress)
    endpoints: list[Endpoint] = []
    try:
        sigs = []
        for url in cfg.endpoints():  # every endpoint must answer before any load starts
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
        show.close()
        for ep in endpoints:
            ep.close()


def run_bench(cfg: BenchConfig, progress: bool = True) -> BenchResult:
    """Runs a config that has exactly one point and one endpoint; see run_points for sweeps."""
    cfg.validate()
    if len(cfg.points()) != 1 or len(cfg.endpoints()) != 1:
        raise ValueError("run_bench runs one point against one endpoint; use run_points for sweeps and comparisons")
    return run_points(cfg, progress)[0]


def _run_point(endpoints: list[Endpoint], sigs: list[dict], spec: PointSpec, cfg: BenchConfig,
               show: BenchProgress, counter: str) -> list[BenchResult]:
    """Warms up each endpoint, then measures them alone or interleaved (A B A B ...) for cfg.duration each."""
    runners: list[Runner] = []
    names = ([f"{endpoint_letter(i)}: {ep.url}" for i, ep in enumerate(endpoints)] if len(endpoints) > 1
             else [endpoints[0].url])
    heads = [f"{counter} {name} {spec.label()} b={spec.batch_size}" for name in names]
    try:
        for i, (ep, sig) in enumerate(zip(endpoints, sigs)):
            runners.append(Runner(ep, i, sig, spec, cfg, seed=cfg.seed * 7919 + i))
        for runner, head in zip(runners, heads):
            if cfg.warmup > 0:
                _run_slice(runner, cfg.warmup, False, show, head)
        if len(runners) == 1:
            _run_slice(runners[0], cfg.duration, True, show, heads[0], quota=cfg.requests)
        else:
            while any(r.planned_s < cfg.duration - 1e-9 for r in runners):
                for runner, head in zip(runners, heads):
                    left = cfg.duration - runner.planned_s
                    if left > 1e-9:
                        _run_slice(runner, min(cfg.slice_s, left), True, show, head)
        results = [r.result() for r in runners]
        for head, r in zip(heads, results):
            show.update(head, 1.0, 1.0, _final_text(r), final=True)
        return results
    finally:
        for r in runners:
            r.close()
        if any(r.stuck() for r in runners):
            show.note("warning: some sender threads did not finish in time")


def _run_slice(runner: Runner, seconds: float | None, measure: bool, show: BenchProgress, head: str,
               quota: int | None = None) -> None:
    runner.begin(seconds, measure, quota)
    try:
        while not runner.done():
            time.sleep(TICK_S if seconds is None else min(TICK_S, max(0.0, seconds - runner.elapsed())))
            _show_live(runner, head, measure, seconds, quota, show)
    finally:
        runner.end()


def _show_live(runner: Runner, head: str, measure: bool, seconds: float | None, quota: int | None,
               show: BenchProgress) -> None:
    if not measure:
        show.update(head, runner.elapsed(), seconds, f"warmup {runner.elapsed():.1f}/{seconds:g} s")
        return
    done, errors, p50, p99 = runner.tally.live()
    so_far = runner.tally.seconds + runner.elapsed()
    if quota is not None and seconds is None:
        progress, total, goal = runner.started(), quota, f"{runner.started()}/{quota} req"
    else:
        progress, total, goal = so_far, runner.cfg.duration, f"{so_far:.1f}/{runner.cfg.duration:g} s"
    show.update(head, progress, total, f"{goal}, {done} answers, {done / max(so_far, 1e-9):.0f}/s, "
                                       f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, {errors} errors")


def _final_text(r: BenchResult) -> str:
    extra = f", sent {r.achieved_rate:g}/s of {r.offered_rate:g}/s, {r.late} late" if r.mode == "open" else ""
    return f"done, {r.qps:.0f} QPS, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, {r.errors} errors{extra}"


__all__ = ["BenchConfig", "BenchResult", "PointSpec", "EndpointDown", "run_points", "run_bench", "make_report",
           "compare_results", "format_table", "format_comparisons", "plot_results", "MATPLOTLIB_MISSING",
           "require_matplotlib", "synth_inputs", "signature_from_tfserving", "machine_info", "endpoint_kind",
           "endpoint_letter", "SCHEDULES"]
