"""The sgserve wire protocol: ZeroMQ multipart, a versioned msgpack header, raw tensor frames.

Every message, in either direction, is::

    frame 0   MAGIC (b"SGS1": protocol name and version)
    frame 1   header: a msgpack map
    frame 2.. payload frames, one per tensor, in the order the header lists them

Numeric tensors travel as their raw little-endian, C-order bytes. String tensors travel as one
msgpack array of binary values (the tensor flattened in C order). No pickle anywhere.
docs/protocol.md is the normative description; this module is its one implementation, shared by
the client, the broker and the workers.

The broker <-> worker hop (internal, docs/protocol.md section 11) has no MAGIC: every message
starts with a command frame, one command byte followed by that command's fixed fields. A W_REQUEST
carries the client's header and payload frames exactly as the client sent them, so the broker never
re-encodes a request; the worker's W_REPLY carries the reply header and payload the broker forwards
untouched.

``send_frames`` and ``recv_frames`` are the one frame I/O helper of all three processes.
"""
from __future__ import annotations

import math
import os
import struct
from typing import Any, Sequence

import msgpack
import numpy as np
import zmq

from sgserve.errors import INVALID_ARGUMENT, OK, InvalidArgument, wire_error

MAGIC = b"SGS1"
PROTOCOL_VERSION = 1

# Request types (header["type"]).
PREDICT = "predict"
METADATA = "metadata"
STATUS = "status"
SHUTDOWN = "shutdown"
PING = "ping"
PIN = "pin"  # serve this version of a model (loading it if needed) until unpinned: a rollback
UNPIN = "unpin"  # back to the model's version policy
METRICS = "metrics"  # the broker's request counters and status, for Prometheus (the gateway renders them)
RELOAD_CONFIG = "reload_config"  # apply a ModelServerConfig (text format) now, as a reloaded config file
REQUEST_TYPES = (PREDICT, METADATA, STATUS, SHUTDOWN, PING, PIN, UNPIN, METRICS, RELOAD_CONFIG)

# Broker <-> worker commands: the first byte of the first frame of every backend message.
W_READY = b"\x01"  # worker -> broker: [cmd, {"index", "pid", "cores", "warmup"}]: booted, mapped, warmed
W_REQUEST = b"\x02"  # broker -> worker: [cmd + ROUTE fields, client header, client payload...]
W_REPLY = b"\x03"  # worker -> broker: [cmd + REPLY fields, reply header, payload...]
W_HEARTBEAT = b"\x04"  # both ways: [cmd]
W_STOP = b"\x05"  # broker -> worker: finish the current request, then exit 0
W_LOAD = b"\x06"  # broker -> worker: [cmd, ModelSpec as msgpack]: map, build and warm up a version
W_LOADED = b"\x07"  # worker -> broker: [cmd, {"model", "version", "ok", "error", "seconds"}]
W_UNLOAD = b"\x08"  # broker -> worker: [cmd, {"model", "version"}]: drop it (after what it holds)
W_UNLOADED = b"\x09"  # worker -> broker: [cmd, {"model", "version"}]

# The W_REQUEST command frame: command byte, request id (the broker's counter), the resolved
# version, the absolute deadline (Unix seconds; NaN = none) and the attempt (0, or 1 for a retry).
ROUTE = struct.Struct("<cQqdB")
# W_REPLY's command frame: command, the broker's request id, the reply's status code, and the rows of
# the batched model call the request ran in (0 without server-side batching, or when it did not run).
REPLY = struct.Struct("<cQHH")
_unpackb = msgpack.unpackb
NO_DEADLINE = math.nan

DEFAULT_SIGNATURE = "serving_default"

# dtype names on the wire -> numpy dtypes (little-endian).
DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
}
STRING = "string"
ALL_DTYPES = tuple(DTYPES) + (STRING,)
MAX_DIMS = 64  # numpy's NPY_MAXDIMS: no array has more dimensions
# The bytes numpy can address: an array's strides must fit in intp even when a zero dimension
# leaves it empty, so [0, 2**62] float32 is a shape numpy refuses (ValueError) though it holds nothing.
_MAX_SPAN = int(np.iinfo(np.intp).max)
# msgpack's names for what unpackb(raw=True) returns, for the error that refuses a string element.
_MSGPACK_TYPES = {list: "an array", dict: "a map", int: "an int", float: "a float", bool: "a bool", type(None): "nil",
                  msgpack.ExtType: "an ext", msgpack.Timestamp: "a timestamp"}


