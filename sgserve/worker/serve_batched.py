"""The serve loop's batched path (``--enable-batching``): the glue between the I/O thread, which
alone touches the ZeroMQ socket, and the batch threads that run the model.

The I/O thread decodes and checks each request and submits it (``WorkerBatching.submit``); batch
threads take batches from the ``Batcher`` (worker/batching.py), run the signature's TF function on
the merged inputs and queue one reply per request; the I/O thread sends them when the wake-up pipe
(``fileno``) is readable. A request whose deadline passes while it still waits in the queue is
answered 504 at once by the I/O thread and never runs (the batcher drops it from its batch).
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import threading
import time
from typing import Any, Callable, Hashable

from sgserve import protocol
from sgserve.errors import DeadlineExceeded, NotFound, ServeError
from sgserve.worker import replies
from sgserve.worker.batching import Batcher, BatchTask

log = logging.getLogger("sgserve.worker")

STOP_DRAIN = 4.0  # seconds W_STOP waits for the batches still queued (the supervisor SIGTERMs after 5)

# States of a request held for batching. Only the I/O thread answers (ANSWERED); a batch thread
# marks the requests of a batch it took RUNNING, after which they are never expired early.
QUEUED, RUNNING, ANSWERED = 0, 1, 2

# (header, version, deadline) -> (model, SignatureRunner): the worker's resolve (504, 404).
Resolve = Callable[[dict[str, Any], int, "float | None"], tuple[str, Any]]


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
    """Server-side batching in one worker, as the serve loop drives it (see the module docstring).

    The I/O thread calls ``submit`` for each request and sends what ``replies`` returns whenever
    ``fileno`` is readable or ``next_wakeup`` seconds have passed.
    """

    def __init__(self, params: Any, runtimes: dict[tuple[str, int], Any], index: int) -> None:
        self.batcher = Batcher(params)  # num_batch_threads unset: this process's (pinned) cores
        self.params = params
        self.served = 0  # requests the model ran
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
               resolve: Resolve) -> list[Any] | None:
        """Queues one W_REQUEST; None when queued, else the W_REPLY message to send now."""
        request_id = model = None
        try:
            header = protocol.decode_header(header_frame)
            request_id, model = header.get("id"), header.get("model")
            model, runner = resolve(header, version, deadline)
            output_filter = header.get("output_filter")
            # Checked here, alone, so that one bad request cannot fail a batch.
            arrays = runner.validate_wire(header.get("inputs"), payload, output_filter)
            held = HeldRequest(rid, request_id, model, version, deadline)
            key: Hashable = (model, version, runner.name, tuple(output_filter or ()))
            self.batcher.submit(BatchTask(held, key, arrays, deadline))
        except Exception as exc:  # noqa: BLE001 - 400 (too many rows), 429 (queue full), 504, 503 (stopping), 404
            return replies.failed(rid, request_id, exc, model, version, self._index)
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
                out.append(replies.failed(held.rid, held.request_id, DeadlineExceeded(
                    "deadline exceeded while waiting in the worker's batching queue; the request was not run"),
                    held.model, held.version, self._index))
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
        self.batcher.stop(drain=False)
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
        """(held, W_REPLY frames, ran) for one request's outputs or error. A request counts as served
        once the model ran it, as on the unbatched path, even if its outputs cannot be sent."""
        if isinstance(result, ServeError):
            frames = replies.failed(held.rid, held.request_id, result, held.model, held.version, self._index)
        else:
            frames = replies.succeeded(held.rid, held.request_id, result, held.model, held.version, self._index,
                                       batch_size=rows)
        return held, frames, not isinstance(result, ServeError)


__all__ = ["WorkerBatching", "HeldRequest", "STOP_DRAIN"]
