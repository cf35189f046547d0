"""The worker process: pin, map the models, warm up, announce READY, then serve requests.

Started by the broker's supervisor as ``python -m sgserve.worker '<WorkerSpec JSON>'``. Exit codes
(sgserve/process.py): 3 = cannot boot (pinning, arguments), 4 = cannot map or build a model. The supervisor
does not restart a worker that exits with either, since it would only fail again.

Without batching the serve loop runs each request as it arrives, one at a time. With batching
(``--enable-batching``) the loop only decodes and checks requests and hands them to a
``WorkerBatching`` (serve_batched.py); its batch threads run the batches and the loop sends their
replies, because only the loop's thread may touch the ZeroMQ socket. Both paths answer through
replies.py.
"""
from __future__ import annotations

import collections
import concurrent.futures
import gc
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import msgpack
import zmq

from sgserve import process, protocol
from sgserve.config import WorkerSpec
from sgserve.errors import DeadlineExceeded, InvalidArgument, NotFound
from sgserve.protocol import recv_frames, send_frames
from sgserve.process import EXIT_BOOT_ERROR, EXIT_MODEL_ERROR, EXIT_OK
from sgserve.worker import pinning, replies
from sgserve.worker.serve_batched import WorkerBatching

log = logging.getLogger("sgserve.worker")

LOAD_POLL = 0.02  # seconds between checks for a finished background load
READ_BURST = 256  # with batching: messages read per wake-up, so that requests that arrived together batch

_ROUTE_SIZE = protocol.ROUTE.size
_NOBLOCK = int(zmq.NOBLOCK)

