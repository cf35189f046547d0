"""Server-side batching inside one worker, with TF Serving's semantics.

Free of sockets and of TensorFlow. Its parameters, TF Serving's ``BatchingParameters``, are read by
sgserve/models/batching_params.py.

- ``Batcher``: queues, batch forming, padding and splitting, as TF Serving's SharedBatchScheduler
  (tensorflow/core/kernels/batching_util/shared_batch_scheduler.h) and BatchingSession
  (tensorflow_serving/batching/batching_session.cc) do it.

How a worker drives it (sgserve/worker/serve_batched.py)
--------------------------------------------------------
The I/O thread owns the socket. For each request it decodes the tensors, checks them against the
signature (so that one bad request cannot fail a batch of good ones), and calls
``batcher.submit(BatchTask(tag, key=(model, version, signature, output_filter), inputs=arrays,
deadline=deadline))``. ``submit`` never blocks; a ``ServeError`` it raises (400 too large, 429 queue
full, 504 already expired, 503 stopping) is answered at once. The key must hold everything that
changes how a batch is run: TF Serving keys its queues by the input *and output* tensor names, so
the output filter belongs in it. ``num_batch_threads`` batch threads each loop on ``next_batch()``,
which blocks until a batch may run (full, timed out, or any batch while stopping), and answer it
with ``batch.run(fn)``: one ``(tag, outputs | ServeError)`` pair per request, requests that expired
in the queue included (as 504). ``stop()`` lets them drain what is queued, or drops it.

A request of more than ``max_batch_size`` rows is refused (400), as TF Serving does. With
``enable_large_batch_splitting`` a request of up to ``max_batch_size`` rows that does not fit in the
open batch fills it and continues in new batches of at most ``max_execution_batch_size`` rows; its
outputs are joined back and it is answered once, when its last piece has run (or at its first error).

Like TF Serving, an open batch is handed out as soon as it is full, or once ``batch_timeout_micros``
have passed since its first request *and* a thread is free to take it. With the default timeout of
0 a request runs alone when a thread is idle, and requests that arrive while every thread is busy
are batched together: batching adapts to load without adding latency at low load.

Where sgserve differs from TF Serving, on purpose:

- Requests whose inputs differ in a non-batch dimension or dtype are put in different batches of
  the same queue (TF Serving puts them in one batch and fails the whole batch with "Tensors with
  name ... have different shapes and padding is turned off"). With
  ``pad_variable_length_inputs`` they share a batch and are padded, as in TF Serving, except
  zero-size tensors, which TF Serving cannot pad ("Got empty tensor in batch of non-empty
  tensors"): those only share a batch with inputs of exactly their shape.
- A request whose deadline has passed when its batch is taken is dropped from the batch and answered
  504 (TF Serving still runs it, and fails the batch only when every request in it has timed out).
- A full queue is 429 RESOURCE_EXHAUSTED (TF Serving says UNAVAILABLE with the same message), so
  the client and the broker treat it as backpressure.
- Padding rows come from the last request in the batch that has rows (TF Serving takes the last
  request, which fails for a request of 0 rows); a batch of only 0-row requests is not padded.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from typing import Any, Callable, Hashable, Optional, Union

import numpy as np

from sgserve.models.batching_params import BatchingParameters
from sgserve.errors import (DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted, ServeError, Unavailable,
                            as_serve_error)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Tasks and batches
# ---------------------------------------------------------------------------------------------------

Outputs = dict[str, np.ndarray]
TaskResult = tuple[Any, Union[Outputs, ServeError]]  # (tag, outputs or the error to answer with)


@dataclasses.dataclass(eq=False)
class BatchTask:
    """One request: ``inputs`` all share dimension 0 (the batch); ``deadline`` is time.time() based."""

    tag: Any
    key: Hashable
    inputs: dict[str, np.ndarray]
    deadline: Optional[float] = None


class _SplitRequest:
    """Collects the pieces of a request that was split over several batches (enable_large_batch_splitting).

    The request is answered once: with its outputs when the last piece is done, or with the first
    error (or expiry) of any piece; pieces of a request already answered are dropped.
    """

    def __init__(self, task: BatchTask, pieces: int) -> None:
        self.task = task
        self._parts: list[Optional[Outputs]] = [None] * pieces
        self._left = pieces
        self._answered = False
        self._lock = threading.Lock()

    @property
    def answered(self) -> bool:
        with self._lock:
            return self._answered

    def complete(self, index: int, outputs: Outputs) -> Union[Outputs, ServeError, None]:
        """The request's whole outputs when this was its last piece, else None."""
        with self._lock:
            if self._answered:
                return None
            self._parts[index] = outputs
            self._left -= 1
            if self._left:
                return None
            self._answered = True
            parts = list(self._parts)
        try:
            return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}
        except ValueError as exc:  # TF Serving: the Concat in SplitInputTask's done callback fails too
            return Internal(f"the outputs of a request split over {len(parts)} batches cannot be joined: {exc}")

    def abort(self) -> bool:
        """Marks the request answered; True for the one caller that must send the error."""
        with self._lock:
            if self._answered:
                return False
            self._answered = True
            return True


