"""TensorProto <-> numpy, with TensorFlow's semantics, without TensorFlow.

``to_numpy`` reads what stock clients send: ``tensor_content`` (what ``tf.make_tensor_proto``
writes for a numeric array of more than one element; read with one ``np.frombuffer``) or the typed
``*_val`` field of the dtype (what it writes for a scalar, a one-element array, a bool or a string
tensor, and what hand-written clients in other languages often fill). The typed fields follow
TensorFlow's ``Tensor::FromProto`` (what TF Serving runs) and ``tf.make_ndarray``: fewer values than
the shape holds are padded with the last one (so one value is broadcast, "splat"), none at all is
zeros. Where TensorFlow is silent or lenient about a malformed tensor, this refuses it with a
message that names the tensor: more values than the shape holds (TF Serving truncates), a value out
of its dtype's range (TensorFlow wraps it), values in a field of another dtype with the right one
empty (TensorFlow reads zeros), ``tensor_content`` for a string tensor.

``from_numpy`` writes ``tensor_content`` (fast, and what ``tf.make_tensor_proto`` writes for
numeric arrays of more than one element) or, with ``typed_fields=True``, the typed fields as TF
Serving's default (``AsProtoField``) does, for clients that read ``float_val`` directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sgserve import protocol
from sgserve.errors import InvalidArgument
from sgserve.frontdoor import protos

_PB = protos.load()
TensorProto = _PB.tensor_pb2.TensorProto
TensorShapeProto = _PB.tensor_shape_pb2.TensorShapeProto
DataType = _PB.types_pb2.DataType

# The most elements one tensor may claim (a 1-value field can splat to its whole shape, so the
# shape alone decides the allocation): 64 Mi elements, 256 MiB of float32.
DEFAULT_MAX_ELEMENTS = 1 << 26
MAX_DIMS = 254  # TensorFlow's TensorShape::MaxDimensions(); numpy's 64 (protocol.MAX_DIMS) is checked next


@dataclass(frozen=True)
class DtypeSpec:
    """How one wire dtype travels in a TensorProto."""

    name: str  # sgserve's wire name (protocol.DTYPES, or "string")
    enum: int  # types_pb2.DataType
    field: str  # the typed *_val field TensorFlow reads for it
    np_dtype: np.dtype  # object for strings


def _spec(name: str, enum_name: str, field: str) -> DtypeSpec:
    np_dtype = protocol.DTYPES.get(name, np.dtype(object))
    return DtypeSpec(name, DataType.Value(enum_name), field, np_dtype)


_SPECS = (
    _spec("float16", "DT_HALF", "half_val"),  # IEEE binary16 bit patterns, one per int32
    _spec("float32", "DT_FLOAT", "float_val"),
    _spec("float64", "DT_DOUBLE", "double_val"),
    _spec("int8", "DT_INT8", "int_val"),
    _spec("int16", "DT_INT16", "int_val"),
    _spec("int32", "DT_INT32", "int_val"),
    _spec("int64", "DT_INT64", "int64_val"),
    _spec("uint8", "DT_UINT8", "int_val"),
    _spec("uint16", "DT_UINT16", "int_val"),
    _spec("uint32", "DT_UINT32", "uint32_val"),
    _spec("uint64", "DT_UINT64", "uint64_val"),
    _spec("bool", "DT_BOOL", "bool_val"),
    _spec(protocol.STRING, "DT_STRING", "string_val"),
)
BY_NAME: dict[str, DtypeSpec] = {s.name: s for s in _SPECS}
BY_ENUM: dict[int, DtypeSpec] = {s.enum: s for s in _SPECS}
_VALUE_FIELDS = frozenset(s.field for s in _SPECS) | {
    "scomplex_val", "dcomplex_val", "resource_handle_val", "variant_val", "float8_val"}
_SUPPORTED = ", ".join(DataType.Name(s.enum) for s in _SPECS)


def dtype_enum(name: str) -> int:
    """The DataType of an sgserve dtype name, for SignatureDef TensorInfo in GetModelMetadata.

    Metadata may also name dtypes the wire cannot carry (its numpy name, e.g. "complex64",
    "bfloat16"): those map to their DT_ twin; a name with none (numpy's "object") is DT_INVALID.
    """
    spec = BY_NAME.get(name)
    if spec is not None:
        return spec.enum
    try:
        return DataType.Value("DT_" + name.upper())
    except ValueError:
        return DataType.Value("DT_INVALID")


def dtype_name(enum: int, what: str = "tensor") -> str:
    """The sgserve dtype name of a DataType; InvalidArgument for one the wire cannot carry."""
    spec = BY_ENUM.get(enum)
    if spec is None:
        raise InvalidArgument(f"{what}: dtype {_enum_label(enum)} is not supported (supported: {_SUPPORTED})")
    return spec.name


def to_numpy(tensor: Any, name: str = "", max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """The array a TensorProto holds. ``name`` (the input's) goes into error messages.

    A ``tensor_content`` tensor comes back as a read-only view of the proto's bytes (no copy).
    """
    what = f"tensor '{name}'" if name else "tensor"
    spec = BY_ENUM.get(tensor.dtype)
    if spec is None:
        raise InvalidArgument(f"{what}: dtype {_enum_label(tensor.dtype)} is not supported (supported: {_SUPPORTED})")
    shape, count = _shape(tensor.tensor_shape, what, max_elements, spec.np_dtype.itemsize)
    content = tensor.tensor_content
    if content:
        if spec.name == protocol.STRING:
            raise InvalidArgument(f"{what}: a DT_STRING tensor must carry its values in string_val, "
                                  f"not tensor_content")
        want = count * spec.np_dtype.itemsize
        if len(content) != want:
            raise InvalidArgument(f"{what}: tensor_content is {len(content)} bytes, "
                                  f"{spec.name}{list(shape)} needs {want}")
        arr = np.frombuffer(content, dtype=spec.np_dtype)
        if spec.name == "bool" and arr.view(np.uint8).max(initial=0) > 1:
            arr = arr.view(np.uint8) != 0  # TensorFlow reads any non-zero byte as true
        return arr.reshape(shape)
    return _from_field(tensor, spec, shape, count, what)


def _shape(shape_pb: Any, what: str, max_elements: int, itemsize: int) -> tuple[tuple[int, ...], int]:
    """(dims, element count) of a TensorShapeProto, checked as TensorFlow's TensorShape::IsValid
    does, against max_elements, and against what numpy can hold (64 dimensions; an empty tensor's
    dimensions too, which no element count bounds)."""
    if shape_pb.unknown_rank:
        raise InvalidArgument(f"{what}: tensor_shape has unknown_rank set; a tensor needs a known shape")
    dims = tuple([d.size for d in shape_pb.dim])
    if len(dims) > MAX_DIMS:
        raise InvalidArgument(f"{what}: tensor_shape has {len(dims)} dimensions, at most {MAX_DIMS}")
    if dims and min(dims) < 0:
        raise InvalidArgument(f"{what}: tensor_shape {list(dims)} has a negative (unknown) dimension; "
                              f"a tensor's dimensions are sizes >= 0")
    count = math.prod(dims)  # Python ints: an absurd shape is caught here, never wrapped
    if count > max_elements:
        raise InvalidArgument(f"{what}: tensor_shape {list(dims)} holds {count} elements, "
                              f"more than the {max_elements} allowed")
    fault = protocol.shape_fault(dims, itemsize) if not count or len(dims) > protocol.MAX_DIMS else None
    if fault is not None:
        raise InvalidArgument(f"{what}: {fault}")
    return dims, count


def _from_field(tensor: Any, spec: DtypeSpec, shape: tuple[int, ...], count: int, what: str) -> np.ndarray:
    """The array of a tensor carried in its typed ``*_val`` field (padded as TensorFlow pads)."""
    values = getattr(tensor, spec.field)
    n = len(values)
    if n > count:
        raise InvalidArgument(f"{what}: {spec.field} has {n} values, {spec.name}{list(shape)} holds {count}")
    if n == 0:
        if count:
            _check_no_other_field(tensor, spec, what)
        if spec.name == protocol.STRING:
            out = np.empty(count, dtype=object)
            out.fill(b"")
            return out.reshape(shape)
        return np.zeros(shape, dtype=spec.np_dtype)
    if spec.name == protocol.STRING:
        out = np.empty(n, dtype=object)
        out[:] = list(values)
    elif spec.field == "int_val" or spec.field == "half_val":
        out = _narrow_ints(values, spec, what)
    else:
        out = np.fromiter(values, dtype=spec.np_dtype, count=n)
    if n < count:
        out = np.concatenate([out, np.full(count - n, out[-1], dtype=out.dtype)])
    return out.reshape(shape)


def _narrow_ints(values: Sequence[int], spec: DtypeSpec, what: str) -> np.ndarray:
    """int_val (int32 on the wire) as a narrower int dtype, or half_val's binary16 bit patterns."""
    wide = np.fromiter(values, dtype=np.int64, count=len(values))
    target = np.dtype("<u2") if spec.field == "half_val" else spec.np_dtype
    info = np.iinfo(target)
    if wide.min() < info.min or wide.max() > info.max:
        bad = int(wide[(wide < info.min) | (wide > info.max)][0])
        kind = "binary16 bit pattern" if spec.field == "half_val" else spec.name
        raise InvalidArgument(f"{what}: {spec.field} value {bad} is out of range for {kind} "
                              f"[{info.min}, {info.max}]")
    narrow = wide.astype(target)
    return narrow.view(np.float16) if spec.field == "half_val" else narrow


def _check_no_other_field(tensor: Any, spec: DtypeSpec, what: str) -> None:
    """Refuses values sent in another dtype's field (TensorFlow would silently read zeros)."""
    for field, _ in tensor.ListFields():
        if field.name in _VALUE_FIELDS and field.name != spec.field:
            raise InvalidArgument(f"{what}: dtype {DataType.Name(spec.enum)} carries its values in "
                                  f"{spec.field} or tensor_content, but the tensor has {field.name}")


def from_numpy(arr: Any, typed_fields: bool = False) -> Any:
    """The TensorProto of an array: dtype, tensor_shape, and the values in ``tensor_content``
    (numeric) or ``string_val`` (strings); with ``typed_fields``, in the dtype's ``*_val`` field."""
    if type(arr) is not np.ndarray:
        arr = np.asarray(arr)
    name = protocol.dtype_name(arr)
    spec = BY_NAME[name]
    shape_pb = TensorShapeProto(dim=[TensorShapeProto.Dim(size=d) for d in arr.shape])
    proto = TensorProto(dtype=spec.enum, tensor_shape=shape_pb)
    flat = arr.reshape(-1)
    if name == protocol.STRING:
        proto.string_val.extend([_as_bytes(x) for x in flat.tolist()])
    elif not typed_fields:
        if arr.size:
            proto.tensor_content = np.ascontiguousarray(arr, dtype=spec.np_dtype).tobytes()
    elif spec.field == "half_val":
        proto.half_val.extend(flat.astype(np.float16).view(np.uint16).tolist())
    else:
        getattr(proto, spec.field).extend(flat.astype(spec.np_dtype, copy=False).tolist())
    return proto


def _as_bytes(x: Any) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    raise InvalidArgument(f"a string tensor holds a {type(x).__name__}, not bytes or str: {x!r:.60}")


def _enum_label(enum: int) -> str:
    try:
        return DataType.Name(enum)
    except ValueError:
        return f"DataType {enum}"
