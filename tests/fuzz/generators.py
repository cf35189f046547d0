"""Generated messages for the live fuzzer (tests/fuzz/live.py), one generator per front door.

Each starts from a valid request for one of the fuzz server's models and mutates it: header fields
(hostile shapes and dtypes, huge ids and names, NaN and inf timeouts), frame counts, bytes
(truncated, flipped, spliced msgpack / protobuf / JSON), string tensors (bad counts, deep nesting).
A message the generator knows hits a reported bug carries its name in ``known``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from typing import Any, Callable

import grpc
import msgpack
import numpy as np

from sgserve import protocol
from sgserve.frontdoor import protos

PB = protos.load()
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,  # noqa: E402
                                     predict_pb2, regression_pb2)

# The models the fuzz server serves (tests/model_builders.py): hpt y = 0.5 x + 2 (the canary), tf2
# (ids int64 [-1], dense float32 [-1, 4]), keras (city string [-1, 1], num float32 [-1, 3]).
MODELS = ("hpt", "tf2", "keras")
HOSTILE_DIMS = [-1, -(2**31), 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1]
HOSTILE_TIMEOUTS = [math.nan, math.inf, -math.inf, 0, -1, 1e308, -1e308, 2**64 - 1, -(2**63), "100", True, None,
                    [1], 1e-300]
NATIVE_OK = {200, 400, 404, 429, 504}
HTTP_OK = {200, 400, 404, 405, 413, 414, 429, 431, 504}
GRPC_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED}
GRPC_UNDECODABLE = "gRPC: a request that is not valid protobuf is answered UNKNOWN"
HUGE_EMPTY = "a shape numpy cannot hold (> 64 dims, or 0 elements with a dimension >= 2^31) is answered 500"
REST_BIG_VERSION = "REST: a version in the URL past int64 is answered 500"
# Words of a 500 that tell which known bug answered it (the generator cannot always know: a random
# header may carry a hostile shape too).
KNOWN_BY_MESSAGE = {"maximum supported dimension": HUGE_EMPTY, "array is too big": HUGE_EMPTY,
                    "Maximum allowed dimension": HUGE_EMPTY, "Value out of range": REST_BIG_VERSION,
                    "Integer value out of range": REST_BIG_VERSION}
STRING_REPR = "string element neither bin nor str accepted as its repr"
# Mutations that decide a native request's answer before its tensors are read.
_DECIDED_FIRST = ("field-type", "field-model", "field-version", "field-signature", "timeout")


@dataclasses.dataclass
class Message:
    """One generated message: what to send, how it was made, and the bug it is known to hit."""

    door: str  # "zmq", "rest", "grpc"
    kind: str
    payload: Any  # frames (zmq), (method, path, body) (rest), (rpc, bytes) (grpc)
    known: str | None = None


# -- generation ------------------------------------------------------------------------------------

def valid_inputs(model: str, rng: random.Random) -> dict[str, np.ndarray]:
    n = rng.randint(1, 4)
    if model == "hpt":
        return {"x": np.arange(n, dtype=np.float32)}
    if model == "tf2":
        return {"ids": np.arange(n, dtype=np.int64) % 1000, "dense": np.ones((n, 4), np.float32)}
    city = np.empty((n, 1), dtype=object)
    city[:] = [[c] for c in rng.choices([b"paris", b"lima", b"zzz"], k=n)]
    return {"city": city, "num": np.ones((n, 3), np.float32)}


def unholdable(shape: Any) -> bool:
    """A shape numpy cannot reshape to although its element count passes the size check: more
    than 64 dimensions, or zero elements with a dimension past 2^31 (HUGE_EMPTY)."""
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        return False
    return len(shape) > 64 or math.prod(shape) == 0 and any(abs(d) >= 2**31 for d in shape)


def _deep(depth: int) -> Any:
    v: Any = b"x"
    for _ in range(depth):
        v = [v]
    return v


class NativeGen:
    """[MAGIC, header, payload...] messages for the broker's ROUTER (sent from a DEALER)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ops: list[Callable[[dict, list], str]] = [
            self._field, self._field, self._timeout, self._huge_id, self._shape, self._dtype, self._name,
            self._string_count, self._string_nested, self._frame_count, self._entries]

    def message(self, seq: int) -> Message:
        rng = self.rng
        model = rng.choice(MODELS)
        header: dict[str, Any] = {"type": "predict", "id": seq, "model": model, "timeout_ms": 5000}
        frames = protocol.pack(header, valid_inputs(model, rng))
        header = msgpack.unpackb(frames[1])
        payload = [bytes(f) for f in frames[2:]]
        r = rng.random()
        if r < 0.08:
            return Message("zmq", "valid", [protocol.MAGIC, msgpack.packb(header)] + payload)
        if r < 0.30:
            raw = msgpack.packb(header)
            kind, raw = corrupt_bytes(rng, raw)
            frames = [protocol.MAGIC, raw] + payload
            if rng.random() < 0.1:
                frames[0] = rng.choice([b"SGS2", b"", b"SGS", protocol.MAGIC + b"\0"])
            return Message("zmq", "header-" + kind, frames)
        known = None
        kinds = []
        for _ in range(rng.randint(1, 3)):
            op = rng.choice(self.ops)
            kinds.append(op(header, payload))
        metas = header.get("inputs")
        for meta in metas if isinstance(metas, list) else []:
            if isinstance(meta, dict) and unholdable(meta.get("shape")):
                known = HUGE_EMPTY
        if "string-nested" in kinds:
            known = known or STRING_REPR
        if any(k.startswith(_DECIDED_FIRST) for k in kinds) or type(header.get("id")) is not int \
                or header.get("id") != seq:
            known = None  # another fault answers first (200 for a ping, 404, 504), or the reply's id is not unique
        frames = [protocol.MAGIC, msgpack.packb(header, use_bin_type=True)] + payload
        if rng.random() < 0.03:
            frames.insert(0, b"")  # a REQ-style delimiter from a DEALER: the reply carries one too
        return Message("zmq", "+".join(kinds), frames, known)

    def _field(self, header: dict, payload: list) -> str:
        rng = self.rng
        key = rng.choice(["type", "model", "version", "version_label", "signature", "output_filter",
                          "routing_key", "inputs", "id", "deadline", "attempt"])
        header[key] = rng.choice([None, True, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, math.nan, "", "x" * 70_000,
                                  "\u00e9\ud7ff", b"\xff\xfe", [], [1, "a"], {"a": 1}, {1: 2}, "pin", "unpin",
                                  "status", "ping", "metadata", "metrics", "predict", "nope", ["score"], ["y", 3],
                                  "serving_default", "embed", "stable", 1, 2, 99])
        return "field-" + key

    def _timeout(self, header: dict, payload: list) -> str:
        header["timeout_ms"] = self.rng.choice(HOSTILE_TIMEOUTS)
        return "timeout"

    def _huge_id(self, header: dict, payload: list) -> str:
        header["id"] = self.rng.choice([2**64 - 1, -(2**63), b"\x00" * 1_000_000, "i" * 500_000, _deep(100),
                                        [list(range(1000))] * 50, {"k": "v" * 10_000}, math.nan])
        return "huge-id"

    def _entry(self, header: dict) -> dict | None:
        metas = header.get("inputs")
        if isinstance(metas, list) and metas and isinstance(metas[0], dict):
            return self.rng.choice(metas)
        return None

    def _shape(self, header: dict, payload: list) -> str:
        meta = self._entry(header)
        if meta is None:
            return "shape-none"
        rng = self.rng
        shape = meta.get("shape")
        shape = list(shape) if isinstance(shape, list) and shape else [1]
        choice = rng.randrange(6)
        if choice == 0:
            shape[rng.randrange(len(shape))] = rng.choice(HOSTILE_DIMS)
        elif choice == 1:
            shape = [2**32, 2**32, 2**32]  # product overflows 64 bits
        elif choice == 2:
            shape = [0] + [rng.choice(HOSTILE_DIMS)]
        elif choice == 3:
            shape = [1] * rng.choice([65, 255, 1000])
        elif choice == 4:
            shape = rng.choice([None, 3, "3", [1.5], [True], [[1]], [None], {}])
        else:
            shape = shape + [rng.randint(0, 3)]
        meta["shape"] = shape
        return "shape"

    def _dtype(self, header: dict, payload: list) -> str:
        meta = self._entry(header)
        if meta is not None:
            meta["dtype"] = self.rng.choice(["bfloat16", "complex64", "qint8", "float", "object", "", None, 7,
                                             "string", "float64", "int8", "bool", "FLOAT32", "float32\0"])
        return "dtype"

    def _name(self, header: dict, payload: list) -> str:
        meta = self._entry(header)
        if meta is not None:
            meta["name"] = self.rng.choice(["n" * 1_000_000, "", None, 3, b"x", "x\0y", "\u2603" * 1000])
        return "name"

    def _string_count(self, header: dict, payload: list) -> str:
        i = self._string_slot(header, payload)
        if i is None:
            return "string-count-none"
        n = self.rng.choice([0, 1, 3, 2**16, 2**32 - 1])
        head = b"\x90" if n == 0 else bytes([0x90 + n]) if n < 16 else (
            b"\xdc" + n.to_bytes(2, "big") if n < 2**16 else b"\xdd" + n.to_bytes(4, "big"))
        payload[i] = head + b"\xc4\x01a" * self.rng.randint(0, 3)
        return "string-count"

    def _string_nested(self, header: dict, payload: list) -> str:
        i = self._string_slot(header, payload)
        if i is None:
            return "string-nested-none"
        count = math.prod(header["inputs"][i]["shape"])
        depth = self.rng.choice([1, 10, 100, 500, 100_000])
        if depth == 100_000:  # past msgpack's own nesting limit: not even a valid array
            payload[i] = bytes([0x90 + 1]) * depth
            return "string-deep"
        items = [_deep(depth)] + [b"x"] * (count - 1) if count else []
        payload[i] = msgpack.packb(items, use_bin_type=True)
        return "string-nested" if count else "string-empty"

    def _string_slot(self, header: dict, payload: list) -> int | None:
        metas = header.get("inputs")
        if not isinstance(metas, list) or len(metas) != len(payload):
            return None
        for i, meta in enumerate(metas):
            if isinstance(meta, dict) and meta.get("dtype") == "string" and isinstance(meta.get("shape"), list) \
                    and all(type(d) is int and 0 <= d < 100 for d in meta["shape"]):
                return i
        return None

    def _frame_count(self, header: dict, payload: list) -> str:
        rng = self.rng
        n = rng.choice([0, 1, 2, 3, 5, 50])
        if rng.random() < 0.5 and payload:
            del payload[rng.randrange(len(payload)):]
        payload.extend(rng.randbytes(rng.randint(0, 16)) for _ in range(n))
        return "frames"

    def _entries(self, header: dict, payload: list) -> str:
        header["inputs"] = self.rng.choice([None, "x", 3, {}, [None], [[1]], [{}], [{"name": "x"}] * 3,
                                            [{"name": "x", "dtype": "float32", "shape": [1]}] * 2])
        return "entries"


