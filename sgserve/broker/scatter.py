"""Scatter-gather of one predict request's rows, as pure functions over wire frames.

A big request runs on one worker's cores while the others sit idle; the broker can instead split its
rows across idle workers and concatenate the outputs (issue 13). This module is the data side of
that, with no sockets and no TensorFlow, so the routing core stays a thin state machine over it:

- ``rows_of(header, payload)``: the rows a predict request could be split along, or None.
- ``split_request(header, payload, parts)``: the parts, each a request a worker accepts exactly as a
  client's. Numeric frames are memoryview slices of the client's frames: in C order the first
  dimension is outermost, so a row range is one contiguous byte range and splitting copies nothing.
  String tensors (a msgpack array each) are re-encoded per part; they are rare and small.
- ``Gather``: collects the parts' replies and merges them into the one reply the client gets.

The part headers keep the client's ``id``, so the workers' replies carry it; the broker routes the
parts' replies by its own request ids (the W_REQUEST command frame), not by this id. Whether a
signature may be split at all (every input and output batched, split answers equal unsplit ones) is
decided elsewhere, at load; ``Gather`` checks only what one reply can show, and answers 500 when the
parts disagree rather than send a wrong concatenation.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import msgpack
import zmq

from sgserve import protocol
from sgserve.errors import INTERNAL, OK, Internal, InvalidArgument

log = logging.getLogger(__name__)

__all__ = ["rows_of", "row_bounds", "split_request", "Gather"]

Part = tuple[dict[str, Any], list[Any]]  # (request header, payload frames) of one part


def rows_of(header: dict[str, Any], payload: Sequence[Any]) -> int | None:
    """The first dimension every input of a predict request shares; None when there is none (no
    inputs, a scalar input, inputs that disagree) or when the tensors are not well formed: such a
    request goes to a worker unsplit, which answers its error in the words it always used."""
    metas = header.get("inputs")
    if type(metas) is not list or not metas:
        return None
    try:
        protocol.check_tensors(metas, payload)
    except InvalidArgument:
        return None
    rows: int | None = None
    for meta in metas:
        shape = meta["shape"]
        if not shape or (rows is not None and shape[0] != rows):
            return None
        rows = shape[0]
    return rows


def row_bounds(rows: int, parts: int) -> list[int]:
    """Boundaries of ``min(parts, rows)`` (at least 1) contiguous, near-equal row ranges, in order:
    part i is rows ``[b[i], b[i+1])``. The first ``rows % k`` parts take one row more."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    k = max(1, min(parts, rows))
    q, r = divmod(rows, k)
    bounds = [0]
    for i in range(k):
        bounds.append(bounds[-1] + q + (1 if i < r else 0))
    return bounds


def split_request(header: dict[str, Any], payload: Sequence[Any], parts: int) -> list[Part]:
    """The request as ``min(parts, rows)`` requests over contiguous row ranges, in row order.

    Each part's header is the client's with every input's first dimension set to the part's rows;
    its payload frames are zero-copy memoryview slices of the client's frames (bytes, memoryviews or
    zmq.Frames, which the slices keep alive), or, for strings, a new msgpack array. With one part the
    request is returned as it came. Raises InvalidArgument when ``rows_of`` is None or a string
    payload does not decode: send such a request unsplit and let the worker answer it.
    """
    rows = rows_of(header, payload)
    if rows is None:
        raise InvalidArgument("request cannot be split: its inputs share no leading dimension")
    bounds = row_bounds(rows, parts)
    if len(bounds) == 2:
        return [(header, list(payload))]
    metas = header["inputs"]
    columns = [_slice_tensor(meta, frame, bounds) for meta, frame in zip(metas, payload)]
    out: list[Part] = []
    for i in range(len(bounds) - 1):
        part_header = dict(header)
        n = bounds[i + 1] - bounds[i]
        part_header["inputs"] = [{**meta, "shape": [n, *meta["shape"][1:]]} for meta in metas]
        out.append((part_header, [column[i] for column in columns]))
    return out


