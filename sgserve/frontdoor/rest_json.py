"""TF Serving's REST JSON for predict (row and columnar forms), and its error bodies.

Rules and error wording are TF Serving's (tensorflow_serving/util/json_tensor.cc), so that clients'
requests, and the messages their people know, carry over. Where this differs: an int out of a
narrow dtype's range (300 for int8) is refused where TF Serving wraps it; float16 and uint16 work
(TF Serving: unimplemented); a float32 output is written as its shortest round-trip repr (0.1,
0.33333334) where TF Serving writes 6 digits or, when those do not round-trip, 9 (0.333333343): the
same float32. NaN and +-Infinity go out as TF Serving writes them, bare NaN / Infinity / -Infinity
tokens (not strict JSON; Python's json reads them, and so does read_json). A string output is text,
or {"b64": ...} objects when its name ends in "_bytes" (TF Serving's rule) or when an element is
not UTF-8 (TF Serving would write invalid JSON; here the whole tensor switches, one type a tensor).

Speed: orjson parses the body and each input becomes an array in one np.array call; the exact
element walk that words TF Serving's errors runs only where that call cannot vouch for the types
(strings, a true/false token in the body, a ragged list). Classify and regress: examples.py.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import numpy as np
import orjson

from sgserve import protocol
from sgserve.errors import InvalidArgument

ROW = "row"
COLUMNAR = "columnar"
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_MISSING = object()
_TF_TYPE_NAMES = {"float16": "half", "float32": "float", "float64": "double"}  # DataTypeString
_DEBUG_LIMIT = 256  # TF Serving's kMaxJsonDebugStringBytes
Signature = Mapping[str, Any]
SignatureSource = Union[Signature, Callable[[Union[str, None]], Signature]]


@dataclass(frozen=True)
class JsonRequest:
    """A parsed request body: read it first to learn its signature_name, fetch that signature,
    then convert (parse_predict / parse_examples accept this in place of the bytes)."""

    doc: dict[str, Any]
    signature_name: str | None
    plain_numbers: bool  # no true/false token anywhere: np.array may convert numbers unchecked


def error_body(message: str) -> bytes:
    """TF Serving's error body: ``{"error": "..."}``."""
    return orjson.dumps({"error": message})


def read_json(body: bytes | JsonRequest) -> JsonRequest:
    """The request's top-level object (NaN and +-Infinity accepted, as TF Serving accepts them)."""
    if isinstance(body, JsonRequest):
        return body
    if not body:
        raise InvalidArgument("JSON Parse error: The document is empty")
    raw = body.encode() if isinstance(body, str) else bytes(body)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = _parse_lenient(raw)
    if not isinstance(doc, dict):
        raise format_error(doc, "Is not object")
    name = doc.get("signature_name")
    if "signature_name" in doc and not isinstance(name, str):
        raise format_error(doc, "not formatted correctly. 'signature_name' key must be a string value.")
    return JsonRequest(doc, name, b"true" not in raw and b"false" not in raw)