def corrupt_bytes(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    """Truncated, bit-flipped, spliced or random bytes."""
    choice = rng.randrange(5)
    if choice == 0 and raw:
        return "truncated", raw[:rng.randrange(len(raw))]
    if choice == 1 and raw:
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= rng.randint(1, 255)
        return "flipped", bytes(b)
    if choice == 2 and raw:
        i = rng.randrange(len(raw))
        return "spliced", raw[:i] + rng.randbytes(rng.randint(1, 8)) + raw[i:]
    if choice == 3:
        return "random", rng.randbytes(rng.randint(0, 64))
    return "prefix", rng.choice([b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xc1", b"\x91" * 100_000,
                                 b"\xd9\x03\xff\xfe\xfd", b"\xc7\xff\x01"]) + raw


class RestGen:
    """(method, path, body) for TF Serving's REST API."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def message(self, seq: int) -> Message:
        rng = self.rng
        model = rng.choice(MODELS)
        path = f"/v1/models/{model}"
        r = rng.random()
        if r < 0.1:
            path = rng.choice([f"/v1/models/{'m' * 5000}", path + "/versions/99999999999999999999",
                               path + "/versions/9223372036854775807", path + "/labels/" + "l" * 3000,
                               "/v1/models/%00", "/v1/models/hpt/versions/-1", "/v1/models//versions/1",
                               "/v1/models/" + "%C3%A9" * 100, "/v1/models/%FF%FE"])
        verb = rng.choice([":predict"] * 6 + [":classify", ":regress", "/metadata", ""])
        body = self._body(model)
        kind = "valid"
        if rng.random() < 0.85:
            kind, body = self._mutate(body)
        method = "GET" if verb in ("/metadata", "") and rng.random() < 0.7 else rng.choice(["POST"] * 9 + ["PUT"])
        return Message("rest", f"{method}{verb}-{kind}", (method, path + verb, body))

    def _body(self, model: str) -> bytes:
        arrays = valid_inputs(model, self.rng)
        inst = {k: [x.decode() if isinstance(x, bytes) else x for x in v.reshape(len(v), -1).tolist()[0]]
                if v.dtype == object else v.tolist() for k, v in arrays.items()}
        if self.rng.random() < 0.5:
            return json.dumps({"inputs": inst}).encode()
        rows = [{k: v[i] for k, v in inst.items()} for i in range(len(next(iter(inst.values()))))]
        return json.dumps({"instances": rows}).encode()

    def _mutate(self, body: bytes) -> tuple[str, bytes]:
        rng = self.rng
        choice = rng.randrange(4)
        if choice == 0:
            kind, raw = corrupt_bytes(rng, body)
            return "json-" + kind, raw
        doc = json.loads(body)
        if choice == 1:
            doc[rng.choice(["instances", "inputs", "signature_name", "examples", "context"])] = rng.choice([
                None, 3, "x", [], {}, [[1, 2], [3]], [{"b64": "!!"}], [{"x": math.nan}], [[math.inf]],
                [2**70], {"x": [True]}, "s" * 100_000, [{"x": [1] * 1000}] * 100, {"b64": "AAAA"}])
            return "json-field", json.dumps(doc, allow_nan=True).encode()
        if choice == 2:
            return "json-deep", rng.choice([b"[" * 100_000, b'{"inputs": ' + b"[" * 900 + b"1" + b"]" * 900 + b"}",
                                            b'{"instances": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001])
        return "json-numbers", rng.choice([b'{"inputs": [NaN, Infinity, -Infinity]}', b'{"inputs": [1e999]}',
                                           b'{"inputs": [18446744073709551616]}', b'{"inputs": [-0.0, 1e-400]}',
                                           b'{"inputs": {"x": [1], "x": [2]}}', b'\xef\xbb\xbf{"inputs": [1]}'])


GRPC_METHODS = {
    "Predict": "/tensorflow.serving.PredictionService/Predict",
    "GetModelMetadata": "/tensorflow.serving.PredictionService/GetModelMetadata",
    "Classify": "/tensorflow.serving.PredictionService/Classify",
    "Regress": "/tensorflow.serving.PredictionService/Regress",
    "GetModelStatus": "/tensorflow.serving.ModelService/GetModelStatus",
}


class GrpcGen:
    """(rpc, serialized request) for TF Serving's gRPC services, sent as raw bytes."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def message(self, seq: int) -> Message:
        rng = self.rng
        model = rng.choice(MODELS)
        rpc = rng.choice(["Predict"] * 6 + ["GetModelMetadata", "Classify", "Regress", "GetModelStatus"])
        req = self._request(rpc, model)
        known = None
        kind = "valid"
        if rng.random() < 0.8 and rpc == "Predict":
            kind, known = self._mutate_predict(req)
        elif rng.random() < 0.5:
            self._mutate_spec(req.model_spec)
            kind = "spec"
        raw = req.SerializeToString()
        if rng.random() < 0.25:
            kind, raw = corrupt_bytes(rng, raw)
            kind, known = "proto-" + kind, GRPC_UNDECODABLE
        return Message("grpc", f"{rpc}-{kind}", (rpc, raw), known)

    def _request(self, rpc: str, model: str) -> Any:
        from sgserve.frontdoor import tensors

        if rpc == "Predict":
            req = predict_pb2.PredictRequest()
            for name, arr in valid_inputs(model, self.rng).items():
                req.inputs[name].CopyFrom(tensors.from_numpy(arr, typed_fields=self.rng.random() < 0.3))
        elif rpc == "GetModelMetadata":
            req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        elif rpc == "GetModelStatus":
            req = get_model_status_pb2.GetModelStatusRequest()
        else:
            cls = classification_pb2.ClassificationRequest if rpc == "Classify" else regression_pb2.RegressionRequest
            req = cls()
            req.input.example_list.examples.add()
        req.model_spec.name = model
        return req

    def _mutate_spec(self, spec: Any) -> None:
        rng = self.rng
        choice = rng.randrange(4)
        if choice == 0:
            spec.name = rng.choice(["", "n" * 100_000, "nope", "\u2603"])
        elif choice == 1:
            spec.version.value = rng.choice([2**63 - 1, -(2**63), -1, 0, 99])
        elif choice == 2:
            spec.version_label = rng.choice(["", "l" * 50_000, "stable"])
        else:
            spec.signature_name = rng.choice(["", "s" * 100_000, "embed", "nope"])

    def _mutate_predict(self, req: Any) -> tuple[str, str | None]:
        rng = self.rng
        if not req.inputs:
            return "empty", None
        name = rng.choice(sorted(req.inputs))
        t = req.inputs[name]
        choice = rng.randrange(7)
        known = None
        if choice == 0:
            t.dtype = rng.choice([0, 14, 17, 20, 21, 100, 2**31 - 1, -5, 8, 1, 7])
            kind = "dtype"
        elif choice == 1:
            dims = rng.choice([[-1], [2**40], [2**32, 2**32, 2**32], [0, 2**62], [1] * 300, [0, 2**40, 2**40],
                               [-(2**62)], [2**62, 2**62]])
            del t.tensor_shape.dim[:]
            t.tensor_shape.dim.extend([PB.tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])
            if unholdable(dims):
                known = HUGE_EMPTY
            kind = "shape"
        elif choice == 2:
            t.tensor_content = rng.randbytes(rng.randint(0, 40))
            kind = "content"
        elif choice == 3:
            t.string_val.extend([b"x" * rng.choice([0, 10, 100_000])] * rng.randint(1, 20))
            kind = "string-count"
        elif choice == 4:
            t.int64_val.extend([2**63 - 1, -(2**63)])
            t.float_val.extend([math.nan, math.inf])
            kind = "other-field"
        elif choice == 5:
            t.tensor_shape.unknown_rank = True
            kind = "unknown-rank"
        else:
            req.output_filter.extend(rng.choice([["nope"], [""], ["y", "y"], ["o" * 10_000]]))
            kind = "output-filter"
        if rng.random() < 0.2:
            req.inputs["extra" + str(rng.randint(0, 9))].dtype = 1
            kind += "+extra"
        return kind, known