def _buffer(frame: Any) -> memoryview:
    """A flat byte view of a frame (bytes, memoryview, numpy buffer or zmq.Frame), without a copy."""
    mv = memoryview(frame.buffer if type(frame) is zmq.Frame else frame)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def _slice_tensor(meta: dict[str, Any], frame: Any, bounds: list[int]) -> list[Any]:
    """One tensor's frame per part, for a tensor check_tensors accepted."""
    per_row = math.prod(meta["shape"][1:])
    if meta["dtype"] != protocol.STRING:
        buf = _buffer(frame)
        size = per_row * protocol.DTYPES[meta["dtype"]].itemsize
        return [buf[a * size:b * size] for a, b in zip(bounds, bounds[1:])]
    items = _string_items(meta["name"], frame)
    return [msgpack.packb(items[a * per_row:b * per_row], use_bin_type=True) for a, b in zip(bounds, bounds[1:])]


def _string_items(name: str, frame: Any) -> list[bytes]:
    """A string tensor's elements, as the worker reads them (str and other elements as UTF-8)."""
    buf = _buffer(frame)
    if not len(buf):
        return []
    try:
        items = msgpack.unpackb(buf, raw=True)
    except Exception as exc:  # noqa: BLE001 - a valid array header over a broken body: protocol's words
        raise InvalidArgument(f"tensor '{name}': string payload is not a msgpack array ({exc})") from None
    if any(type(x) is not bytes for x in items):
        items = [protocol._to_bytes(x) for x in items]
    return items


def _array_header(count: int) -> bytes:
    """The msgpack array header for ``count`` elements (what msgpack.packb writes)."""
    if count < 16:
        return bytes([0x90 | count])
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def _array_body(frame: Any) -> memoryview:
    """The elements of a msgpack array frame, after its header (an empty frame is an empty array)."""
    buf = _buffer(frame)
    if not len(buf):
        return buf
    first = buf[0]
    return buf[1:] if first <= 0x9F else buf[3:] if first == 0xDC else buf[5:]


