"""Part "pacing" of bench/bench_lifecycle.py: full swaps under load for several `--load-bandwidth`
settings, load time against tail latency (bench/RESULTS.md section 4.4).

For each setting in --load-bandwidths (rounds interleaved, --pacing-rounds of them) a fresh server
runs the swap part with every tensor changing: the same open-loop rate for every setting (probed
once, at the first server, as --load-fraction x capacity, unless --rate is given). Each swap
reports steady p99 (the window before the publish), swap-window p99, their ratio (target <= 1.5),
errors, how long the loader took to write the segment, and publish -> AVAILABLE.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def part_pacing(args, part_swap: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    settings = [s.strip() for s in args.load_bandwidths.split(",") if s.strip()]
    out: dict[str, Any] = {"settings": settings, "runs": [], "segment_dir": os.environ.get("SGSERVE_SEGMENT_DIR")}
    for rnd in range(args.pacing_rounds):
        for bw in settings:
            C.log(f"pacing: round {rnd + 1}/{args.pacing_rounds}, --load-bandwidth {bw}")
            r = part_swap(args, extra=["--load-bandwidth", bw] + list(args.server_arg))
            if args.rate is None and r.get("rate"):  # one rate for every setting: the first probe's
                args.rate = r["rate"]
                out["rate_source"] = r.get("rate_source")
            out["rate"] = args.rate
            r.pop("records", None)  # per-request samples: the swap part's plot needs them, this one does not
            out["runs"].append({"bandwidth": bw, "round": rnd, "rows": summary_rows(r), "swap": r})
    out["summary"] = summarize(out["runs"], settings)
    return out


def _phase(sw: dict[str, Any], name: str) -> dict[str, Any]:
    return next((ph for ph in sw.get("phases", []) if ph["phase"] == name), {})


def summary_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per swap; the swap window is also split into the loader's write and the workers' load."""
    rows = []
    for sw in r["swaps"]:
        log = sw.get("server_log", {})
        write, load = _phase(sw, "loader writes segment"), _phase(sw, "workers load + warm")
        after = _phase(sw, "old version drains + unloads")
        rows.append({"to_version": sw["to_version"], "steady_p50_ms": sw["steady"]["p50_ms"],
                     "steady_p99_ms": sw["steady"]["p99_ms"], "swap_p50_ms": sw["swap"]["p50_ms"],
                     "swap_p99_ms": sw["swap"]["p99_ms"], "swap_max_ms": sw["swap"]["max_ms"],
                     "p99_ratio": sw["p99_ratio"], "errors": sw["swap"]["errors"] + sw["steady"]["errors"],
                     "write_p99_ms": write.get("p99_ms"), "write_p50_ms": write.get("p50_ms"),
                     "write_p99_ratio": _ratio(write.get("p99_ms"), sw["steady"]["p99_ms"]),
                     "workers_load_p99_ms": _max(load.get("p99_ms"), after.get("p99_ms")),
                     "loader_cores_while_writing": (write.get("machine") or {}).get("loader_cpu_s_per_s"),
                     "late_sends": sw["swap"]["late_sends"], "segment_write_s": log.get("loader_seconds"),
                     "publish_to_available_s": sw["timeline_s"].get("available"),
                     "other_load_cores": _other_cores(sw)})
    return rows


