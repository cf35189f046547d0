"""The worker the broker tests start: sgserve's own worker process and serve loop over echo models.

The broker starts it as ``python echo_worker.py [options] SPEC`` (the Supervisor appends the
WorkerSpec JSON to its command). Everything that crosses the backend socket is
``sgserve.worker.serve.WorkerProcess``'s own code, unchanged: boot (die with the parent, pinning,
exit codes), READY, heartbeats, reading the route frame, the deadline check, resolving the model and
signature (404s), decoding and checking the tensors (400s), reply frames and headers, error replies,
W_LOAD/W_UNLOAD and W_STOP. So a change of the worker's side of the protocol shows in the broker tests.

Only the model is a stand-in: every version in the spec is an ``EchoVersion`` whose signatures
return their inputs as outputs, so a test can send any tensors and check that its own frames come
back. Why not a real SavedModel: importing TensorFlow costs each worker process about 4 s of CPU, and
the broker tests start about 80 of them; and the tests send one signature float32, int64, uint8 and
string tensors, which no real signature takes. The real model path is covered end to end by the
tests that start ``sgserve start`` (tests/test_server.py and others).

Fault switches (before SPEC), applied around the real worker:
  --boot-exit N        exit with code N instead of booting (with --only-index, just that worker)
  --boot-delay S       sleep S seconds before booting
  --only-index I       apply --boot-exit / --boot-delay / --silent to worker I only
  --silent             never send heartbeats: the real loop runs with a heartbeat interval of a day
                       (the broker should expire and replace it)
  --restart-delay S    with --state-dir DIR: a restarted worker (DIR/booted-INDEX exists) sleeps S
                       seconds before booting

Per request, special input names (the echo model's behaviour, run on the serve loop's thread as a
real model would be):
  sleep_s  float32 scalar: sleep that long, then echo
  crash    anything: exit(1) at once, holding the request

Each 200 reply also carries ``broker``: what the broker put in the route frame and header for the
worker (signature, deadline, attempt, routing_key), so tests can check what the broker stamped.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

import msgpack
import numpy as np

from sgserve import protocol
from sgserve.config import WorkerSpec
from sgserve.errors import InvalidArgument
from sgserve.worker import serve as worker_serve
from sgserve.worker import zygote

SILENT_INTERVAL = 86400.0  # seconds between heartbeats of a --silent worker: never, in a test


class EchoSignature:
    """A signature that returns its inputs, through the same entry point as SignatureRunner."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run_wire(self, metas: Any, payload: Sequence[Any], output_filter: Any = None) -> dict[str, np.ndarray]:
        arrays = protocol.decode_tensors(metas, payload)  # the worker's own checks and 400s
        if "crash" in arrays:
            os._exit(1)
        if "sleep_s" in arrays:
            time.sleep(float(arrays["sleep_s"]))
        if not output_filter:  # nil and [] both mean all outputs (docs/protocol.md)
            return arrays
        unknown = [o for o in output_filter if o not in arrays]
        if unknown:
            raise InvalidArgument(f"output_filter names unknown output(s) {unknown}; "
                                  f"signature '{self.name}' has {sorted(arrays)}")
        return {n: a for n, a in arrays.items() if n in output_filter}


class EchoVersion:
    """One model version from the spec, with an echo signature for each signature it declares."""

    def __init__(self, model: dict[str, Any]) -> None:
        self.name = model["name"]
        self.version = int(model["version"])
        self.signatures = {s: EchoSignature(s) for s in model.get("signatures") or {protocol.DEFAULT_SIGNATURE: {}}}
        self.warmed = {"requests": 0, "source": "echo model"}

    def rewarm(self) -> None:
        """Nothing to warm."""


class EchoWorker(worker_serve.WorkerProcess):
    """The real worker with echo versions, and the broker's route echoed in each 200 reply."""

    _route: tuple[int, int, float | None, int] | None = None

    def load_version(self, model: dict[str, Any]) -> EchoVersion:
        return EchoVersion(model)

    def _on_message(self, sock: Any, frames: list[Any]) -> bool:
        head = frames[0].bytes
        if head[:1] == protocol.W_REQUEST and len(head) == protocol.ROUTE.size:
            self._route = protocol.parse_route(head)
        return super()._on_message(sock, frames)

    def handle(self, rid: int, version: int, deadline: float | None, header_frame: Any,
               payload: list[Any]) -> list[Any]:
        reply = super().handle(rid, version, deadline, header_frame, payload)
        header = msgpack.unpackb(protocol.frame_bytes(reply[1]), raw=False)
        if header.get("code") != 200:
            return reply
        request = msgpack.unpackb(protocol.frame_bytes(header_frame), raw=False, strict_map_key=False)
        header["broker"] = {"signature": request.get("signature") or protocol.DEFAULT_SIGNATURE,
                            "deadline": deadline, "attempt": self._route[3] if self._route else None,
                            "routing_key": request.get("routing_key")}
        return [reply[0], msgpack.packb(header, use_bin_type=True), *reply[2:]]


class _NoTensorFlow:
    """What boot() calls on TensorFlow, for a worker whose models are echoes."""

    def get_logger(self) -> "_NoTensorFlow":
        return self

    def setLevel(self, level: Any) -> None:  # noqa: N802 - logging's name
        pass

    @property
    def config(self) -> "_NoTensorFlow":
        return self

    @property
    def threading(self) -> "_NoTensorFlow":
        return self

    def set_intra_op_parallelism_threads(self, n: int) -> None:
        pass

    def set_inter_op_parallelism_threads(self, n: int) -> None:
        pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--boot-exit", type=int)
    parser.add_argument("--boot-delay", type=float, default=0.0)
    parser.add_argument("--only-index", type=int)
    parser.add_argument("--silent", action="store_true")
    parser.add_argument("--restart-delay", type=float, default=0.0)
    parser.add_argument("--state-dir")
    parser.add_argument("spec")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    spec = WorkerSpec.from_json(args.spec)
    targeted = args.only_index is None or args.only_index == spec.index
    if targeted and args.boot_delay:
        time.sleep(args.boot_delay)
    if targeted and args.boot_exit is not None:
        print(f"echo worker {spec.index}: failing boot with exit code {args.boot_exit}", file=sys.stderr)
        return args.boot_exit
    if targeted and args.silent:
        spec.heartbeat_interval = SILENT_INTERVAL
    if args.state_dir:
        marker = os.path.join(args.state_dir, f"booted-{spec.index}")
        if os.path.exists(marker):
            time.sleep(args.restart_delay)
        else:
            open(marker, "w").close()
    zygote.import_tensorflow = _NoTensorFlow  # boot() imports TensorFlow through this; echoes need none
    worker = EchoWorker(spec)
    code = worker.boot()
    return code if code != worker_serve.EXIT_OK else worker.serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