class Gather:
    """The replies to one split request's parts, merged into the one reply its client gets.

    The broker makes one per split request (``parts`` as split_request returned, ``rows`` each
    part's rows when it wants them checked against the outputs), ``add``s each part's reply as it
    arrives, answers as soon as ``failed`` is set (dropping or cancelling the ``pending`` parts), and
    otherwise answers ``reply()`` once ``done``. A part's reply counts once: a second one for the
    same part (a retry racing a late reply) is dropped.

    The merged reply keeps the protocol's types: ``worker`` is the first part's worker (an int, as
    clients parse it), ``workers`` lists every part's worker in part order, ``parts`` is the number
    of parts, and ``batch_size`` (with batching) is the largest batch any part ran in.
    """

    def __init__(self, request_id: Any, parts: int, rows: Sequence[int] | None = None) -> None:
        if parts < 1:
            raise ValueError(f"parts must be at least 1, got {parts}")
        if rows is not None and len(rows) != parts:
            raise ValueError(f"{len(rows)} row counts for {parts} parts")
        self.request_id = request_id
        self.parts = parts
        self._rows = list(rows) if rows is not None else None
        self._replies: list[tuple[dict[str, Any], list[Any]] | None] = [None] * parts
        self._received = 0
        self._failure: dict[str, Any] | None = None  # the first failed part's reply header

    def add(self, part_index: int, reply_header: dict[str, Any], reply_payload: Sequence[Any]) -> None:
        """Records part ``part_index``'s reply (its decoded header and its payload frames)."""
        if not 0 <= part_index < self.parts:
            raise IndexError(f"part {part_index} of a request split into {self.parts}")
        if self._replies[part_index] is not None:
            log.debug("request %r: second reply for part %d dropped", self.request_id, part_index)
            return
        self._replies[part_index] = (reply_header, list(reply_payload))
        self._received += 1
        if self._failure is None and reply_header.get("code") != OK:
            self._failure = reply_header

    @property
    def failed(self) -> tuple[int, str] | None:
        """(code, message) of the first part that failed, in arrival order; None while none has."""
        if self._failure is None:
            return None
        code, message = self._failure.get("code"), self._failure.get("message")
        if type(code) is not int:
            return INTERNAL, f"a part's reply has no status code (got {code!r})"
        return code, message if isinstance(message, str) else str(message)

    @property
    def done(self) -> bool:
        """True once every part has replied."""
        return self._received == self.parts

    def pending(self) -> list[int]:
        """The parts that have not replied yet (to cancel, or to drop their replies)."""
        return [i for i, r in enumerate(self._replies) if r is None]

    def reply(self) -> list[Any]:
        """The client's reply from MAGIC on: the first failure's code and message (with that part's
        model, version and worker), else the merged outputs, else merge's 500."""
        if self._failure is not None:
            code, message = self.failed  # type: ignore[misc]
            header = {**self._failure, "id": self.request_id, "code": code, "message": message,
                      "parts": self.parts}
            return [protocol.MAGIC, msgpack.packb(header, use_bin_type=True)]
        try:
            header, payload = self.merge()
        except Internal as exc:
            log.error("request %r: %s", self.request_id, exc.message)
            return protocol.error_reply(self.request_id, exc.code, exc.message, parts=self.parts)
        return [protocol.MAGIC, msgpack.packb(header, use_bin_type=True), *payload]

    def merge(self) -> tuple[dict[str, Any], list[Any]]:
        """One reply header and payload: each output concatenated along dimension 0, in part order.
        Raises Internal (500) when the parts disagree on anything but the first dimension."""
        if self._failure is not None or not self.done:
            raise RuntimeError(f"merge() needs every part to have succeeded; failed={self.failed}, "
                               f"pending={self.pending()}")
        replies: list[tuple[dict[str, Any], list[Any]]] = self._replies  # type: ignore[assignment]
        first = replies[0][0]
        header: dict[str, Any] = {"id": self.request_id, "code": OK, "message": "", "model": first.get("model"),
                                  "version": first.get("version"), "worker": first.get("worker"),
                                  "workers": [h.get("worker") for h, _ in replies], "parts": self.parts}
        sizes = [h["batch_size"] for h, _ in replies if type(h.get("batch_size")) is int]
        if sizes:
            header["batch_size"] = max(sizes)
        metas = self._checked_outputs(replies)
        if not metas:
            return header, []
        merged, payload = [], []
        for j, meta in enumerate(metas):
            frames = [p[j] for _, p in replies]
            rows = sum(h["outputs"][j]["shape"][0] for h, _ in replies)
            merged.append({"name": meta["name"], "dtype": meta["dtype"], "shape": [rows, *meta["shape"][1:]]})
            if meta["dtype"] == protocol.STRING:
                count = rows * math.prod(meta["shape"][1:])
                payload.append(b"".join([_array_header(count), *(_array_body(f) for f in frames)]))
            else:
                payload.append(b"".join([_buffer(f) for f in frames]))
        header["outputs"] = merged
        return header, payload

    def _checked_outputs(self, replies: list[tuple[dict[str, Any], list[Any]]]) -> list[dict[str, Any]]:
        """The first part's output entries, once every part is shown to agree with them."""
        first = replies[0][0]
        for p, (h, payload) in enumerate(replies):
            for key in ("model", "version"):
                if h.get(key) != first.get(key):
                    self._disagree(f"part {p} ran {key} {h.get(key)!r}, part 0 ran {first.get(key)!r}")
            metas = h.get("outputs") or []
            try:
                protocol.check_tensors(metas, payload, "outputs")
            except InvalidArgument as exc:
                self._disagree(f"part {p}'s reply is malformed: {exc.message}")
            self._check_part(p, metas, first.get("outputs") or [])
        return first.get("outputs") or []

    def _check_part(self, p: int, metas: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
        """Part ``p``'s outputs against part 0's: names, dtypes, every dimension but the first."""
        names = [m["name"] for m in metas]
        if names != [m["name"] for m in want]:
            self._disagree(f"part {p} returned outputs {names}, part 0 {[m['name'] for m in want]}")
        for meta, ref in zip(metas, want):
            name, shape = meta["name"], meta["shape"]
            if not shape:
                self._disagree(f"output '{name}' is a scalar: it has no rows to concatenate")
            if meta["dtype"] != ref["dtype"]:
                self._disagree(f"part {p} output '{name}' has dtype {meta['dtype']}, part 0 {ref['dtype']}")
            if shape[1:] != ref["shape"][1:]:
                self._disagree(f"part {p} output '{name}' has shape {shape}, part 0 {ref['shape']}")
            if self._rows is not None and shape[0] != self._rows[p]:
                self._disagree(f"part {p} output '{name}' has {shape[0]} rows for the part's {self._rows[p]} "
                               f"input rows: it has no leading batch dimension")

    def _disagree(self, what: str) -> None:
        raise Internal(f"split request {self.request_id!r}: {what}; the parts of a split request must agree "
                       f"on output names, dtypes and every dimension but the first")
