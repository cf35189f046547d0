"""The broker tests' echo worker (echo_worker.py, unchanged) plus one input, for the hang tests:

  spin_s  float32 scalar: burn CPU on the serve loop's thread for that long, then echo (a slow model
          call: silent, but its CPU time advances, so the watchdog must leave it alone)

Run as ``python hang_worker.py [echo_worker options] SPEC``, like echo_worker.py.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import echo_worker
from sgserve import protocol

_echo = echo_worker.EchoSignature.run_wire


def run_wire(self: echo_worker.EchoSignature, metas: Any, payload: Sequence[Any], output_filter: Any = None):
    arrays = protocol.decode_tensors(metas, payload)
    if "spin_s" in arrays:
        until = time.thread_time() + float(arrays["spin_s"])  # CPU seconds, however starved it is
        while time.thread_time() < until:
            pass
    return _echo(self, metas, payload, output_filter)


echo_worker.EchoSignature.run_wire = run_wire

if __name__ == "__main__":
    sys.exit(echo_worker.main(sys.argv[1:]))
