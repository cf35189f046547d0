"""The long live fuzz (issue #11, item 5): >= 100,000 generated messages over the native ZeroMQ,
REST and gRPC front doors of one server started with the real CLI. The generator and the checks
are tests/fuzz/ (live.py, generators.py), whose short form runs in the suite.

    python bench/fuzz_server.py                        # 100,000 messages, seed 1
    python bench/fuzz_server.py --messages 200000 --seed 7 --json

Prints: messages tried per door, the answers by code, messages that got no specific error ("bad":
must be 0, apart from the known bugs listed with their answers), canaries checked, processes
replaced (must be none), the server's RSS growth over the run, and the command.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.conftest import group_alive, sgserve_segments, wait_until  # noqa: E402
from tests.fuzz import live  # noqa: E402
from tests.fuzz.test_live_fuzz import model_config, start_fuzz_server  # noqa: E402


def build_models(d: str) -> str:
    from tests import model_builders

    model_builders.build_tf2(os.path.join(d, "tf2"))
    model_builders.build_keras_strings(os.path.join(d, "keras"))
    model_builders.build_half_plus_two(os.path.join(d, "hpt"))
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=500, help="messages between canary checks")
    ap.add_argument("--models", help="a directory with tf2, keras and hpt already built (tests/model_builders.py)")
    ap.add_argument("--json", action="store_true", help="print one line of JSON only")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="sgserve-fuzz-")
    models = args.models or build_models(os.path.join(work, "models"))
    config = os.path.join(work, "models.config")
    with open(config, "w") as f:
        f.write(model_config(models))
    before = sgserve_segments()
    server = start_fuzz_server(config, os.path.join(work, "cache"))
    drain = live.PipeDrain(server.proc)
    t0 = time.monotonic()

    def progress(r: live.FuzzReport) -> None:
        if not args.json and r.total % 10_000 < args.batch:
            print(f"[{time.monotonic() - t0:6.0f}s] {r.total} messages, {len(r.bad)} bad, "
                  f"{r.canaries} canaries", file=sys.stderr, flush=True)

    try:
        server.wait_ready(240)
        doors = wait_until(lambda: live.Doors(server.endpoint, server.rest_port, server.grpc_port), 30,
                           "the front doors")
        try:
            report = live.run(doors, server.proc.pid, args.messages, args.seed, args.batch, progress=progress)
        finally:
            doors.close()
        report.log_lines = drain.count
        summary = report.summary()
    finally:
        server.stop()
        left_procs = group_alive(server.proc.pid)
        left_segments = sorted(n for n in sgserve_segments() - before if n.startswith(f"sgserve_{server.proc.pid}_"))
        shutil.rmtree(work, ignore_errors=True)
    summary.update({"memory_delta_mib": round(summary["memory_delta_bytes"] / 2**20, 1),
                    "left_after_stop": {"processes": left_procs, "segments": left_segments},
                    "command": "python " + " ".join(sys.argv)})
    print(json.dumps(summary, default=str) if args.json else json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
