"""Server-side batching vs none: the same model and workers, single-row clients, in one interleaved run.

Two servers serve the demo model with the same workers and cores, one with `--enable-batching`;
`sgserve bench`'s engine (sgserve.bench.loadgen) drives both with the same closed-loop clients, each
sending one row per request, alternating 1 s slices between the two servers (A B A B ...) so noise
hits both alike. Reported per concurrency: QPS, p50/p99 of each, and the ratios batched/unbatched.
Target (issue 4): at 64 clients, batched QPS >= 3x unbatched with a p99 no worse.

    .venv/bin/python bench/bench_batching.py                 # c = 1,16,64, 10 s per point
    .venv/bin/python bench/bench_batching.py --quick         # c = 64, 3 s
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as C  # noqa: E402

from sgserve.bench import loadgen  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--batch-timeout-micros", type=int, default=1000)
    p.add_argument("--max-enqueued-batches", type=int, default=16)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--name", default=None)
    args = p.parse_args()
    if args.quick:
        args.concurrency, args.duration = "64", 3.0
    name = args.name or ("bench_batching_quick" if args.quick else "bench_batching")
    machine = C.machine_info()
    os.makedirs(C.CACHE_DIR, exist_ok=True)
    params_file = os.path.join(C.CACHE_DIR, "batching.config")
    with open(params_file, "w") as f:
        f.write(f"max_batch_size {{ value: {args.max_batch_size} }}\n"
                f"batch_timeout_micros {{ value: {args.batch_timeout_micros} }}\n"
                f"max_enqueued_batches {{ value: {args.max_enqueued_batches} }}\n")
    common = ["--workers", str(args.workers), "--cpus-per-worker", str(args.cpus_per_worker)]
    plain = C.Server(common, label="unbatched")
    batched = C.Server(common + ["--enable-batching", "--batching-parameters-file", params_file], label="batched")
    try:
        plain.start()
        batched.start()
        C.wait_quiet()
        cfg = loadgen.BenchConfig(endpoint=plain.endpoint, compare=batched.endpoint, model="demo",
                                  concurrency=[int(c) for c in args.concurrency.split(",")], batch_size=1,
                                  duration=args.duration, warmup=2.0, timeout=30.0)
        results = loadgen.run_points(cfg)
    finally:
        batched.stop()
        plain.stop()
    report = loadgen.make_report(cfg, results)
    report["machine"] = machine
    report["batching_parameters"] = open(params_file).read()
    report["servers"] = {"A": "unbatched", "B": "batched (--enable-batching)"}
    C.write_json(name, report)
    print(loadgen.format_table(results))
    print(loadgen.format_comparisons(report["comparisons"]))
    rows = [[c["concurrency"], f"{c['qps_ratio']:.2f}", f"{c['p50_ratio']:.2f}", f"{c['p99_ratio']:.2f}"]
            for c in report["comparisons"]]
    print(C.table(["clients", "QPS batched/unbatched", "p50 ratio", "p99 ratio"], rows))
    try:
        loadgen.plot_results(results, C.png_path(name), title="demo, 1 row per request: A unbatched, B batched")
        C.log(f"wrote {C.png_path(name)}")
    except Exception as exc:  # noqa: BLE001 - the numbers are in the JSON; the plot is a convenience
        C.log(f"no plot: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
