"""The worker process: pin, map the models, warm up, announce READY, then serve requests.

Started by the broker's supervisor as ``python -m sgserve.worker '<WorkerSpec JSON>'``. Exit codes
(sgserve/process.py): 3 = cannot boot (pinning, arguments), 4 = cannot map or build a model. The supervisor
does not restart a worker that exits with either, since it would only fail again.

Without batching the serve loop runs each request as it arrives, one at a time. With batching
(``--enable-batching``) the loop only decodes and checks requests and hands them to a
``WorkerBatching``; its batch threads run the batches and the loop sends their replies, because
only the loop's thread may touch the ZeroMQ socket.
"""
from __future__ import annotations

import collections
import concurrent.futures
import gc
import heapq
import itertools
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Hashable

import msgpack
import zmq

from sgserve import process, protocol
from sgserve.config import WorkerSpec
from sgserve.errors import DEADLINE_EXCEEDED, INTERNAL, InvalidArgument, NotFound, ServeError
from sgserve.protocol import recv_frames, send_frames
from sgserve.process import EXIT_BOOT_ERROR, EXIT_MODEL_ERROR, EXIT_OK
from sgserve.worker import pinning

log = logging.getLogger("sgserve.worker")

LOAD_POLL = 0.02  # seconds between checks for a finished background load
READ_BURST = 256  # with batching: messages read per wake-up, so that requests that arrived together batch
STOP_DRAIN = 4.0  # seconds W_STOP waits for the batches still queued (the supervisor SIGTERMs after 5)

_unpackb = msgpack.unpackb
_ROUTE_SIZE = protocol.ROUTE.size
_NOBLOCK = int(zmq.NOBLOCK)

# States of a request held for batching. Only the I/O thread answers (ANSWERED); a batch thread
# marks the requests of a batch it took RUNNING, after which they are never expired early.
QUEUED, RUNNING, ANSWERED = 0, 1, 2


class HeldRequest:
    """A request in the batching queue: the batch's tag, and what its reply header needs."""

    __slots__ = ("rid", "request_id", "model", "version", "deadline", "state")

    def __init__(self, rid: int, request_id: Any, model: str, version: int, deadline: float | None) -> None:
        self.rid = rid
        self.request_id = request_id
        self.model = model
        self.version = version
        self.deadline = deadline
        self.state = QUEUED