# numpy dtype -> wire name, for every byte order numpy may report (a dict lookup per tensor).
_WIRE_NAMES: dict[np.dtype, str] = {}
for _name, _dt in DTYPES.items():
    for _order in ("<", ">", "=", "|"):
        _WIRE_NAMES.setdefault(_dt.newbyteorder(_order), _name)


def dtype_name(arr: np.ndarray) -> str:
    """The wire name of an array's dtype; object/bytes/str arrays are strings."""
    name = _WIRE_NAMES.get(arr.dtype)
    if name is not None and (arr.dtype.byteorder != ">" or arr.dtype.itemsize == 1):
        return name
    if arr.dtype.kind in ("O", "S", "U"):
        return STRING
    if name is not None:  # big-endian: sent as its little-endian twin (encode_tensor converts)
        return name
    raise InvalidArgument(f"dtype {arr.dtype} is not supported on the wire (supported: {', '.join(ALL_DTYPES)})")


def _to_bytes(x: Any) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    if isinstance(x, np.bytes_):
        return bytes(x)
    return str(x).encode("utf-8")


def encode_tensor(name: str, arr: np.ndarray) -> tuple[dict[str, Any], Any]:
    """(meta, frame) for one tensor. The frame is the array itself (a zero-copy buffer) for numeric
    arrays in wire byte order, which pyzmq sends without another copy."""
    if type(arr) is not np.ndarray:
        arr = np.asarray(arr)
    dt = dtype_name(arr)
    meta = {"name": name, "dtype": dt, "shape": list(arr.shape)}
    if dt == STRING:
        return meta, msgpack.packb([_to_bytes(x) for x in arr.reshape(-1).tolist()], use_bin_type=True)
    want = DTYPES[dt]
    if arr.dtype != want or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=want)
    return meta, arr.data.cast("B") if arr.size else b""


def shape_fault(shape: Sequence[int], itemsize: int) -> str | None:
    """Why numpy cannot hold an array of this shape (a sequence of non-negative ints), or None.

    A tensor whose frame matches its shape fits by construction except for its dimension count; an
    empty one can claim any dimensions, and numpy refuses those whose strides overflow."""
    if len(shape) > MAX_DIMS:
        return f"shape has {len(shape)} dimensions, at most {MAX_DIMS}"
    if math.prod(filter(None, shape)) * itemsize > _MAX_SPAN:
        return (f"shape {list(shape)} is too large: its non-zero dimensions x {itemsize} bytes exceed "
                f"2^63 - 1, numpy's limit even for an empty tensor")
    return None


