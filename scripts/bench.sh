#!/usr/bin/env bash
# Runs the sgserve benchmarks with their defaults; results land in bench/results/
# (JSON + PNG) and each prints its table. See bench/RESULTS.md for what they measure.
#
#   scripts/bench.sh                  # all of them (memory at 1 and 3 GiB, peers: the long ones)
#   scripts/bench.sh --quick          # smaller sizes, fewer rounds/repeats; writes
#                                     # bench/results/*_quick.{json,png} (keeps the full results)
#   PYTHON=/path/to/python scripts/bench.sh
#
# Needs: tensorflow-cpu, pyzmq, msgpack, psutil, numpy, click (the sgserve deps); matplotlib for
# the PNGs (skipped with a note without it). bench_memory reads /proc/PID/pagemap: run as root for
# the "unique pages" column (it is left empty otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1

echo "== bench_request_cost" >&2
if (( QUICK )); then "$PY" bench/bench_request_cost.py --quick --name bench_request_cost_quick; else "$PY" bench/bench_request_cost.py; fi
echo "== bench_overhead" >&2
if (( QUICK )); then "$PY" bench/bench_overhead.py --rounds 3 --calls 1000 --name bench_overhead_quick; else "$PY" bench/bench_overhead.py; fi
echo "== bench_throughput" >&2
if (( QUICK )); then "$PY" bench/bench_throughput.py --repeats 1 --duration 3 --name bench_throughput_quick; else "$PY" bench/bench_throughput.py; fi
echo "== bench_memory" >&2
if (( QUICK )); then "$PY" bench/bench_memory.py --sizes-gib 1 --name bench_memory_quick; else "$PY" bench/bench_memory.py --sizes-gib 1,3; fi
echo "== bench_lifecycle" >&2
if (( QUICK )); then "$PY" bench/bench_lifecycle.py --quick; else "$PY" bench/bench_lifecycle.py; fi
echo "== bench_peers (needs the bench extra: pip install -e '.[bench]', and '.[ray]' for Ray Serve)" >&2
if (( QUICK )); then "$PY" bench/bench_peers.py --quick; else "$PY" bench/bench_peers.py --repeats 1; fi
