"""What a benchmark measured and how it is shown: the per-point result, the JSON report, the table.

One definition of each number (nearest-rank percentiles, ratios against endpoint A) shared by the
table, the JSON document and the plot.
"""
from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any, Iterable, Sequence

from sgserve.bench.config import BenchConfig


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


def percentile(sorted_ms: list[float], p: float) -> float:
    """Nearest-rank percentile of a sorted list (bench/_common.py uses the same definition)."""
    if not sorted_ms:
        return 0.0
    k = min(len(sorted_ms) - 1, max(0, int(round(p / 100.0 * len(sorted_ms) + 0.5)) - 1))
    return sorted_ms[k]


def endpoint_letter(index: int) -> str:
    """A, B, C ... : how tables and comparisons name the endpoints of one run."""
    return chr(ord("A") + index) if index < 26 else f"E{index}"


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
    split = any("+" in w for r in results for w in r.workers_seen)
    if split:  # the server split some requests across workers (--split-min-rows)
        headers.append("split %")
    rows = []
    for r in results:
        name = f"{endpoint_letter(r.endpoint_index)}: {r.endpoint}" if several else r.endpoint
        row = [name, r.load_label(), str(r.batch_size), f"{r.qps:.1f}", f"{r.rows_per_s:.1f}",
               f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}", f"{r.max_ms:.3f}", _errors_cell(r)]
        if open_loop:
            row[5:5] = [f"{r.achieved_rate:.1f}" if r.achieved_rate is not None else "-",
                        str(r.late) if r.late is not None else "-"]
        if split:
            seen = sum(r.workers_seen.values())
            row.append(f"{100.0 * sum(n for w, n in r.workers_seen.items() if '+' in w) / seen:.0f}" if seen else "-")
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    left = {0, 1}  # text columns; numbers are right-aligned

    def line(cells: Iterable[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers)] + [line(r) for r in rows]).rstrip()


def format_comparisons(comparisons: Sequence[dict[str, Any]]) -> str:
    """One line per comparison: "B/A at c=16 b=1: QPS x1.020, p50 x0.980, p99 x1.100"."""
    def x(v: float | None) -> str:
        return f"x{v:.3f}" if v is not None else "n/a"

    lines = []
    for c in comparisons:
        load = f"rate={c['offered_rate']:g}/s" if c["offered_rate"] is not None else f"c={c['concurrency']}"
        lines.append(f"{c['label']} at {load} b={c['batch_size']}: QPS {x(c['qps_ratio'])}, "
                     f"p50 {x(c['p50_ratio'])}, p99 {x(c['p99_ratio'])}")
    return "\n".join(lines)