def check_tensors(metas: Any, payload: Sequence[Any], what: str = "inputs") -> None:
    """Checks a header's tensor list against its payload frames without decoding them: entries well
    formed, names unique, one frame each, frame sizes matching dtype x shape, shapes numpy can hold.
    The broker runs this alone (it refuses what no worker could read); decode_tensors runs it
    before decoding."""
    if metas is None:
        metas = []
    if not isinstance(metas, list):
        raise InvalidArgument(f"'{what}' must be a list of tensor entries")
    if len(metas) != len(payload):
        raise InvalidArgument(f"header lists {len(metas)} {what} but the message carries "
                              f"{len(payload)} payload frames")
    seen: set[str] = set()
    for meta, frame in zip(metas, payload):
        if not isinstance(meta, dict):
            raise InvalidArgument("tensor entry must be a map with name, dtype and shape")
        name, dt, shape = meta.get("name"), meta.get("dtype"), meta.get("shape")
        if not isinstance(name, str):
            raise InvalidArgument("tensor entry has no string 'name'")
        if name in seen:
            raise InvalidArgument(f"{what[:-1]} '{name}' is given twice")
        seen.add(name)
        if dt not in ALL_DTYPES:
            raise InvalidArgument(f"tensor '{name}': unknown dtype {dt!r} (supported: {', '.join(ALL_DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise InvalidArgument(f"tensor '{name}': shape must be a list of non-negative integers, got {shape!r}")
        count = math.prod(shape)
        if len(shape) > MAX_DIMS or not count:  # else the size check below bounds every dimension
            fault = shape_fault(shape, 8 if dt == STRING else DTYPES[dt].itemsize)
            if fault is not None:
                raise InvalidArgument(f"tensor '{name}': {fault}")
        size = len(frame)
        if dt == STRING:
            items = _msgpack_array_len(frame) if size else 0
            if items != count:
                raise InvalidArgument(f"tensor '{name}': string payload has "
                                      f"{'no array of' if items is None else items} elements, "
                                      f"shape {shape} needs {count}")
        elif size != count * DTYPES[dt].itemsize:
            raise InvalidArgument(f"tensor '{name}': payload is {size} bytes, {dt}{shape} needs "
                                  f"{count * DTYPES[dt].itemsize}")


def _msgpack_array_len(frame: Any) -> int | None:
    """The element count in a msgpack array header, or None when the frame is not an array."""
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    first = buf[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC and len(buf) >= 3:
        return int.from_bytes(buf[1:3], "big")
    if first == 0xDD and len(buf) >= 5:
        return int.from_bytes(buf[1:5], "big")
    return None


def _decode_checked(meta: dict[str, Any], frame: Any, what: str = "input") -> np.ndarray:
    """The array of a (meta, frame) pair that check_tensors accepted."""
    shape = meta["shape"]
    buf = frame.buffer if hasattr(frame, "buffer") else frame
    if meta["dtype"] != STRING:
        return np.frombuffer(buf, dtype=DTYPES[meta["dtype"]]).reshape(shape)
    try:
        items = msgpack.unpackb(bytes(buf), raw=True) if len(buf) else []
    except Exception as exc:  # noqa: BLE001 - a valid array header over a broken body
        raise InvalidArgument(f"tensor '{meta['name']}': string payload is not a msgpack array ({exc})") from None
    for i, item in enumerate(items):
        if type(item) is not bytes:  # raw=True: bin and str elements both arrive as bytes
            kind = _MSGPACK_TYPES.get(type(item), type(item).__name__)
            raise InvalidArgument(f"string element {i} of {what} '{meta['name']}' is {kind}, expected bin or str")
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


def pack(header: dict[str, Any], tensors: dict[str, np.ndarray] | None = None,
         key: str = "inputs") -> list[Any]:
    """MAGIC, header and payload frames for a message carrying ``tensors`` under ``header[key]``."""
    frames: list[Any] = []
    if tensors:
        metas = []
        for name, arr in tensors.items():
            meta, frame = encode_tensor(name, arr)
            metas.append(meta)
            frames.append(frame)
        header = dict(header)
        header[key] = metas
    return [MAGIC, msgpack.packb(header, use_bin_type=True)] + frames


def frame_bytes(frame: Any) -> bytes:
    """The bytes of a received zmq.Frame, or of any buffer."""
    return frame.bytes if type(frame) is zmq.Frame else bytes(frame)


def unpack_header(frames: Sequence[Any]) -> tuple[dict[str, Any], list[Any]]:
    """(header, payload frames) of a message that starts at MAGIC; raises InvalidArgument."""
    if len(frames) < 2:
        raise InvalidArgument(f"message has {len(frames)} frame(s); expected MAGIC, header, payload...")
    magic = frame_bytes(frames[0])
    if magic != MAGIC:
        raise InvalidArgument(f"first frame must be {MAGIC!r} (protocol version {PROTOCOL_VERSION}), got {magic[:16]!r}")
    return decode_header(frames[1]), list(frames[2:])


def decode_header(frame: Any) -> dict[str, Any]:
    """The msgpack map of a header frame; InvalidArgument (400) saying why it cannot be decoded.

    The broker decodes the client's header here, and the worker decodes the same frame again here
    (it gets the frame, not the broker's dict), so both refuse a bad header in the same words."""
    try:
        header = _unpackb(frame_bytes(frame), raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgument(f"header frame is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise InvalidArgument("header frame must be a msgpack map")
    return header


def decode_tensors(metas: Any, payload: Sequence[Any], what: str = "inputs") -> dict[str, np.ndarray]:
    """Name -> array for the header list ``metas`` and its payload frames; InvalidArgument if bad.

    Numeric tensors take a fast path that checks exactly what check_tensors checks; anything it does
    not take (a string tensor, or any fault) goes through check_tensors, so the error is the same."""
    out = _decode_numeric(metas, payload)
    if out is not None:
        return out
    check_tensors(metas, payload, what)
    return {meta["name"]: _decode_checked(meta, frame, what[:-1]) for meta, frame in zip(metas or [], payload)}


def element_count(shape: list[Any]) -> int | None:
    """product(shape) of a well-formed wire shape (non-negative ints); None for anything else."""
    count = 1
    for d in shape:
        if type(d) is not int or d < 0:
            return None
        count *= d
    return count


def _decode_numeric(metas: Any, payload: Sequence[Any]) -> dict[str, np.ndarray] | None:
    """The arrays of a well-formed all-numeric tensor list, or None for anything else."""
    if type(metas) is not list or len(metas) != len(payload):
        return None
    out: dict[str, np.ndarray] = {}
    for meta, frame in zip(metas, payload):
        if type(meta) is not dict:
            return None
        dt = DTYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
        name, shape = meta.get("name"), meta.get("shape")
        if dt is None or type(name) is not str or name in out or type(shape) is not list:
            return None
        count = element_count(shape)
        if count is None:
            return None
        buf = frame.buffer if type(frame) is zmq.Frame else frame
        if len(buf) != count * dt.itemsize:
            return None
        try:  # free unless raised (Python 3.11), unlike a shape_fault call per tensor (+40 ns)
            out[name] = np.frombuffer(buf, dtype=dt).reshape(shape)
        except ValueError:  # a shape numpy cannot hold: check_tensors words why
            return None
    return out


def error_reply(request_id: Any, code: int, message: str, **extra: Any) -> list[Any]:
    """MAGIC and the header of an error reply (no payload); ``extra``: the worker's model, version, worker."""
    header = {"id": request_id, "code": code, "message": message}
    header.update(extra)
    return [MAGIC, msgpack.packb(header, use_bin_type=True)]


def exception_reply(request_id: Any, exc: BaseException, context: str = "", **extra: Any) -> list[Any]:
    """The error reply to a request that raised ``exc``: errors.wire_error's code and message."""
    code, message = wire_error(exc, context)
    return error_reply(request_id, code, message, **extra)


def ok_header(request_id: Any, **extra: Any) -> dict[str, Any]:
    header = {"id": request_id, "code": OK, "message": ""}
    header.update(extra)
    return header


class Envelope:
    """The routing frames a ROUTER socket put in front of a client's message.

    ``delimiter`` is True when the client is a REQ socket (it sent an empty frame before MAGIC),
    so the reply must carry the empty frame too. ``prefix`` is what goes in front of every reply.
    """

    __slots__ = ("identity", "delimiter", "prefix")

    def __init__(self, identity: list[bytes], delimiter: bool) -> None:
        self.identity = identity
        self.delimiter = delimiter
        self.prefix = [*identity, b""] if delimiter else list(identity)

    def wrap(self, frames: list[Any]) -> list[Any]:
        return self.prefix + frames


def split_envelope(frames: Sequence[Any]) -> tuple[Envelope, list[Any]]:
    """Splits a frontend ROUTER message into (envelope, message from MAGIC on).

    The identity is the first frame. An empty frame after it marks a REQ client. Anything else is
    left for unpack_header to judge, so that garbage still gets an answer when it can be addressed.
    """
    ident = [frame_bytes(frames[0])]
    if len(frames) > 1 and len(frames[1]) == 0:
        return Envelope(ident, True), list(frames[2:])
    return Envelope(ident, False), list(frames[1:])


# -- frame I/O: one helper for the client, the broker and the workers ------------------------------
_SNDMORE = int(zmq.SNDMORE)
# pyzmq's Cython send, under the Python-level Socket.send (which only adds DRAFT routing_id/group
# handling): calling it directly saves about 1 us per frame, 3-4 us per message (measured).
_send = zmq.backend.Socket.send


def send_frames(sock: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """send_multipart(copy=False) without pyzmq's per-call type checks and enum flag arithmetic,
    which cost more than the send itself at this message size. Frames may be bytes, buffers or
    received zmq.Frames (forwarded without a copy); pyzmq copies small ones, which is cheaper.
    ``flags``: zmq.NOBLOCK raises zmq.Again on the first frame when the queue is full (the others
    then go too: ZeroMQ queues a multipart message whole)."""
    send = _send
    last = len(frames) - 1
    for i in range(last):
        send(sock, frames[i], _SNDMORE | flags, False)
    send(sock, frames[last], flags, False)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """recv_multipart(copy=False), reading the more-flag from each frame instead of getsockopt."""
    recv = sock.recv
    frame = recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = recv(flags, copy=False)
        frames.append(frame)
    return frames


def route_frame(rid: int, version: int, deadline: float | None, attempt: int) -> bytes:
    """The W_REQUEST command frame (see ROUTE)."""
    return ROUTE.pack(W_REQUEST, rid, version, NO_DEADLINE if deadline is None else deadline, attempt)


def parse_route(frame: bytes) -> tuple[int, int, float | None, int]:
    """(request id, version, deadline or None, attempt) of a W_REQUEST command frame."""
    _, rid, version, deadline, attempt = ROUTE.unpack(frame)
    return rid, version, (None if deadline != deadline else deadline), attempt


def reply_frame(rid: int, code: int, batch: int = 0) -> bytes:
    """The W_REPLY command frame for request ``rid``: the reply's status code and its batch's rows
    ride outside the header, so the broker counts them without decoding it."""
    return REPLY.pack(W_REPLY, rid, code, min(batch, 0xFFFF))


def parse_reply(frame: bytes) -> tuple[int, int, int]:
    """(request id, status code, batch size) of a W_REPLY command frame."""
    _, rid, code, batch = REPLY.unpack(frame)
    return rid, code, batch


# How a gateway (sgserve/frontdoor) is told apart from a native client on the broker's frontend: the
# broker makes a random token at start and hands it to its gateways in their environment; a DEALER
# whose routing id is GATEWAY_ID_TAG + token + pid may name each request's gRPC/REST connection in the
# header's CONNECTION_KEY, which the broker's fair queue then counts as its own client.
GATEWAY_TOKEN_ENV = "SGSERVE_GATEWAY_TOKEN"
GATEWAY_ID_TAG = b"gw"  # first bytes of a gateway's routing id: not zero, which ZeroMQ reserves
CONNECTION_KEY = "connection"


def gateway_routing_id(token_hex: str, pid: int) -> bytes:
    """A gateway process's routing id: the trusted prefix, then its pid (unique among gateways,
    and a restarted gateway never collides with the identity its predecessor left behind)."""
    return GATEWAY_ID_TAG + bytes.fromhex(token_hex) + pid.to_bytes(4, "big")


def default_endpoint() -> str:
    return os.environ.get("SGSERVE_ENDPOINT", "tcp://127.0.0.1:8510")


__all__ = [
    "MAGIC", "PROTOCOL_VERSION", "PREDICT", "METADATA", "STATUS", "SHUTDOWN", "PING", "W_READY",
    "W_REQUEST", "W_REPLY", "W_HEARTBEAT", "W_STOP", "DTYPES", "STRING", "ALL_DTYPES", "pack",
    "unpack_header", "decode_header", "decode_tensors", "check_tensors", "encode_tensor", "error_reply",
    "exception_reply", "ok_header",
    "Envelope", "split_envelope", "INVALID_ARGUMENT", "send_frames", "recv_frames", "ROUTE", "route_frame",
    "parse_route", "reply_frame", "parse_reply", "REPLY", "GATEWAY_TOKEN_ENV", "GATEWAY_ID_TAG",
    "CONNECTION_KEY", "gateway_routing_id", "MAX_DIMS", "shape_fault",
]
