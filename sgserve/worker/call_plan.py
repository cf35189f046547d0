"""The per-signature call plan: what a request must look like, and how to feed it to TensorFlow.

Built once per signature when a version is loaded, so that a request costs one pass over its
tensor entries: check each against the plan's slot for that name (dtype, rank, fixed dims, frame
size), view its frame as an array, and hand the list to the session callable. The checks are the
union of what ``protocol.check_tensors`` and ``SignatureRunner.validate`` refuse. Anything the one
pass does not recognise as well formed goes to the old sequence (check_tensors, decode, validate),
which raises the error with the exact message it always gave; the fast path never words an error.

No TensorFlow here: the plan only needs ``make_callable(feeds, fetches)``, which the runtime
provides (worker/runtime.py).
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Sequence

import msgpack
import numpy as np

from sgserve import protocol
from sgserve.errors import InvalidArgument

STRING = protocol.STRING
_NEVER = object()  # the wire dtype of an input whose dtype the wire cannot carry: equals nothing
MAX_FILTERED_CALLABLES = 64  # one session callable per distinct output_filter, at most this many

# A callable over the feeds, in the plan's input order, returning the fetched outputs in order.
SessionCallable = Callable[..., Sequence[Any]]


@dataclasses.dataclass
class InputSpec:
    name: str
    tensor: str
    dtype: str  # wire dtype
    shape: list[int] | None  # -1 = any


class _Slot:
    """One input: where it goes in the feed list and what the wire must say about it."""

    __slots__ = ("index", "wire", "np_dtype", "itemsize", "rank", "fixed")

    def __init__(self, index: int, spec: InputSpec) -> None:
        self.index = index
        # A dtype the wire cannot carry (e.g. bfloat16) matches no entry: such a signature always
        # takes the old sequence, which refuses it.
        self.wire = spec.dtype if spec.dtype in protocol.ALL_DTYPES else _NEVER
        self.np_dtype = None if spec.dtype == STRING else protocol.DTYPES.get(spec.dtype)
        self.itemsize = self.np_dtype.itemsize if self.np_dtype is not None else 0
        self.rank = None if spec.shape is None else len(spec.shape)
        self.fixed = () if spec.shape is None else tuple((k, d) for k, d in enumerate(spec.shape) if d != -1)


class CallPlan:
    """Input order, wire and numpy dtypes, fixed dims, the session callables, the output order."""

    def __init__(self, name: str, inputs: list[InputSpec], output_names: list[str],
                 make_callable: Callable[[list[str]], SessionCallable],
                 runtime_error: type[Exception] | tuple[type[Exception], ...] = ()) -> None:
        self.name = name
        self._runtime_error = runtime_error  # TensorFlow's InvalidArgumentError: a 400, as execute() gave
        self.inputs = inputs  # feed order
        self.output_names = list(output_names)  # fetch order (sorted), the order results come in
        self._n = len(inputs)
        self._slots = {spec.name: _Slot(i, spec) for i, spec in enumerate(inputs)}
        self._make_callable = make_callable
        self._full = make_callable(self.output_names)
        self._filtered: dict[Any, tuple[tuple[str, ...], SessionCallable]] = {}
        self._lock = threading.Lock()  # building a filtered callable (batch threads call too)

    # -- requests off the wire -----------------------------------------------------------------
    def bind_wire(self, metas: Any, payload: Sequence[Any]) -> list[Any] | None:
        """The feeds for a well-formed request (header entries + payload frames), in feed order;
        None when anything is off, for the caller to run the old sequence and raise its error."""
        if metas is None:
            metas = []
        n = self._n
        if type(metas) is not list or len(metas) != n or len(payload) != n:
            return None
        feeds: list[Any] = [None] * n
        slots = self._slots
        try:
            for meta, frame in zip(metas, payload):
                if type(meta) is not dict:
                    return None
                slot = slots.get(meta.get("name"))
                if slot is None or meta.get("dtype") != slot.wire or feeds[slot.index] is not None:
                    return None
                shape = meta.get("shape")
                if type(shape) is not list:
                    return None
                count = protocol.element_count(shape)
                if count is None:
                    return None
                if slot.rank is not None:
                    if len(shape) != slot.rank:
                        return None
                    for k, want in slot.fixed:
                        if shape[k] != want:
                            return None
                buf = getattr(frame, "buffer", frame)
                if slot.np_dtype is not None:
                    if len(frame) != count * slot.itemsize:
                        return None
                    feeds[slot.index] = np.frombuffer(buf, slot.np_dtype).reshape(shape)
                else:
                    feeds[slot.index] = _strings(frame, buf, count, shape)
                    if feeds[slot.index] is None:
                        return None
        except Exception:  # noqa: BLE001 - unhashable names, odd buffers...: the old sequence words it
            return None
        return feeds

    def checked_wire(self, metas: Any, payload: Sequence[Any], output_filter: Any,
                     validate: Callable[[dict[str, np.ndarray], Any], None]) -> list[Any]:
        """bind_wire, or the old sequence for its error (or, should it pass, for its arrays)."""
        feeds = self.bind_wire(metas, payload)
        if feeds is not None and self.filter_ok(output_filter):
            return feeds
        arrays = protocol.decode_tensors(metas, payload)  # raises check_tensors' and decoding's errors
        validate(arrays, output_filter)  # raises validate's errors
        return self.bind_arrays(arrays)

    # -- requests as arrays --------------------------------------------------------------------
    def bind_fast(self, arrays: dict[str, np.ndarray]) -> list[Any] | None:
        """Feeds for arrays that are exactly right (dtype, rank, fixed dims, no extras); else None."""
        if len(arrays) != self._n:
            return None
        feeds: list[Any] = []
        for spec in self.inputs:
            a = arrays.get(spec.name)
            if type(a) is not np.ndarray:
                return None
            slot = self._slots[spec.name]
            if slot.np_dtype is not None:
                if a.dtype != slot.np_dtype:
                    return None
            elif slot.wire is not STRING or a.dtype.kind not in "OSU":
                return None
            if slot.rank is not None:
                if a.ndim != slot.rank:
                    return None
                shape = a.shape
                for k, want in slot.fixed:
                    if shape[k] != want:
                        return None
            feeds.append(a)
        return feeds

    def bind_arrays(self, arrays: dict[str, np.ndarray]) -> list[Any]:
        """Feeds for arrays that passed validate(): the signature's byte order and dtype (a
        big-endian float32 is still "float32" to validate, and TensorFlow would misread it)."""
        feeds: list[Any] = []
        for spec in self.inputs:
            a = arrays[spec.name]
            dt = self._slots[spec.name].np_dtype
            if dt is not None and a.dtype != dt:
                a = np.asarray(a).astype(dt)
            feeds.append(a)
        return feeds

    # -- the call ------------------------------------------------------------------------------
    def filter_ok(self, output_filter: Any) -> bool:
        """True when output_filter is empty or a list of known output names."""
        if not output_filter:
            return True
        if type(output_filter) is not list:
            return False
        names = self.output_names
        for o in output_filter:
            if type(o) is not str or o not in names:
                return False
        return True

    def call(self, feeds: list[Any], output_filter: Any = None) -> dict[str, np.ndarray]:
        """Outputs by name, sorted by name, those output_filter names (all when it is empty).

        The arrays are read-only: TensorFlow hands back its own buffers, and an output may be a
        view of a shared table (mapped read-only) or of a constant in the graph."""
        if output_filter:
            names, fn = self._callable_for(output_filter)
        else:
            names, fn = self.output_names, self._full
        try:
            outs = fn(*feeds)
        except self._runtime_error as exc:
            raise InvalidArgument(f"signature '{self.name}': {_first_line(exc)}") from None
        result = {}
        for n, v in zip(names, outs):
            if type(v) is np.ndarray:
                v.flags.writeable = False
            result[n] = v
        return result

    def _callable_for(self, output_filter: Any) -> tuple[tuple[str, ...] | list[str], SessionCallable]:
        """A callable fetching only the filtered outputs (TensorFlow skips the rest of the graph)."""
        try:
            key = tuple(output_filter)
            hit = self._filtered.get(key)
        except TypeError:  # unhashable entries: validate() let them through, so they name nothing
            key, hit = None, None
        if hit is not None:
            return hit
        names = tuple(n for n in self.output_names if n in output_filter)  # execute()'s rule
        if not names:  # still run the model, as execute() did: it may refuse the inputs
            return names, self._full
        with self._lock:
            hit = self._filtered.get(key) if key is not None else None
            if hit is None:
                hit = (names, self._make_callable(list(names)))
                if key is not None and len(self._filtered) < MAX_FILTERED_CALLABLES:
                    self._filtered[key] = hit
        return hit


def _first_line(exc: Exception) -> str:
    """The cause, for the client: the first line of TensorFlow's message (the node follows it)."""
    message = getattr(exc, "message", None) or str(exc)
    return message.strip().splitlines()[0][:500] if message.strip() else type(exc).__name__


def _strings(frame: Any, buf: Any, count: int, shape: list[int]) -> np.ndarray | None:
    """The object array of a string tensor's frame (a msgpack array of bin), or None when the frame
    is not exactly that (then the old sequence words the error, or converts odd elements)."""
    if len(frame):
        if protocol._msgpack_array_len(frame) != count:
            return None
        items = msgpack.unpackb(buf, raw=True)
        if type(items) is not list or len(items) != count:
            return None
        for item in items:
            if type(item) is not bytes:
                return None
    elif count:
        return None
    else:
        items = []
    arr = np.empty(count, dtype=object)
    arr[:] = items
    return arr.reshape(shape)
