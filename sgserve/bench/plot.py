"""Latency against achieved QPS as a PNG (``sgserve bench --plot``); matplotlib is optional."""
from __future__ import annotations

from typing import Sequence

from sgserve.bench.results import BenchResult, endpoint_letter, machine_info

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