class WorkerProcess:
    """Built from a WorkerSpec; touches no process state until boot()."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.runtimes: dict[tuple[str, int], Any] = {}
        self.served = 0
        self._loader: concurrent.futures.ThreadPoolExecutor | None = None
        self._loads: collections.deque[concurrent.futures.Future] = collections.deque()
        self._warmup_source = ""
        self.batching: WorkerBatching | None = None

    def boot(self) -> int:
        spec = self.spec
        process.die_with_parent()
        # Ctrl-C reaches the whole process group; the broker drains and then sends W_STOP.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.parent = os.getppid()
        try:
            pinning.pin(spec.cores)
        except (OSError, ValueError) as exc:
            log.error("cannot pin to cores %s: %s", spec.cores, exc)
            return EXIT_BOOT_ERROR
        if spec.batching is not None:
            from sgserve.models.batching_params import BatchingConfigError, BatchingParameters  # noqa: PLC0415

            try:  # after pinning: an unset num_batch_threads means this worker's cores
                self.batching = WorkerBatching(BatchingParameters.from_dict(spec.batching), self.runtimes, spec.index)
            except (BatchingConfigError, TypeError) as exc:
                log.error("bad batching parameters %s: %s", spec.batching, exc)
                return EXIT_BOOT_ERROR
        os.environ.update(pinning.thread_env(spec.intra_op_threads, spec.inter_op_threads))
        try:
            from sgserve.worker.zygote import import_tensorflow  # noqa: PLC0415

            tf = import_tensorflow()  # without Keras (see zygote.py); already done in a forked worker
            tf.config.threading.set_intra_op_parallelism_threads(spec.intra_op_threads)
            tf.config.threading.set_inter_op_parallelism_threads(spec.inter_op_threads)
            # TensorFlow's own objects live as long as the process: keep the cyclic collector from
            # walking them, on the request path and when a version is unloaded. The versions' own
            # objects stay collectable (an unload frees them with one collection of those alone).
            gc.collect()
            gc.freeze()
            for m in spec.models:
                rt = self.load_version(m)
                self.runtimes[(rt.name, rt.version)] = rt
        except Exception as exc:  # noqa: BLE001
            log.exception("cannot load models: %s", exc)
            return EXIT_MODEL_ERROR
        return EXIT_OK

    def load_version(self, model: dict[str, Any]) -> Any:
        """Maps one version, builds its functions and warms it up (before it may take traffic)."""
        from sgserve.worker.runtime import ModelRuntime  # noqa: PLC0415

        started = time.monotonic()
        rt = ModelRuntime(model["segment"])
        rt.warmed = {"requests": 0, "source": "disabled (--no-model-warmup)"}
        if self.spec.warmup:
            requests = self._warmup_requests(rt.name, os.path.join(model["base_path"], str(model["version"])))
            warm_started = time.monotonic()
            ran = rt.warmup(requests)
            rt.warmed = {"requests": ran, "source": self._warmup_source,
                         "seconds": round(time.monotonic() - warm_started, 6)}
            log.info("%s version %d: %d warmup request(s) from %s in %.2f s", rt.name, rt.version, ran,
                     self._warmup_source, time.monotonic() - started)
        if self.spec.split_check:  # which signatures may the broker split (None: safe; else why not)
            from sgserve.worker import split_check  # noqa: PLC0415

            rt.warmed["split"] = split_check.check_version(rt, requests if self.spec.warmup else None)
        return rt

    def _warmup_requests(self, name: str, version_dir: str) -> list[Any] | None:
        """TF Serving's assets.extra warmup file, else --warmup-file, else None (synthetic)."""
        from sgserve.models import warmup  # noqa: PLC0415

        path = warmup.tfserving_warmup_path(version_dir)
        if os.path.isfile(path):
            self._warmup_source = path
            return warmup.read_tfserving_warmup(path)
        if self.spec.warmup_file:
            requests = [r for r in warmup.read_sgserve_warmup(self.spec.warmup_file) if r.model in (None, name)]
            if requests:
                self._warmup_source = self.spec.warmup_file
                return requests
        self._warmup_source = "synthetic inputs"
        return None

    def _start_load(self, body: Any) -> None:
        """W_LOAD: builds the version on the loader thread; the serve loop keeps serving meanwhile."""
        try:
            model = msgpack.unpackb(body.bytes, raw=False)
            key = (model["name"], int(model["version"]))
        except Exception:  # noqa: BLE001
            log.warning("dropping a malformed W_LOAD")
            return

        def job() -> tuple[Callable[[], None] | None, list[Any]]:
            started = time.monotonic()
            rt, error = None, None
            try:
                rt = self.load_version(model)
            except Exception as exc:  # noqa: BLE001 - reported to the broker, which marks it FAILED
                log.exception("cannot load %s version %s", *key)
                error = f"{type(exc).__name__}: {exc}"
            # Collect now, off the request path, the garbage of building and warming the version;
            # else the next automatic full collection would walk it all between two requests.
            gc.collect()
            reply = [protocol.W_LOADED, msgpack.packb(
                {"model": key[0], "version": key[1], "ok": rt is not None, "error": error,
                 "seconds": round(time.monotonic() - started, 3), "pid": os.getpid(),
                 "warmup": rt.warmed if rt is not None else None})]

            def install() -> None:  # on the serve loop's thread: from now on it takes requests
                rt.rewarm()  # while the broker still keeps this worker out of rotation
                self.runtimes[key] = rt

            return (install if rt is not None else None), reply

        self._background(job)

    def _background(self, job: Callable[[], tuple[Callable[[], None] | None, list[Any]]]) -> None:
        """Runs a lifecycle job on the loader thread; the serve loop applies and answers it when done."""
        if self._loader is None:
            self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sgserve-load")
        self._loads.append(self._loader.submit(job))

    def _finished_loads(self) -> list[list[Any]]:
        """Replies (W_LOADED, W_UNLOADED) for the lifecycle jobs that finished, in order."""
        out = []
        while self._loads and self._loads[0].done():
            apply, reply = self._loads.popleft().result()
            if apply is not None:
                apply()
            out.append(reply)
        return out

    def _unload(self, body: Any) -> None:
        """W_UNLOAD: forgets a version at once; the objects are freed on the loader thread.

        Dropping a version's functions and collecting the cycles they leave holds the GIL for a
        while; the broker takes this worker out of rotation meanwhile (when others can serve), and
        the serve loop keeps answering heartbeats. The mappings go once TensorFlow drops the last
        tensor.
        """
        try:
            info = msgpack.unpackb(body.bytes, raw=False)
            key = (info["model"], int(info["version"]))
        except Exception:  # noqa: BLE001
            log.warning("dropping a malformed W_UNLOAD")
            return
        doomed = [self.runtimes.pop(key, None)]

        def job() -> tuple[None, list[Any]]:
            started = time.monotonic()
            if doomed.pop() is not None:
                gc.collect()  # the version's cycles; TensorFlow's frozen objects are not walked
                log.info("unloaded %s version %d in %.2f s", key[0], key[1], time.monotonic() - started)
            return None, [protocol.W_UNLOADED, msgpack.packb({"model": key[0], "version": key[1]})]

        self._background(job)

    def resolve(self, header: dict[str, Any], version: int, deadline: float | None) -> tuple[str, Any]:
        """(model, SignatureRunner) for a request that may run now: DeadlineExceeded (504) once its
        deadline has passed, NotFound (404) when this worker lacks the version or signature."""
        if deadline is not None and time.time() > deadline:
            raise DeadlineExceeded("deadline exceeded before the request could run")
        model = header.get("model")
        rt = self.runtimes.get((model, version))
        if rt is None:
            if type(model) is not str:  # the broker refuses such a request; be exact anyway
                raise InvalidArgument(f"request needs 'model', the name of a served model, got {model!r}")
            raise NotFound(f"model '{model}' version {version} is not loaded in worker {self.spec.index}")
        sig = header.get("signature") or protocol.DEFAULT_SIGNATURE
        runner = rt.signatures.get(sig)
        if runner is None:
            raise NotFound(f"model '{model}' has no signature '{sig}'; it has {sorted(rt.signatures)}")
        return model, runner

    def handle(self, rid: int, version: int, deadline: float | None, header_frame: Any,
               payload: list[Any]) -> list[Any]:
        """The W_REPLY message answering one W_REQUEST, run now; never raises."""
        request_id = model = None
        try:
            header = protocol.decode_header(header_frame)
            request_id, model = header.get("id"), header.get("model")
            model, runner = self.resolve(header, version, deadline)
            outputs = runner.run_wire(header.get("inputs"), payload, header.get("output_filter"))
        except Exception as exc:  # noqa: BLE001 - every request gets an answer
            return replies.failed(rid, request_id, exc, model, version, self.spec.index)
        self.served += 1
        return replies.succeeded(rid, request_id, outputs, model, version, self.spec.index)

    def _on_message(self, sock: Any, frames: list[Any]) -> bool:
        """Handles one backend message; True on W_STOP (the worker then exits)."""
        head = frames[0].bytes
        cmd = head[:1]
        batching = self.batching
        if cmd == protocol.W_REQUEST and len(head) == _ROUTE_SIZE and len(frames) >= 2:
            rid, version, deadline, _ = protocol.parse_route(head)
            if batching is None:
                reply = self.handle(rid, version, deadline, frames[1], frames[2:])
            else:
                reply = batching.submit(rid, version, deadline, frames[1], frames[2:], self.resolve)
                if reply is None:  # queued: a batch thread answers it
                    return False
            send_frames(sock, reply)
        elif cmd == protocol.W_LOAD and len(frames) >= 2:
            self._start_load(frames[1])
        elif cmd == protocol.W_UNLOAD and len(frames) >= 2:
            self._unload(frames[1])
        elif cmd == protocol.W_STOP:
            if batching is not None:  # drain: run what is queued, send the last replies
                for reply in batching.stop():
                    send_frames(sock, reply)
                self.served += batching.served
            log.info("stopping after %d requests", self.served)
            return True
        return False

    def _connect(self) -> tuple[zmq.Socket, zmq.Poller]:
        """The DEALER to the broker, READY sent on it, and the poller of the serve loop."""
        spec = self.spec
        batching = self.batching
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"w{spec.index}-{os.getpid()}".encode())
        if batching is not None:
            # The broker lets a batching worker hold up to worker_pipeline requests; take them all in
            # (the broker bounds them), so that its blocking send to this worker can never stall.
            sock.setsockopt(zmq.RCVHWM, 0)
            batching.start()
        sock.connect(spec.backend)
        sock.send_multipart([protocol.W_READY, msgpack.packb(
            {"index": spec.index, "pid": os.getpid(), "cores": spec.cores,
             "warmup": [[name, version, rt.warmed] for (name, version), rt in self.runtimes.items()]})])
        log.info("ready on cores %s", spec.cores)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if batching is not None:
            poller.register(batching.fileno, zmq.POLLIN)
        return sock, poller

    def serve(self) -> int:
        """The serve loop: requests and lifecycle commands in, replies and heartbeats out, until
        W_STOP or the broker is gone."""
        batching = self.batching
        sock, poller = self._connect()
        interval = self.spec.heartbeat_interval
        last_sent = last_heard = time.monotonic()
        try:
            while True:
                for msg in self._finished_loads():
                    sock.send_multipart(msg)
                    last_sent = time.monotonic()
                wait = LOAD_POLL if self._loads else interval
                if batching is not None:
                    done = batching.replies()
                    for reply in done:
                        send_frames(sock, reply)
                    if done:
                        last_sent = time.monotonic()
                    due = batching.next_wakeup()
                    if due is not None and due < wait:
                        wait = due
                if poller.poll(wait * 1000):
                    # Every message that is there, without another poll in between: with a
                    # pipeline of 2 the next request is often already waiting.
                    for frames in _read_burst(sock):
                        last_heard = time.monotonic()
                        if self._on_message(sock, frames):
                            return EXIT_OK
                        last_sent = time.monotonic()
                else:  # idle: is the broker still there? (PR_SET_PDEATHSIG covers most cases)
                    if os.getppid() != self.parent:
                        log.error("broker is gone; exiting")
                        return EXIT_OK
                now = time.monotonic()
                if now - last_sent >= interval:
                    sock.send(protocol.W_HEARTBEAT)
                    last_sent = now
                if now - last_heard > interval * 10:
                    log.error("heard nothing from the broker for %.0f s; exiting", now - last_heard)
                    return EXIT_OK
        finally:
            sock.close(0)
            if batching is not None:
                batching.close()
            if self._loader is not None:
                self._loader.shutdown(wait=False, cancel_futures=True)


def _read_burst(sock: Any) -> list[list[Any]]:
    """Every message waiting on the socket (at most READ_BURST), without blocking."""
    messages = []
    for _ in range(READ_BURST):
        try:
            messages.append(recv_frames(sock, _NOBLOCK))
        except zmq.Again:
            break
    return messages


def main(argv: list[str] | None = None) -> int:
    from sgserve.logs import setup_logging  # noqa: PLC0415

    argv = sys.argv[1:] if argv is None else argv
    try:
        spec = WorkerSpec.from_json(argv[0])
    except (IndexError, ValueError, TypeError) as exc:
        setup_logging("worker")
        log.error("bad spec: %s", exc)
        return EXIT_BOOT_ERROR
    setup_logging(f"worker {spec.index}")  # the level and format the broker exported
    worker = WorkerProcess(spec)
    code = worker.boot()
    if code != EXIT_OK:
        return code
    return worker.serve()
