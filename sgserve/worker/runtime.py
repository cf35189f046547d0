"""A model version inside a worker: the shared tables bound once into a TF1 session, and one call
plan (worker/call_plan.py) per signature.

Why a session and not a tf.function: measured in one process pinned to one core with 1 intra-op +
1 inter-op thread, result read back as numpy, a session callable made with
``Session._make_callable_from_options`` and run in the caller's thread costs 4.7 us for
y = 0.5x + 2 (batch 1) and 13.5 us for an embedding lookup + MLP (batch 32). The cheapest eager
path (the function's op run with ``TFE_Py_Execute`` on an EagerTensor) costs 37-40 / 75-86 us and
the structured ConcreteFunction call 131 / 194 us: eager functions always hop to the inter-op pool
and back, and that pool's thread spins after each request. The public ``Session.make_callable``
goes through ``Session.run`` (68 / 104 us), so the callables here come from the options API.

Zero-copy: each table is fed once, as a numpy view of the read-only mapping, to a
``GetSessionHandle`` op; the session keeps that tensor (TensorFlow wraps a 64-byte aligned ndarray
without copying it, and the segment aligns every tensor to 64 bytes) and the serving graph reads it
with ``GetSessionTensor``, which passes the buffer by reference. No variable is created, so no
ResourceGather can copy a table (design notes, facts 1-4). Measured: a 384 MiB table adds no
private memory over 1,000 requests (USS), and a version's private memory is 11 MiB below the
eager runtime's.
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
import weakref
from typing import Any

import msgpack
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.framework import graph_util_impl

from sgserve.errors import InvalidArgument
from sgserve.models.shared_segment import SegmentView, is_file_segment
from sgserve.worker.call_plan import CallPlan, InputSpec

log = logging.getLogger(__name__)

__all__ = ["InputSpec", "SignatureRunner", "ModelRuntime", "map_segment", "SYNTHETIC_BATCHES"]

SYNTHETIC_BATCHES = (1, 8, 64, 256)  # rows of the synthetic warmup requests of a batched signature
TABLE_ALIGN = 64  # TensorFlow copies a fed ndarray that is not aligned to EIGEN_MAX_ALIGN_BYTES
PREFIX = "m"  # the serving graph's name scope in the session graph
# Output dtypes TensorFlow's Snapshot kernel takes (a copy only when the buffer is shared).
_SNAPSHOT_DTYPES = {tf.bool, tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.complex64, tf.complex128,
                    tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8, tf.uint16, tf.uint32, tf.uint64}


class SignatureRunner:
    """One signature of one model version, ready to call."""

    def __init__(self, name: str, sig: dict[str, Any], plan: CallPlan) -> None:
        self.name = name
        self.method = sig.get("method", "")
        self.inputs = {spec.name: spec for spec in plan.inputs}
        self.output_names = plan.output_names
        self.plan = plan
        self._order = [spec.name for spec in plan.inputs]

    def validate(self, arrays: dict[str, np.ndarray], output_filter: list[str] | None = None) -> None:
        """400s that name the input (or the filtered output) and what was expected."""
        missing = [n for n in self._order if n not in arrays]
        if missing:
            raise InvalidArgument(f"signature '{self.name}' is missing input(s) {missing}; it takes {sorted(self._order)}")
        extra = [n for n in arrays if n not in self.inputs]
        if extra:
            raise InvalidArgument(f"signature '{self.name}' has no input(s) {extra}; it takes {sorted(self._order)}")
        for n, spec in self.inputs.items():
            arr = arrays[n]
            got = "string" if arr.dtype.kind in ("O", "S", "U") else arr.dtype.name
            if got != spec.dtype:
                raise InvalidArgument(f"input '{n}': expected dtype {spec.dtype}, got {got}")
            if spec.shape is not None:
                bad = len(spec.shape) != arr.ndim or any(e != -1 and e != g for e, g in zip(spec.shape, arr.shape))
                if bad:
                    want = "[" + ", ".join("?" if d == -1 else str(d) for d in spec.shape) + "]"
                    raise InvalidArgument(f"input '{n}': expected shape {want}, got {list(arr.shape)}")
        if output_filter:
            unknown = [o for o in output_filter if o not in self.output_names]
            if unknown:
                raise InvalidArgument(f"output_filter names unknown output(s) {unknown}; "
                                      f"signature '{self.name}' has {self.output_names}")

    def run_wire(self, metas: list | None, payload: list,
                 output_filter: list[str] | None = None) -> dict[str, np.ndarray]:
        """Runs a request straight off the wire: the header's ``inputs`` entries and the payload
        frames (zmq.Frame, bytes or memoryview). Refuses what ``protocol.check_tensors`` and then
        validate() refuse, with their messages; the numeric inputs are views of the frames."""
        plan = self.plan
        feeds = plan.bind_wire(metas, payload)
        if feeds is None or (output_filter and not plan.filter_ok(output_filter)):
            feeds = plan.checked_wire(metas, payload, output_filter, self.validate)
        return plan.call(feeds, output_filter)

    def validate_wire(self, metas: list | None, payload: list,
                      output_filter: list[str] | None = None) -> dict[str, np.ndarray]:
        """decode_tensors + validate() in one pass, for the batching path: the arrays by name."""
        feeds = self.plan.checked_wire(metas, payload, output_filter, self.validate)
        return dict(zip(self._order, feeds))

    def run(self, arrays: dict[str, np.ndarray], output_filter: list[str] | None = None) -> dict[str, np.ndarray]:
        feeds = self.plan.bind_fast(arrays)
        if feeds is None or (output_filter and not self.plan.filter_ok(output_filter)):
            self.validate(arrays, output_filter)
            feeds = self.plan.bind_arrays(arrays)
        return self.plan.call(feeds, output_filter)

    def execute(self, arrays: dict[str, np.ndarray], output_filter: list[str] | None = None) -> dict[str, np.ndarray]:
        """run() without validate(): for a batch merged from requests that each passed validate(), so
        that one bad request is refused alone instead of failing the whole batch."""
        return self.plan.call(self.plan.bind_arrays(arrays), output_filter)


# Page-cache hints on the file tier (--segment-dir), where a table's pages come from disk on first
# use: tables this large are embedding tables read a row at a time, so read-ahead only evicts hot
# rows (MADV_RANDOM); smaller ones (dense layers) are read whole by every request (MADV_WILLNEED).
# SGSERVE_SEGMENT_MADVISE=0 turns the hints off (bench/bench_tiers.py measures both).
RANDOM_ACCESS_BYTES = 16 * 2**20
_MADVISE = os.environ.get("SGSERVE_SEGMENT_MADVISE", "1") != "0"


def _advise(view: SegmentView, t: dict[str, Any]) -> None:
    """madvise() hints for one table of a file-tier segment; nothing on /dev/shm (RAM already)."""
    if not _MADVISE or not is_file_segment(view.name) or not t["nbytes"]:
        return
    big = t["nbytes"] >= RANDOM_ACCESS_BYTES
    view.advise(t["offset"], t["nbytes"], mmap.MADV_RANDOM if big else mmap.MADV_WILLNEED)


_views: "weakref.WeakValueDictionary[str, SegmentView]" = weakref.WeakValueDictionary()
_views_lock = threading.Lock()  # versions load on the loader thread while the serve loop runs


def map_segment(name: str) -> SegmentView:
    """One mapping per segment per process, shared by every version that uses it (incremental
    updates share unchanged tensors between versions). It is unmapped once no version uses it."""
    with _views_lock:
        view = _views.get(name)
        if view is None:
            view = _views[name] = SegmentView(name)
        return view


def session_config() -> config_pb2.ConfigProto:
    """This process's thread settings (serve.py sets them before loading) for a session.

    With at most one inter-op thread the graph runs in the calling thread: no hop to a pool and
    back, and no pool thread left spinning after each request. Pool threads (intra-op, or inter-op
    when there are several) do not spin either: TensorFlow's Eigen pools busy-wait for work after
    each task, which cost a 2-thread intra-op pool about 20% more CPU per request, for no gain in
    latency measured here. The first session of the process creates the intra-op pool, so this
    holds as long as nothing ran TensorFlow eagerly before the first version was loaded."""
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    cfg = config_pb2.ConfigProto(intra_op_parallelism_threads=intra,
                                 inter_op_parallelism_threads=-1 if inter <= 1 else inter,
                                 allow_soft_placement=True)
    cfg.experimental.disable_thread_spinning = True
    return cfg


class ModelRuntime:
    """A loaded model version in this worker: the mappings, its session and the signature runners."""

    def __init__(self, segment: str) -> None:
        self.view = map_segment(segment)
        m = self.view.manifest
        self.name: str = m["model"]
        self.version: int = int(m["version"])
        self.base_path: str = m.get("base_path", "")
        self._views = {segment: self.view}  # every segment this version maps, kept alive with it
        self._config = session_config()
        self._inline = self._config.inter_op_parallelism_threads < 0
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(m["graph"])
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.session = tf.compat.v1.Session(graph=self.graph, config=self._config)
            self._release_ops: list[Any] = [tf.constant(0, name="sgserve_flush")]
            # Whoever drops this version (serve.py's unload, close()) frees its tables at once.
            self._finalizer = weakref.finalize(self, _release, self.session, self._release_ops)
            self._finalizer.atexit = False  # an exiting worker leaves that to the kernel
            input_map = self._bind_tables(m["tensors"])
            input_map.update({k: tf.constant(v, name="sgserve_asset") for k, v in m.get("assets", {}).items()})
            self._import(graph_def, m, input_map)
        self._run_init(m.get("init_nodes", []))
        self._rewarm: dict[str, dict[str, np.ndarray]] = {}  # one warmup request per signature
        self.signatures: dict[str, SignatureRunner] = {}
        for sname, sig in m["signatures"].items():
            self.signatures[sname] = self._build_signature(sname, sig)

    def _bind_tables(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """Feeds every table once to the session, which keeps it; tensor name -> its reader."""
        feed: dict[Any, Any] = {}
        handle_ops: list[tuple[str, Any, Any]] = []
        for i, t in enumerate(entries):
            dtype = tf.string if t["dtype"] == "string" else tf.as_dtype(t["dtype"])
            value = self._table(t)
            # No static shape: with one, the session's graph optimizer allocates about 4% of the
            # table's size for the feed (measured: 16 MiB of private memory for a 384 MiB table).
            ph = tf.compat.v1.placeholder(dtype, None, name=f"sgserve_table_{i}")
            feed[ph] = value
            handle_ops.append((t["node"], dtype, tf.compat.v1.get_session_handle(ph, name=f"sgserve_keep_{i}")))
        # Raw handle strings: the tensors stay until _release deletes them (a TensorHandle object
        # would delete its tensor whenever Python collects it, by adding ops to the graph then).
        handles = self.session.run([op for _, _, op in handle_ops], feed) if handle_ops else []
        readers = {}
        for i, ((node, dtype, _), h) in enumerate(zip(handle_ops, handles)):
            raw = tf.constant(h.get_raw_handle(), name=f"sgserve_handle_{i}")
            readers[f"{node}:0"] = tf.raw_ops.GetSessionTensor(handle=raw, dtype=dtype, name=f"sgserve_read_{i}")
            self._release_ops.insert(0, tf.raw_ops.DeleteSessionTensor(handle=raw, name=f"sgserve_delete_{i}"))
        return readers

    def _table(self, t: dict[str, Any]) -> np.ndarray:
        """The array to feed for one manifest entry: a view of the mapping for numeric tables."""
        other = t.get("segment")
        view = self.view if other is None else self._views.get(other)
        if view is None:
            view = self._views[other] = map_segment(other)
        if t["dtype"] == "string":
            items = msgpack.unpackb(view.raw(t["offset"], t["nbytes"]), raw=True)
            return np.array(items, dtype=object).reshape(t["shape"])
        if t["nbytes"] == 0:
            return np.zeros(t["shape"], dtype=t["dtype"])
        arr = view.array(t["offset"], t["dtype"], t["shape"])
        _advise(view, t)
        if arr.ctypes.data % TABLE_ALIGN:  # never for segments the loader wrote; TF would copy it
            log.warning("%s: table %s is not %d-byte aligned in %s; this worker holds a private copy",
                        self.name, t["node"], TABLE_ALIGN, view.name)
        return arr

    def _import(self, graph_def: Any, m: dict[str, Any], input_map: dict[str, Any]) -> None:
        """Imports what the signatures and the initializers need, tables read from the session."""
        fetch_nodes = [o["tensor"].split(":")[0] for s in m["signatures"].values() for o in s["outputs"].values()]
        sub = graph_util_impl.extract_sub_graph(graph_def, list(dict.fromkeys(fetch_nodes + m.get("init_nodes", []))))
        names = {n.name for n in sub.node}
        used = {k: v for k, v in input_map.items() if k.split(":")[0] in names}
        tf.graph_util.import_graph_def(sub, input_map=used, name=PREFIX)

    def _run_init(self, init_nodes: list[str]) -> None:
        """Runs the table initializers once; the tables live on in this session's resource manager."""
        if init_nodes:
            self.session.run([self.graph.get_operation_by_name(f"{PREFIX}/{n}") for n in init_nodes])

    def _make_callable(self, feeds: list[str], fetches: list[str]) -> Any:
        opts = config_pb2.CallableOptions(feed=feeds, fetch=fetches)
        if self._inline:
            opts.run_options.inter_op_thread_pool = -1  # the calling thread runs the graph
        return self.session._make_callable_from_options(opts)

    def _build_signature(self, sname: str, sig: dict[str, Any]) -> SignatureRunner:
        order = sorted(sig["inputs"])
        inputs = [InputSpec(n, sig["inputs"][n]["tensor"], sig["inputs"][n]["dtype"], sig["inputs"][n]["shape"])
                  for n in order]
        feeds = [f"{PREFIX}/{spec.tensor}" for spec in inputs]
        fetch_of: dict[str, str] = {}
        with self.graph.as_default():
            for o, info in sorted(sig["outputs"].items()):
                t = self.graph.get_tensor_by_name(f"{PREFIX}/{info['tensor']}")
                # A fresh tensor for every output: a session cannot fetch a tensor it is fed (an
                # input passed through), and Snapshot copies a buffer TensorFlow shares (a table).
                op = tf.raw_ops.Snapshot if t.dtype in _SNAPSHOT_DTYPES else tf.raw_ops.Identity
                fetch_of[o] = op(input=t, name="sgserve_out").name  # TF makes the name unique

        def make_callable(outputs: list[str]) -> Any:
            return self._make_callable(feeds, [fetch_of[o] for o in outputs])

        plan = CallPlan(sname, inputs, sorted(sig["outputs"]), make_callable, tf.errors.InvalidArgumentError)
        return SignatureRunner(sname, sig, plan)

    def close(self) -> None:
        """Frees the tables' tensors and the session now rather than when Python collects this."""
        self._finalizer()

    def rewarm(self) -> None:
        """Runs one warmup request per signature again, on the calling thread (the serve loop's),
        so that whatever TensorFlow sets up per thread is not paid by the first real request."""
        for name, inputs in self._rewarm.items():
            try:
                self.signatures[name].run(inputs)
            except Exception as exc:  # noqa: BLE001 - it ran once already; never fail the install
                log.info("re-warmup of %s/%s skipped: %s", self.name, name, exc)

    def warmup(self, requests: list[Any] | None = None) -> int:
        """Runs the warmup requests (sgserve.models.warmup.WarmupRequest), or, without any, synthetic
        requests built from each signature (DeepRec's behaviour), one per batch size in
        SYNTHETIC_BATCHES when the first dimension is the batch: TensorFlow's kernels set up per
        shape, so the first real batch of 128 rows would otherwise pay that on the request path.
        Returns how many ran."""
        if requests:
            ran = 0
            for req in requests:
                runner = self.signatures.get(req.signature)
                if runner is None:
                    raise ValueError(f"warmup request for signature '{req.signature}', which "
                                     f"{self.name} version {self.version} does not have")
                inputs = _cast_to(runner, req.inputs)
                runner.run(inputs)
                self._rewarm[runner.name] = inputs
                ran += 1
            return ran
        ran = 0
        for runner in self.signatures.values():
            batched = all(spec.shape and spec.shape[0] == -1 for spec in runner.inputs.values())
            for batch in SYNTHETIC_BATCHES if batched and runner.inputs else (1,):
                arrays = {}
                for n, spec in runner.inputs.items():
                    shape = [1 if d == -1 else d for d in (spec.shape or [1])]
                    if batched:
                        shape[0] = batch
                    if spec.dtype == "string":
                        arrays[n] = np.full(shape, b"", dtype=object)
                    else:
                        arrays[n] = np.zeros(shape, dtype=spec.dtype)
                try:
                    runner.run(arrays)
                    self._rewarm[runner.name] = arrays
                    ran += 1
                except Exception as exc:  # noqa: BLE001 - zeros may be out of range for a model; not fatal
                    log.info("warmup of %s/%s skipped: %s", self.name, runner.name, exc)
                    break
        return ran


def _release(session: Any, release_ops: list[Any]) -> None:
    """Deletes the session's tensors, then lets go of the mapping: TensorFlow hands the ndarrays
    it wrapped back to Python only at its next call (it cannot take the GIL where it frees them),
    hence the last op, a constant, run on its own. Then closes the session."""
    try:
        if len(release_ops) > 1:
            session.run(release_ops[:-1])
        session.run(release_ops[-1])
    except Exception as exc:  # noqa: BLE001 - interpreter shutdown, or a session already closed
        log.debug("releasing a session's tables: %s", exc)
    finally:
        session.close()


def _cast_to(runner: SignatureRunner, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Warmup files written by hand carry JSON numbers: give them the signature's numeric dtypes."""
    out = {}
    for name, arr in inputs.items():
        spec = runner.inputs.get(name)
        if spec is not None and spec.dtype != "string" and arr.dtype.kind in "biuf" and arr.dtype.name != spec.dtype:
            arr = arr.astype(spec.dtype)
        out[name] = arr
    return out