@dataclasses.dataclass(eq=False)
class _Piece:
    """The rows of one request that go in one batch: all of them, or one part of a split request."""

    task: BatchTask
    inputs: dict[str, np.ndarray]
    rows: int
    split: Optional[_SplitRequest] = None
    index: int = 0


class Batch:
    """Requests of one key (and one input layout) that run as one call of the model."""

    def __init__(self, key: Hashable, group: Hashable, params: BatchingParameters, created: float,
                 padded_inputs: bool) -> None:
        self.key = key
        self.group = group  # the input layout: names, dtypes and shapes (ranks when padding)
        self.created = created  # time.monotonic() of the first request
        self.expired: list[Any] = []  # tags dropped because their deadline passed before the batch ran
        self._params = params
        self._padded_inputs = padded_inputs
        self._pieces: list[_Piece] = []
        self._rows = 0

    @property
    def tasks(self) -> list[BatchTask]:
        """The requests in the batch, in order (a split request appears in each of its batches)."""
        return [p.task for p in self._pieces]

    @property
    def tags(self) -> list[Any]:
        return [p.task.tag for p in self._pieces]

    @property
    def size(self) -> int:
        """Rows from requests, before padding."""
        return self._rows

    @property
    def padded_size(self) -> int:
        """Rows the model sees: size rounded up to the next allowed batch size (0 stays 0)."""
        return self._params.padded_batch_size(self._rows) if self._rows else 0

    def _add(self, piece: _Piece) -> None:
        self._pieces.append(piece)
        self._rows += piece.rows

    def _drop_expired(self, now: float) -> None:
        """Called when the batch is taken to run: removes requests whose deadline has passed."""
        keep: list[_Piece] = []
        for p in self._pieces:
            if p.split is not None and p.split.answered:
                continue  # another piece of this request failed or expired: it has its answer
            if p.task.deadline is not None and now > p.task.deadline:
                if p.split is None or p.split.abort():
                    self.expired.append(p.task.tag)
                continue
            keep.append(p)
        self._pieces = keep
        self._rows = sum(p.rows for p in keep)

    def merged_inputs(self) -> dict[str, np.ndarray]:
        """The batch's inputs: each request's rows concatenated along dimension 0, in order.

        As TF Serving's BatchingSession::MergeInputTensors: with pad_variable_length_inputs, each
        request's tensor is first padded at the end of every non-batch dimension to the largest size
        in the batch, with the value of its own first element (batching_util.cc PadTensor); then the
        batch is padded to the next allowed batch size with copies of the first row of the last
        request (one that has rows).
        """
        if not self._pieces:
            return {}
        names = list(self._pieces[0].inputs)
        extra = self.padded_size - self._rows
        merged: dict[str, np.ndarray] = {}
        for name in names:
            arrays = [p.inputs[name] for p in self._pieces]
            if self._padded_inputs:
                longest = tuple(max(dims) for dims in zip(*(a.shape[1:] for a in arrays)))
                arrays = [_pad_to(a, longest) for a in arrays]
            if extra > 0:
                source = next(a for a in reversed(arrays) if a.shape[0] > 0)
                arrays.append(np.repeat(source[:1], extra, axis=0))
            merged[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        return merged

    def split(self, outputs: dict[str, np.ndarray]) -> list[TaskResult]:
        """Each request's rows of the model's outputs, padding rows left out.

        Every output must have the batch as dimension 0 (TF Serving's SplitOutputTensors refuses
        others with FAILED_PRECONDITION); anything else raises Internal and nothing is answered, so
        the caller can fail() the batch. Non-batch dimensions are returned as the model made them:
        like TF Serving, outputs of padded variable-length inputs are not cut back. A split request
        gets its outputs with the batch that completes it (or an error if its parts cannot be
        joined); other batches return nothing for it.
        """
        rows = self.padded_size
        arrays: dict[str, np.ndarray] = {}
        for name, value in outputs.items():
            arr = np.asarray(value)
            if arr.ndim == 0:
                raise Internal(f"output '{name}' is a scalar: batching needs every output of the model to have the "
                               f"batch as dimension 0 (TF Serving: \"Batched output tensor has 0 dimensions\")")
            if arr.shape[0] != rows:
                raise Internal(f"output '{name}' has {arr.shape[0]} rows but the batch has {rows} ({self._rows} from "
                               f"{len(self._pieces)} request(s) + {rows - self._rows} padding): batching needs every "
                               f"output of the model to have the batch as dimension 0 (TF Serving: \"Batched output "
                               f"tensor's 0th dimension does not equal the sum of the 0th dimension sizes of the "
                               f"input tensors\")")
            arrays[name] = arr
        results: list[TaskResult] = []
        start = 0
        for p in self._pieces:
            part = {name: arr[start:start + p.rows] for name, arr in arrays.items()}
            start += p.rows
            if p.split is None:
                results.append((p.task.tag, part))
            else:
                whole = p.split.complete(p.index, part)
                if whole is not None:
                    results.append((p.task.tag, whole))
        return results

    def fail(self, error: ServeError) -> list[TaskResult]:
        """``error`` for every request in the batch (once per split request)."""
        return [(p.task.tag, error) for p in self._pieces if p.split is None or p.split.abort()]

    def run(self, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> list[TaskResult]:
        """Runs ``fn`` on merged_inputs() and answers every request: outputs, or the error; never raises.

        Requests that expired in the queue are answered 504 first, without running.
        """
        results: list[TaskResult] = [
            (tag, DeadlineExceeded("deadline exceeded while waiting in the batching queue")) for tag in self.expired]
        if not self._pieces:
            return results
        try:
            results.extend(self.split(fn(self.merged_inputs())))
        except Exception as exc:  # noqa: BLE001 - every request must get an answer
            if not isinstance(exc, ServeError):
                log.exception("batch of %d request(s) failed", len(self._pieces))
            results.extend(self.fail(as_serve_error(exc)))
        return results

    def __repr__(self) -> str:
        return (f"Batch(key={self.key!r}, requests={len(self._pieces)}, rows={self._rows}, "
                f"padded={self.padded_size}, expired={len(self.expired)})")


def _pad_to(arr: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    """``arr`` padded after its end in each non-batch dimension to ``dims``, with its first element."""
    if arr.shape[1:] == dims:
        return arr
    out = np.full((arr.shape[0],) + dims, arr.flat[0], dtype=arr.dtype)
    out[tuple(slice(0, d) for d in arr.shape)] = arr
    return out


def _as_batchable(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind in ("S", "U"):  # string tensors travel as object arrays of bytes
        flat = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in arr.reshape(-1).tolist()]
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        arr = out.reshape(arr.shape)
    if arr.ndim == 0:
        raise InvalidArgument(f"input '{name}' is a scalar; batching needs every input to have the batch as "
                              f"dimension 0 (TF Serving: \"Batching Run() input tensors must have at least one "
                              f"dimension\")")
    return arr


def _dtype_key(arr: np.ndarray) -> str:
    return "string" if arr.dtype.kind == "O" else arr.dtype.str


# ---------------------------------------------------------------------------------------------------
# The batcher
# ---------------------------------------------------------------------------------------------------

class _Queue:
    """The batches of one key: closed ones in order, and one open batch per input layout."""

    def __init__(self) -> None:
        self.closed: collections.deque[Batch] = collections.deque()
        self.open: dict[Hashable, Batch] = {}  # insertion order is creation order

    def __len__(self) -> int:
        return len(self.closed) + len(self.open)


class Batcher:
    """Forms batches per key from submitted requests and hands them out when they may run.

    Thread-safe: submit() from the I/O thread, next_batch() from any number of batch threads.
    """

    def __init__(self, params: BatchingParameters) -> None:
        self.params = params
        self.num_batch_threads = params.resolved_num_batch_threads()
        self._timeout = params.batch_timeout_micros / 1e6
        self._limit = params.batch_size_limit
        self._cond = threading.Condition()
        self._queues: dict[Hashable, _Queue] = {}
        self._order: collections.deque[Hashable] = collections.deque()  # round robin over keys
        self._stopping = False

    # -- submitting ---------------------------------------------------------------------------------

    def submit(self, task: BatchTask) -> None:
        """Enqueues one request, or raises the ServeError to answer it with at once.

        InvalidArgument (400): no inputs, a scalar input, inputs whose dimension 0 differ, or more
        rows than max_batch_size. ResourceExhausted (429): the key's queue already holds
        max_enqueued_batches batches. DeadlineExceeded (504): the deadline has already passed.
        Unavailable (503): the batcher is stopping.
        """
        inputs, rows, group, padded = self._layout(task)
        if task.deadline is not None and time.time() > task.deadline:
            raise DeadlineExceeded("deadline exceeded before the request could be batched")
        if rows > self.params.max_batch_size:
            raise InvalidArgument(f"Task size {rows} is larger than maximum input batch size "
                                  f"{self.params.max_batch_size} (max_batch_size of the batching parameters); "
                                  f"send at most {self.params.max_batch_size} rows per request")
        with self._cond:
            if self._stopping:
                raise Unavailable("the worker is stopping; its batching queue takes no new requests")
            queue = self._queues.get(task.key)
            if queue is None:
                queue = self._queues[task.key] = _Queue()
                self._order.append(task.key)
            sizes, new_batches = self._pieces_for(rows, queue.open.get(group))
            if len(queue) + new_batches > self.params.max_enqueued_batches:
                raise ResourceExhausted(
                    f"batching queue full: the batch scheduling queue to which this task was submitted is full; "
                    f"currently {len(queue)} batches enqueued and max_enqueued_batches is "
                    f"{self.params.max_enqueued_batches}; retry later")
            self._place(queue, task, inputs, group, padded, sizes)
            self._cond.notify()

    def _pieces_for(self, rows: int, open_batch: Optional[Batch]) -> tuple[list[int], int]:
        """(rows of each piece, batches to add): as TF's Queue::Schedule, a request that does not fit in
        the open batch starts a new one, or with splitting fills the open batch and continues in new
        ones of at most max_execution_batch_size rows."""
        if open_batch is None:
            if rows <= self._limit:
                return [rows], 1
            return [min(self._limit, rows - i) for i in range(0, rows, self._limit)], math.ceil(rows / self._limit)
        room = self._limit - open_batch.size  # > 0: a full batch is closed at once
        if rows <= room:
            return [rows], 0
        if not self.params.enable_large_batch_splitting:
            return [rows], 1
        rest = rows - room
        return [room] + [min(self._limit, rest - i) for i in range(0, rest, self._limit)], math.ceil(rest / self._limit)

    def _layout(self, task: BatchTask) -> tuple[dict[str, np.ndarray], int, Hashable, bool]:
        """(inputs, rows, input layout, padded) of a request; the layout decides who shares a batch."""
        if not task.inputs:
            raise InvalidArgument("a request to a batching model must have at least one input")
        inputs = {name: _as_batchable(name, value) for name, value in task.inputs.items()}
        sizes = {name: arr.shape[0] for name, arr in inputs.items()}
        if len(set(sizes.values())) > 1:
            raise InvalidArgument(f"all inputs of a request must have the same size in dimension 0 (the batch), got "
                                  f"{sizes} (TF Serving: \"Batching Run() input tensors must have equal 0th-dimension "
                                  f"size\")")
        rows = next(iter(sizes.values()))
        # With padding, inputs of one rank and dtype share a batch whatever their other dimensions,
        # except zero-size tensors: TF Serving cannot pad them ("Got empty tensor in batch of
        # non-empty tensors"), so those only batch with their exact shape.
        padded = self.params.pad_variable_length_inputs and all(arr.size > 0 for arr in inputs.values())
        group = tuple(sorted(
            (name, _dtype_key(arr), arr.ndim if padded else arr.shape[1:]) for name, arr in inputs.items()))
        return inputs, rows, (padded, group), padded

    def _place(self, queue: _Queue, task: BatchTask, inputs: dict[str, np.ndarray], group: Hashable,
               padded: bool, sizes: list[int]) -> None:
        split = _SplitRequest(task, len(sizes)) if len(sizes) > 1 else None
        start = 0
        for index, rows in enumerate(sizes):
            batch = queue.open.get(group)
            if batch is not None and batch.size + rows > self._limit:
                queue.closed.append(queue.open.pop(group))
                batch = None
            if batch is None:
                batch = queue.open[group] = Batch(task.key, group, self.params, time.monotonic(), padded)
            part = inputs if split is None else {n: a[start:start + rows] for n, a in inputs.items()}
            batch._add(_Piece(task, part, rows, split, index))
            start += rows
            if batch.size >= self._limit:  # full: it may run now
                queue.closed.append(queue.open.pop(group))

    # -- handing out batches ------------------------------------------------------------------------

    def _take_locked(self, now: float) -> Optional[Batch]:
        """The next batch that may run, round robin over keys (as SharedBatchScheduler), or None."""
        for _ in range(len(self._order)):
            key = self._order.popleft()
            queue = self._queues[key]
            batch = None
            if queue.closed:
                batch = queue.closed.popleft()
            elif queue.open:
                group, oldest = next(iter(queue.open.items()))
                if self._stopping or now >= oldest.created + self._timeout:
                    batch = queue.open.pop(group)
            if queue:
                self._order.append(key)
            else:
                del self._queues[key]
            if batch is not None:
                return batch
        return None

    def _next_timeout_locked(self, now: float) -> Optional[float]:
        best: Optional[float] = None
        for queue in self._queues.values():
            if queue.closed or (queue.open and self._stopping):
                return 0.0
            if queue.open:
                oldest = next(iter(queue.open.values()))
                wait = max(0.0, oldest.created + self._timeout - now)
                best = wait if best is None else min(best, wait)
        return best

    def next_batch(self, timeout: Optional[float] = None) -> Optional[Batch]:
        """Blocks until a batch may run and takes it; None after ``timeout`` seconds or once stopped and empty."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                batch = self._take_locked(now)
                if batch is not None:
                    if self._next_timeout_locked(now) == 0.0:
                        self._cond.notify()  # more work: wake another thread
                    break
                if self._stopping and not self._queues:
                    return None
                wait = self._next_timeout_locked(now)
                if end is not None:
                    left = end - now
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)
        batch._drop_expired(time.time())
        if not batch.tasks and not batch.expired:  # only pieces of split requests already answered
            return self.next_batch(None if end is None else max(0.0, end - time.monotonic()))
        return batch

    # -- stopping ---------------------------------------------------------------------------------

    def stop(self, drain: bool = True) -> list[TaskResult]:
        """Stops taking requests. With ``drain``, every enqueued batch may run at once (next_batch
        hands them out, then returns None); without, the enqueued requests are returned with 503."""
        dropped: list[TaskResult] = []
        with self._cond:
            self._stopping = True
            if not drain:
                for queue in self._queues.values():
                    for batch in (*queue.closed, *queue.open.values()):
                        dropped.extend(batch.fail(Unavailable("the worker stopped before the request ran")))
                self._queues.clear()
                self._order.clear()
            self._cond.notify_all()
        return dropped


__all__ = ["BatchTask", "Batch", "Batcher", "TaskResult"]