def _med(vals: list[float]) -> float:
    return round(C.median(vals), 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _max(*vals: float | None) -> float | None:
    vals = tuple(v for v in vals if v is not None)
    return max(vals) if vals else None


def _other_cores(sw: dict[str, Any]) -> float | None:
    """Cores busy outside the benchmark (server tree + this client) during the steady window."""
    m = sw["steady"].get("machine") or {}
    if "cpu_user_s_per_s" not in m:
        return None
    busy = sum(m.get(f"cpu_{k}_s_per_s", 0.0) for k in ("user", "nice", "system", "irq", "softirq"))
    ours = sum(m.get(f"{role}_cpu_s_per_s", 0.0) for role in ("broker", "worker", "loader", "client"))
    return round(busy - ours, 2)


def summarize(runs: list[dict[str, Any]], settings: list[str]) -> list[dict[str, Any]]:
    out = []
    for bw in settings:
        rows = [row for run in runs if run["bandwidth"] == bw for row in run["rows"]]
        ratios = sorted(r["p99_ratio"] for r in rows if r["p99_ratio"] is not None)
        wratios = sorted(r["write_p99_ratio"] for r in rows if r["write_p99_ratio"] is not None)
        writes = [r["segment_write_s"] for r in rows if r["segment_write_s"] is not None]
        avail = [r["publish_to_available_s"] for r in rows if r["publish_to_available_s"] is not None]
        out.append({"bandwidth": bw, "swaps": len(rows), "errors": sum(r["errors"] for r in rows),
                    "p99_ratio_median": _med(ratios) if ratios else None,
                    "p99_ratio_max": max(ratios) if ratios else None, "p99_ratios": ratios,
                    "write_p99_ratio_median": _med(wratios) if wratios else None, "write_p99_ratios": wratios,
                    "workers_load_p99_ms_median": _med([r["workers_load_p99_ms"] for r in rows
                                                            if r["workers_load_p99_ms"] is not None]) if rows else None,
                    "steady_p99_ms_median": _med([r["steady_p99_ms"] for r in rows]) if rows else None,
                    "swap_p99_ms_median": _med([r["swap_p99_ms"] for r in rows]) if rows else None,
                    "segment_write_s_median": _med(writes) if writes else None,
                    "publish_to_available_s_median": _med(avail) if avail else None,
                    "other_load_cores_max": max((r["other_load_cores"] or 0.0 for r in rows), default=None)})
    return out


def print_pacing(p: dict[str, Any]) -> None:
    print(f"\nPacing: full swaps at {p['rate']:g} req/s ({p.get('rate_source') or '--rate'}); segment dir "
          f"{p.get('segment_dir') or '/dev/shm'}")
    for run in p["runs"]:  # recomputed, so --replot shows what this version of the script reports
        run["rows"] = summary_rows(run["swap"])
    p["summary"] = summarize(p["runs"], p["settings"])
    rows = [[run["bandwidth"], run["round"], r["to_version"], r["steady_p50_ms"], r["steady_p99_ms"], r["swap_p99_ms"],
             r["p99_ratio"], r["write_p50_ms"], r["write_p99_ms"], r["write_p99_ratio"], r["workers_load_p99_ms"],
             r["loader_cores_while_writing"], r["errors"], r["late_sends"], r["segment_write_s"],
             r["publish_to_available_s"], r["other_load_cores"]] for run in p["runs"] for r in run["rows"]]
    print(C.table(["bandwidth", "round", "to v", "steady p50", "steady p99", "swap p99", "p99 ratio", "write p50",
                   "write p99", "write p99 ratio", "workers-load p99", "loader cores", "errors", "late sends",
                   "segment write s", "publish->AVAIL s", "other cores"], rows))
    print(C.table(["bandwidth", "swaps", "errors", "p99 ratio median", "max", "write p99 ratio median",
                   "steady p99 median", "swap p99 median", "workers-load p99 median",
                   "segment write s", "publish->AVAIL s", "other cores max"],
                  [[s["bandwidth"], s["swaps"], s["errors"], s["p99_ratio_median"], s["p99_ratio_max"],
                    s["write_p99_ratio_median"], s["steady_p99_ms_median"], s["swap_p99_ms_median"],
                    s["workers_load_p99_ms_median"], s["segment_write_s_median"],
                    s["publish_to_available_s_median"], s["other_load_cores_max"]] for s in p["summary"]]))


def plot_pacing(p: dict[str, Any], name: str, machine: dict[str, Any], title: str) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for i, s in enumerate(p["summary"]):
        rows = [r for run in p["runs"] if run["bandwidth"] == s["bandwidth"] for r in run["rows"]]
        pts = [(r["publish_to_available_s"], r["p99_ratio"]) for r in rows
               if r["publish_to_available_s"] is not None and r["p99_ratio"] is not None]
        if pts:
            ax.scatter(*zip(*pts), color=f"C{i}", label=f"--load-bandwidth {s['bandwidth']}")
    ax.axhline(1.5, color="r", ls="--", lw=0.8, label="target 1.5x")
    ax.set_xlabel("publish -> AVAILABLE (s)")
    ax.set_ylabel("p99 swap window / p99 steady")
    ax.set_title(f"{title}: each point one full swap", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    labels = [s["bandwidth"] for s in p["summary"]]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [s["steady_p99_ms_median"] or 0 for s in p["summary"]], 0.4, label="p99 steady")
    ax.bar([x + 0.2 for x in xs], [s["swap_p99_ms_median"] or 0 for s in p["summary"]], 0.4, label="p99 swap window")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels)
    ax.set_xlabel("--load-bandwidth")
    ax.set_ylabel("ms (median over swaps)")
    ax.set_title(f"{title}: p99, steady vs swap window", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    C.save_figure(fig, name, "bench_lifecycle pacing", machine)


def plot_combined(results: list[tuple[str, dict[str, Any]]], name: str, machine: dict[str, Any]) -> None:
    """One PNG over several pacing runs (label, bench_lifecycle result): load time against the
    p99 ratio of the loader's write window and of the whole swap window, one point per swap."""
    plt = C.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    markers = "osD^v<>"
    colors: dict[str, str] = {}
    for j, (label, result) in enumerate(results):
        p = result["parts"]["pacing"]
        for bw in p["settings"]:
            i = colors.setdefault(bw, f"C{len(colors)}")
            rows = [summary_rows(run["swap"]) for run in p["runs"] if run["bandwidth"] == bw]
            rows = [r for rs in rows for r in rs if r["segment_write_s"] is not None]
            for ax, key in ((axes[0], "write_p99_ratio"), (axes[1], "p99_ratio")):
                pts = [(r["segment_write_s"], r[key]) for r in rows if r[key] is not None]
                if pts:
                    ax.scatter(*zip(*pts), color=i, marker=markers[j % len(markers)], s=28,
                               label=f"{label}, {bw}")
    for ax, what in ((axes[0], "while the loader writes"), (axes[1], "whole swap window")):
        ax.axhline(1.5, color="r", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("loader: segment written in (s, log)")
        ax.set_ylabel("p99 / steady p99 (log)")
        ax.set_title(f"Full swaps under open-loop load: p99 {what} (dashed: target 1.5x)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=6, ncol=2)
    C.save_figure(fig, name, "bench_lifecycle pacing", machine)


if __name__ == "__main__":
    import json

    # python bench/_swap_pacing.py NAME LABEL=bench/results/X.json ...: the combined PNG
    pairs = [a.split("=", 1) for a in sys.argv[2:]]
    loaded = [(label, json.load(open(path))) for label, path in pairs]
    plot_combined(loaded, sys.argv[1], loaded[0][1]["machine"])