def _parse_lenient(raw: bytes) -> Any:
    """The stdlib parser, which also reads NaN, Infinity and -Infinity (orjson refuses them)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"JSON Parse error: Invalid encoding in string. at offset: {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"JSON Parse error: {exc.msg} at offset: {exc.pos}") from None
    except RecursionError:
        raise InvalidArgument("JSON Parse error: the document is nested too deeply") from None


def parse_predict(body: bytes | JsonRequest, signature: SignatureSource
                  ) -> tuple[dict[str, np.ndarray], str, str | None]:
    """(inputs, ROW or COLUMNAR, signature_name or None) of a ``:predict`` body.

    ``signature`` is sgserve's signature metadata (``{"inputs": {name: {"dtype", "shape"}}, ...}``),
    or a callable that returns it for the body's signature_name (None: the default).
    """
    req = read_json(body)
    doc = req.doc
    sig = signature(req.signature_name) if callable(signature) else signature
    dtypes = {name: _input_dtype(name, meta) for name, meta in sorted((sig.get("inputs") or {}).items())}
    if not dtypes:
        raise InvalidArgument(f"Failed to get input map for signature: {req.signature_name or 'DEFAULT'}")
    instances, columns = doc.get("instances", _MISSING), doc.get("inputs", _MISSING)
    if instances is not _MISSING:
        if columns is not _MISSING:
            raise format_error(doc, "Not formatted correctly expecting only one of 'inputs' or "
                                     "'instances' keys to exist ")
        if not isinstance(instances, list):
            raise format_error(doc, "Expecting 'instances' to be an list/array")
        if not instances:
            raise format_error(doc, "No values in 'instances' array")
        return _from_rows(instances, dtypes, req.plain_numbers), ROW, req.signature_name
    if columns is not _MISSING:
        return _from_columns(columns, dtypes, req.plain_numbers), COLUMNAR, req.signature_name
    raise InvalidArgument("Missing 'inputs' or 'instances' key")


def _input_dtype(name: str, meta: Mapping[str, Any]) -> str:
    dtype = meta.get("dtype")
    if dtype not in protocol.ALL_DTYPES:
        raise InvalidArgument(f"input '{name}' has dtype {dtype}, which JSON requests cannot carry "
                              f"(supported: {', '.join(protocol.ALL_DTYPES)})")
    return dtype


def _from_columns(value: Any, dtypes: dict[str, str], plain: bool) -> dict[str, np.ndarray]:
    """The ``inputs`` form: one value for a one-input signature, else an object of named values."""
    if not isinstance(value, dict) or is_b64(value):
        if len(dtypes) > 1:
            raise InvalidArgument("inputs is a plain value/list, but expecting an object as multiple "
                                  "input tensors required as per tensorinfo_map")
        name, dtype = next(iter(dtypes.items()))
        return {name: _to_array(value, name, dtype, plain)}
    out = {}
    for name, dtype in dtypes.items():
        if name not in value:
            raise InvalidArgument(f"Missing named input: {name} in 'inputs' object.")
        out[name] = _to_array(value[name], name, dtype, plain)
    return out


def _from_rows(rows: list[Any], dtypes: dict[str, str], plain: bool) -> dict[str, np.ndarray]:
    """The ``instances`` form: a list of rows, each an object of named values or (one-input
    signature) a bare value; each input's rows all have the same shape."""
    if not isinstance(rows[0], dict) and len(dtypes) > 1:
        raise InvalidArgument("instances is a plain list, but expecting list of objects as multiple "
                              "input tensors required as per tensorinfo_map")
    if _is_object(rows[0]):
        if all(_is_object(r) and r.keys() == dtypes.keys() for r in rows):
            try:
                return {n: _column([r[n] for r in rows], n, d, plain) for n, d in dtypes.items()}
            except InvalidArgument:
                pass  # the walk below finds the error TF Serving reports first, and words it
        return _named_rows_exact(rows, dtypes)
    name, dtype = next(iter(dtypes.items()))
    if not any(_is_object(r) for r in rows):
        arr = _fast_array(rows, dtype, plain)
        if arr is not None:
            return {name: arr}
    stack = _RowStack(name, dtype)
    for i, row in enumerate(rows):
        if _is_object(row):
            raise InvalidArgument(f"Expecting value/list but got object at item {i} of input list")
        stack.add(row, f"Failed to process element: {i} of 'instances' list. Error: ")
    return {name: stack.array()}


def _column(items: list[Any], name: str, dtype: str, plain: bool) -> np.ndarray:
    """One input's rows as one array: in one np.array call, or row by row where it cannot vouch."""
    arr = _fast_array(items, dtype, plain)
    if arr is None:
        stack = _RowStack(name, dtype)
        for item in items:
            stack.add(item, "")
        arr = stack.array()
    return arr