class WorkerBatching:
    """Server-side batching in one worker (sgserve/worker/batching.py), as the serve loop drives it.

    The I/O thread submits each decoded, validated request (``submit``) and sends what ``replies``
    returns whenever the wake-up pipe (``fileno``) is readable or ``next_wakeup`` seconds have
    passed. Batch threads take batches, run the signature's TF function on the merged inputs, and
    queue one reply per request. A request whose deadline passes while it still waits in the queue
    is answered 504 at once by the I/O thread and never runs (the batcher drops it from its batch).
    """

    def __init__(self, params: Any, runtimes: dict[tuple[str, int], Any], index: int) -> None:
        from sgserve.worker.batching import Batcher  # noqa: PLC0415

        self.batcher = Batcher(params)  # num_batch_threads unset: this process's (pinned) cores
        self.params = params
        self.served = 0  # requests that ran and were answered 200
        self._runtimes = runtimes  # the worker's dict: versions loaded or unloaded later are seen
        self._index = index
        self._lock = threading.Lock()  # request states
        self._done: collections.deque[tuple[HeldRequest, list[Any], bool]] = collections.deque()
        self._deadlines: list[tuple[float, int, HeldRequest]] = []  # heap; answered entries removed lazily
        self._seq = itertools.count()
        self._held = 0
        self._threads: list[threading.Thread] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def fileno(self) -> int:
        """Readable when batch threads have queued replies."""
        return self._wake_r

    def start(self) -> None:
        for i in range(self.batcher.num_batch_threads):
            thread = threading.Thread(target=self._run_batches, name=f"{self.params.thread_pool_name}_{i}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("batching with %d batch thread(s): %s", len(self._threads), self.params)

    # -- the I/O thread ------------------------------------------------------------------------
    def submit(self, rid: int, version: int, deadline: float | None, header_frame: Any, payload: list[Any],
               resolve: Any) -> list[Any] | None:
        """Queues one W_REQUEST; None when queued, else the reply frames (from MAGIC on) to send now."""
        from sgserve.worker.batching import BatchTask  # noqa: PLC0415

        request_id = header = None
        try:
            header = _read_header(header_frame)
            request_id = header.get("id")
            if deadline is not None and time.time() > deadline:
                return protocol.error_reply(request_id, DEADLINE_EXCEEDED,
                                            "deadline exceeded before the request could run")
            model, runner = resolve(header, version)
            output_filter = header.get("output_filter")
            # Checked here, alone, so that one bad request cannot fail a batch.
            arrays = runner.validate_wire(header.get("inputs"), payload, output_filter)
            held = HeldRequest(rid, request_id, model, version, deadline)
            key: Hashable = (model, version, runner.name, tuple(output_filter or ()))
            self.batcher.submit(BatchTask(held, key, arrays, deadline))
        except ServeError as exc:  # 400 (too many rows), 429 (queue full), 504, 503 (stopping), 404
            return protocol.error_reply(request_id, exc.code, exc.message,
                                        model=header.get("model") if header is not None else None,
                                        version=version, worker=self._index)
        except Exception as exc:  # noqa: BLE001
            log.exception("request failed")
            return protocol.error_reply(request_id, INTERNAL, f"{type(exc).__name__}: {exc}", worker=self._index)
        self._held += 1
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._seq), held))
            if len(self._deadlines) > 2 * self._held + 1024:  # drop the entries of answered requests
                self._deadlines = [e for e in self._deadlines if e[2].state != ANSWERED]
                heapq.heapify(self._deadlines)
        return None

    def replies(self) -> list[list[Any]]:
        """W_REPLY messages to send now: finished batches, and 504s for requests that expired queued."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        out: list[list[Any]] = []
        done = self._done
        while done:
            held, frames, ok = done.popleft()
            with self._lock:
                if held.state == ANSWERED:  # expired in the queue and already answered 504
                    continue
                held.state = ANSWERED
            self._held -= 1
            self.served += ok
            out.append(frames)
        heap = self._deadlines
        if heap:
            now = time.time()
            while heap and (heap[0][2].state != QUEUED or heap[0][0] < now):
                _, _, held = heapq.heappop(heap)
                with self._lock:
                    if held.state != QUEUED:
                        continue
                    held.state = ANSWERED
                self._held -= 1
                out.append([protocol.reply_frame(held.rid)] + protocol.error_reply(
                    held.request_id, DEADLINE_EXCEEDED, "deadline exceeded while waiting in the worker's batching "
                    "queue; the request was not run", model=held.model, version=held.version,
                    worker=self._index)[1:])
        return out

    def next_wakeup(self) -> float | None:
        """Seconds until the next queued request's deadline (call after replies()); None: none pending."""
        if not self._deadlines:
            return None
        return max(0.0, self._deadlines[0][0] - time.time())

    def stop(self, timeout: float = STOP_DRAIN) -> list[list[Any]]:
        """Runs what is queued (for at most ``timeout`` seconds) and returns the last replies."""
        self.batcher.stop(drain=True)
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        return self.replies()

    def close(self) -> None:
        """Stops taking batches at once (what is left is not run); the batch threads are daemons."""
        self.batcher.stop(drain=False, timeout=0)
        if not any(t.is_alive() for t in self._threads):  # else a batch thread may still write to it
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)

    # -- batch threads -------------------------------------------------------------------------
    def _run_batches(self) -> None:
        while (batch := self.batcher.next_batch()) is not None:
            with self._lock:
                for held in batch.tags:
                    if held.state == QUEUED:
                        held.state = RUNNING
            key = batch.key
            results = batch.run(lambda merged: self._run_model(key, merged))  # never raises
            rows = batch.padded_size
            self._done.extend(self._reply(held, result, rows) for held, result in results)
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:  # the pipe is full of wake-ups: the I/O thread is on its way
                pass

    def _run_model(self, key: Any, merged: dict[str, Any]) -> dict[str, Any]:
        model, version, signature, output_filter = key
        rt = self._runtimes.get((model, version))
        if rt is None:
            raise NotFound(f"model '{model}' version {version} is not loaded in worker {self._index}")
        return rt.signatures[signature].execute(merged, list(output_filter) or None)

    def _reply(self, held: HeldRequest, result: Any, rows: int) -> tuple[HeldRequest, list[Any], bool]:
        """(held, W_REPLY frames, ran ok) for one request's outputs or error."""
        ok = not isinstance(result, ServeError)
        if ok:
            try:
                frames = protocol.pack(protocol.ok_header(held.request_id, model=held.model, version=held.version,
                                                          worker=self._index, batch_size=rows),
                                       result, key="outputs")
            except Exception as exc:  # noqa: BLE001 - e.g. an output dtype the wire cannot carry: our fault
                ok = False
                message = exc.message if isinstance(exc, ServeError) else f"{type(exc).__name__}: {exc}"
                frames = protocol.error_reply(held.request_id, INTERNAL, f"output cannot be sent: {message}",
                                              worker=self._index)
        else:
            frames = protocol.error_reply(held.request_id, result.code, result.message, model=held.model,
                                          version=held.version, worker=self._index)
        return held, [protocol.reply_frame(held.rid)] + frames[1:], ok


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
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            from sgserve.worker.zygote import import_tensorflow  # noqa: PLC0415

            tf = import_tensorflow()  # without Keras (see zygote.py); already done in a forked worker
            tf.get_logger().setLevel("ERROR")
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
            ran = rt.warmup(requests)
            rt.warmed = {"requests": ran, "source": self._warmup_source}
            log.info("%s version %d: %d warmup request(s) from %s in %.2f s", rt.name, rt.version, ran,
                     self._warmup_source, time.monotonic() - started)
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

    def resolve(self, header: dict[str, Any], version: int) -> tuple[str, Any]:
        """(model, SignatureRunner) a request names; NotFound (404) when this worker lacks it."""
        model = header.get("model")
        rt = self.runtimes.get((model, version))
        if rt is None:
            raise NotFound(f"model '{model}' version {version} is not loaded in worker {self.spec.index}")
        sig = header.get("signature") or protocol.DEFAULT_SIGNATURE
        runner = rt.signatures.get(sig)
        if runner is None:
            raise NotFound(f"model '{model}' has no signature '{sig}'; it has {sorted(rt.signatures)}")
        return model, runner

    def handle(self, version: int, deadline: float | None, header_frame: Any, payload: list[Any]) -> list[Any]:
        """The reply (header frame, payload frames) to one W_REQUEST, run now; never raises."""
        request_id = header = None
        index = self.spec.index
        try:
            header = _read_header(header_frame)
            request_id = header.get("id")
            if deadline is not None and time.time() > deadline:
                return protocol.error_reply(request_id, DEADLINE_EXCEEDED,
                                            "deadline exceeded before the request could run")[1:]
            model, runner = self.resolve(header, version)
            outputs = runner.run_wire(header.get("inputs"), payload, header.get("output_filter"))
            self.served += 1
            try:
                return protocol.pack(protocol.ok_header(request_id, model=model, version=version, worker=index),
                                     outputs, key="outputs")[1:]
            except ServeError as exc:  # an output dtype the wire cannot carry: our fault, not the request's
                return protocol.error_reply(request_id, INTERNAL, f"output cannot be sent: {exc.message}",
                                            worker=index)[1:]
        except ServeError as exc:
            model = header.get("model") if header is not None else None
            return protocol.error_reply(request_id, exc.code, exc.message, model=model, version=version,
                                        worker=index)[1:]
        except Exception as exc:  # noqa: BLE001
            log.exception("request failed")
            return protocol.error_reply(request_id, INTERNAL, f"{type(exc).__name__}: {exc}", worker=index)[1:]

    def _on_message(self, sock: Any, frames: list[Any]) -> bool:
        """Handles one backend message; True on W_STOP (the worker then exits)."""
        head = frames[0].bytes
        cmd = head[:1]
        batching = self.batching
        if cmd == protocol.W_REQUEST and len(head) == _ROUTE_SIZE and len(frames) >= 2:
            rid, version, deadline, _ = protocol.parse_route(head)
            if batching is None:
                reply = self.handle(version, deadline, frames[1], frames[2:])
            else:
                reply = batching.submit(rid, version, deadline, frames[1], frames[2:], self.resolve)
                if reply is None:  # queued: a batch thread answers it
                    return False
                reply = reply[1:]
            send_frames(sock, [protocol.reply_frame(rid), *reply])
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

    def serve(self) -> int:
        spec = self.spec
        batching = self.batching
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
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
        interval = spec.heartbeat_interval
        last_sent = last_heard = time.monotonic()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if batching is not None:
            poller.register(batching.fileno, zmq.POLLIN)
        try:
            while True:
                for msg in self._finished_loads():
                    sock.send_multipart(msg)
                    last_sent = time.monotonic()
                wait = LOAD_POLL if self._loads else interval
                if batching is not None:
                    replies = batching.replies()
                    for reply in replies:
                        send_frames(sock, reply)
                    if replies:
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


def _read_header(frame: Any) -> dict[str, Any]:
    """The client's header from its frame (the broker decoded it once already; be safe anyway)."""
    try:
        header = _unpackb(protocol.frame_bytes(frame), raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgument(f"header frame is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise InvalidArgument("header frame must be a msgpack map")
    return header


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec = WorkerSpec.from_json(argv[0])
    except (IndexError, ValueError, TypeError) as exc:
        print(f"sgserve worker: bad spec: {exc}", file=sys.stderr)
        return EXIT_BOOT_ERROR
    logging.basicConfig(level=getattr(logging, os.environ.get("SGSERVE_LOG_LEVEL", "WARNING").upper(), logging.WARNING),
                        format=f"%(asctime)s [worker {spec.index} pid {os.getpid()}] %(levelname)s %(message)s")
    worker = WorkerProcess(spec)
    code = worker.boot()
    if code != EXIT_OK:
        return code
    return worker.serve()