def _named_rows_exact(rows: list[Any], dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    """Row objects walked as TF Serving walks them (row by row, key by key), for its messages."""
    stacks = {name: _RowStack(name, dtype) for name, dtype in dtypes.items()}
    for i, row in enumerate(rows):
        if not _is_object(row):
            raise InvalidArgument(f"Expecting object but got list at item {i} of input list")
        for key, value in row.items():
            prefix = f"Failed to process element: {i} key: {key} of 'instances' list. Error: "
            if key not in stacks:
                raise InvalidArgument(f"{prefix}INVALID_ARGUMENT: JSON object: does not have named input: {key}")
            stacks[key].add(value, prefix)
        if row.keys() != stacks.keys():
            raise InvalidArgument(f"Failed to process element: {i} of 'instances' list. JSON object: "
                                  f"{debug_string(row)} keys must be equal to: {','.join(stacks)}")
    return {name: stack.array() for name, stack in stacks.items()}


class _RowStack:
    """One input's rows, checked one by one (shape and size equal to the first row's)."""

    def __init__(self, name: str, dtype: str) -> None:
        self.name = name
        self.dtype = dtype
        self.values: list[Any] = []
        self.shape: tuple[int, ...] | None = None
        self.size = 0
        self.rows = 0

    def add(self, value: Any, prefix: str) -> None:
        try:
            values, shape = _exact(value, self.dtype, self.name, batch=True)
            if self.shape is None:
                self.shape, self.size = shape, len(values)
            elif len(values) != self.size:
                raise InvalidArgument(f"Expecting tensor size: {self.size} but got: {len(values)}")
            elif shape != self.shape:
                raise InvalidArgument(f"Expecting shape {dims(self.shape)} but got: {dims(shape)}")
        except InvalidArgument as exc:
            raise InvalidArgument(f"{prefix}INVALID_ARGUMENT: {exc.message}") from None
        self.values.extend(values)
        self.rows += 1

    def array(self) -> np.ndarray:
        return _array(self.values, self.dtype, (self.rows,) + (self.shape or ()))


def _to_array(value: Any, name: str, dtype: str, plain: bool) -> np.ndarray:
    arr = _fast_array(value, dtype, plain)
    if arr is not None:
        return arr
    values, shape = _exact(value, dtype, name)
    return _array(values, dtype, shape)


def _fast_array(value: Any, dtype: str, plain: bool) -> np.ndarray | None:
    """The array in one np.array call, or None where that cannot vouch for every element's type
    (numpy reads true as 1): then _exact decides, and words the error. Strings: a flat list of text."""
    if dtype == protocol.STRING:
        if isinstance(value, list) and all(type(v) is str for v in value):
            return _array([v.encode("utf-8") for v in value], dtype, (len(value),))
        return None
    if not plain and dtype != "bool":
        return None
    try:
        arr = np.array(value)
    except (ValueError, TypeError, OverflowError):  # ragged, or ints past 64 bits
        return None
    want = protocol.DTYPES[dtype]
    kind = arr.dtype.kind
    if kind == "b" or dtype == "bool":
        return arr if kind == "b" and dtype == "bool" else None
    if kind == "f" and want.kind == "f" or kind in "iu" and want.kind == "f":
        with np.errstate(over="ignore"):
            return arr.astype(want)  # past float32's range: +-inf, as TF Serving
    if kind in "iu" and want.kind in "iu":
        info = np.iinfo(want)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            return None
        return arr.astype(want)
    return None


def _exact(value: Any, dtype: str, name: str, batch: bool = False) -> tuple[list[Any], tuple[int, ...]]:
    """(flat values, shape) of a JSON value, checked as TF Serving's FillTensorProto checks it:
    the shape is read down the first elements, then every list and leaf must agree with it.
    ``batch``: the value is one row of ``instances``, whose list adds the first dimension.

    The depth is checked before the walk: numpy holds at most 64 dimensions (TensorFlow 254), and
    the walk recurses once per level."""
    shape = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    rank = len(shape) + batch
    if rank > protocol.MAX_DIMS:
        raise InvalidArgument(f"input '{name}' has {rank} dimensions{' with the batch dimension' if batch else ''}"
                              f", at most {protocol.MAX_DIMS}")
    out: list[Any] = []
    _fill(value, 0, shape, dtype, out)
    return out, tuple(shape)


def _fill(value: Any, level: int, shape: list[int], dtype: str, out: list[Any]) -> None:
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise InvalidArgument(f"JSON Value: {debug_string(value)} found at incorrect level: {level + 1} "
                                  f"in the JSON DOM. Expected at level: {rank}")
        out.append(_leaf(value, dtype))
        return
    if level >= rank:
        raise InvalidArgument(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise InvalidArgument(f"Encountered list at unexpected size: {len(value)} at level: {level} "
                              f"expected size: {shape[level]}")
    for item in value:
        _fill(item, level + 1, shape, dtype, out)


def _leaf(value: Any, dtype: str) -> Any:
    """One element as TF Serving's AddValueToTensor takes it: any number for a float, an int in
    range for an int, true/false for a bool, a string or {"b64": ...} for a string."""
    if dtype == protocol.STRING:
        if isinstance(value, str):
            return value.encode("utf-8")
        if isinstance(value, dict):
            return decode_b64(value)
    elif isinstance(value, bool) or dtype == "bool":
        if isinstance(value, bool) and dtype == "bool":
            return value
    elif isinstance(value, float):
        if dtype.startswith("float"):
            return value
    elif isinstance(value, int):
        if dtype.startswith("float"):
            try:
                return float(value)
            except OverflowError:
                return float("inf") if value > 0 else float("-inf")
        info = np.iinfo(protocol.DTYPES[dtype])
        if info.min <= value <= info.max:
            return value
    raise InvalidArgument(f"JSON Value: {debug_string(value)} Type: {json_type(value)} is not of "
                          f"expected type: {_TF_TYPE_NAMES.get(dtype, dtype)}")


def _array(values: list[Any], dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == protocol.STRING:
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        return arr.reshape(shape)
    with np.errstate(over="ignore"):
        return np.array(values, dtype=protocol.DTYPES[dtype]).reshape(shape)


def decode_b64(value: Any) -> bytes:
    """The bytes of a ``{"b64": "..."}`` object (standard alphabet, padding optional)."""
    if not is_b64(value):
        raise InvalidArgument(f"JSON Value: {debug_string(value)} not formatted correctly for base64 data")
    text = value["b64"]
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("Unable to base64 decode") from None


def is_b64(value: Any) -> bool:
    """A {"b64": "..."} object: one key, a string (TF Serving's IsValBase64Object)."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _is_object(value: Any) -> bool:
    """An object that names inputs (a {"b64": ...} object is a value)."""
    return isinstance(value, dict) and not is_b64(value)


def dims(shape: tuple[int, ...]) -> str:
    """A shape as TF Serving writes it in messages: [2,3]."""
    return "[" + ",".join(str(d) for d in shape) + "]"


def json_type(value: Any) -> str:
    """TF Serving's name for a JSON value's type."""
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return "Number"
    return {str: "String", list: "Array", dict: "Object"}.get(type(value), type(value).__name__)


def debug_string(value: Any) -> str:
    """A JSON value as TF Serving quotes it in messages (one line, cut at 256 characters)."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)[:_DEBUG_LIMIT]


def format_error(value: Any, message: str) -> InvalidArgument:
    """TF Serving's FormatError: the offending JSON value, then what is wrong with it."""
    return InvalidArgument(f"JSON Value: {debug_string(value)} {message}")


# -- responses ---------------------------------------------------------------------------------

def format_predict(outputs: Mapping[str, np.ndarray], fmt: str) -> bytes:
    """The ``:predict`` response: ``{"predictions": ...}`` (ROW) or ``{"outputs": ...}`` (COLUMNAR).

    One output is written bare (the list of its rows / its value), several as objects by name.
    """
    if not outputs:
        raise InvalidArgument("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if fmt == COLUMNAR:
        if len(names) == 1:
            return orjson.dumps({"outputs": _jsonable(names[0], outputs[names[0]], False)}, option=_NUMPY)
        return orjson.dumps({"outputs": {n: _jsonable(n, outputs[n], False) for n in names}}, option=_NUMPY)
    if fmt != ROW:
        raise InvalidArgument("Invalid request format")
    batch = -1
    for name in names:
        shape = np.shape(outputs[name])
        if not shape:
            raise InvalidArgument(f"Tensor name: {name} has no shape information ")
        if batch >= 0 and shape[0] != batch:
            raise InvalidArgument(f"Tensor name: {name} has inconsistent batch size: {shape[0]} expecting: {batch}")
        batch = shape[0]
    if len(names) == 1:
        return orjson.dumps({"predictions": _jsonable(names[0], outputs[names[0]], True)}, option=_NUMPY)
    columns = [(n, _jsonable(n, outputs[n], True)) for n in names]
    return orjson.dumps({"predictions": [{n: col[i] for n, col in columns} for i in range(batch)]},
                        option=_NUMPY)


def _jsonable(name: str, arr: Any, rows: bool) -> Any:
    """What orjson writes for one output; with ``rows``, indexable by row (``x[i]`` is row i)."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "OSU":
        return _string_values(name, arr)
    protocol.dtype_name(arr)  # InvalidArgument for a dtype the wire cannot carry
    if not (arr.dtype.isnative and arr.flags.c_contiguous):
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    # One reduction decides: NaN and +-inf make the sum non-finite (so may an overflowing sum of
    # finite values, which then takes the exact path below, still correct).
    if arr.ndim and (arr.dtype.kind != "f" or math.isfinite(arr.sum())):
        return arr  # orjson writes it natively, each float32 as its shortest repr
    if rows:
        return [orjson.Fragment(_numeric_json(arr[i])) for i in range(arr.shape[0])]
    return orjson.Fragment(_numeric_json(arr))


def _numeric_json(arr: np.ndarray) -> bytes:
    """A numeric array (or 0-d) as JSON, with NaN/Infinity/-Infinity tokens where orjson writes
    null: in a numeric array's JSON, each null is the next non-finite element in C order."""
    data = orjson.dumps(np.ascontiguousarray(arr).reshape(-1) if arr.ndim == 0 else arr, option=_NUMPY)
    if arr.ndim == 0:
        data = data[1:-1]
    if arr.dtype.kind != "f" or b"null" not in data:
        return data
    bad = arr.reshape(-1)[~np.isfinite(arr.reshape(-1))]
    tokens = [b"NaN" if v != v else b"Infinity" if v > 0 else b"-Infinity" for v in bad.tolist()]
    parts = data.split(b"null")
    return b"".join(p + t for p, t in zip(parts, tokens)) + parts[-1]


def _string_values(name: str, arr: np.ndarray) -> Any:
    """A string output as nested lists of text, or of {"b64": ...} (``_bytes`` names, non-UTF-8)."""
    flat = [x if isinstance(x, bytes) else str(x).encode("utf-8") for x in arr.reshape(-1).tolist()]
    items: list[Any] = []
    if not name.endswith("_bytes"):
        try:
            items = [x.decode("utf-8") for x in flat]
        except UnicodeDecodeError:
            items = []
    if len(items) != len(flat) or name.endswith("_bytes"):
        items = [{"b64": base64.b64encode(x).decode("ascii")} for x in flat]
    nested = np.empty(len(items), dtype=object)
    nested[:] = items
    return nested.reshape(arr.shape).tolist()

