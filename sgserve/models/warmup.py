"""Warmup requests: the ones a worker runs on a model version before it announces READY.

Two formats:

- TF Serving's: ``<version dir>/assets.extra/tf_serving_warmup_requests``, a TFRecord file of
  ``tensorflow.serving.PredictionLog`` protos. sgserve serves Predict only, so predict_log records
  become requests and classify/regress/multi-inference records are skipped with one warning.
  Like TF Serving (servables/tensorflow/saved_model_warmup_util.cc), more than 1000 records is an
  error, so is a record that is not a PredictionLog, and so is a session_run_log.
- sgserve's own: JSON lines, one request per line (see read_sgserve_warmup), for models that have no
  TF Serving warmup file.

TensorFlow is imported inside the functions: only the worker processes read TF Serving's format.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from typing import Any, Iterator

import numpy as np

from sgserve.protocol import ALL_DTYPES, DEFAULT_SIGNATURE, DTYPES, STRING

log = logging.getLogger(__name__)

MAX_WARMUP_RECORDS = 1000  # TF Serving's WarmupConsts::kMaxNumRecords
ASSETS_EXTRA = "assets.extra"
TFSERVING_WARMUP_FILE = "tf_serving_warmup_requests"

_SKIPPED_LOGS = ("classify_log", "regress_log", "multi_inference_log", "predict_streamed_log")
_JSON_KEYS = ("signature", "inputs", "dtypes", "model")


class WarmupFormatError(ValueError):
    """A warmup file that cannot be read; the message names the file and, where it can, the record."""


@dataclasses.dataclass
class WarmupRequest:
    signature: str
    inputs: dict[str, np.ndarray]  # numeric arrays; string tensors are object arrays of bytes
    model: str | None = None  # None: the model whose version directory holds the file


def tfserving_warmup_path(version_dir: str) -> str:
    return os.path.join(version_dir, ASSETS_EXTRA, TFSERVING_WARMUP_FILE)


def read_tfserving_warmup(path: str, limit: int = MAX_WARMUP_RECORDS) -> list[WarmupRequest]:
    """The Predict requests of a TF Serving warmup file, in file order.

    The model name in each request's model_spec is ignored, as TF Serving does: the file belongs to
    the version directory it sits in. An empty signature_name means serving_default.
    """
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow_serving.apis import prediction_log_pb2

    requests: list[WarmupRequest] = []
    skipped: dict[str, int] = {}
    number = 0
    try:
        for record in _tf_records(tf, path):
            number += 1
            if number > limit:
                raise WarmupFormatError(f"Number of warmup records exceeds the maximum ({limit}) at {path}; "
                                        f"keep the first {limit} records")
            entry = prediction_log_pb2.PredictionLog()
            try:
                entry.ParseFromString(record)
            except DecodeError:
                raise WarmupFormatError(f"Failed to parse warmup record {number} from {path}: it is not a "
                                        f"tensorflow.serving.PredictionLog") from None
            kind = entry.WhichOneof("log_type")
            if kind == "predict_log":
                requests.append(_predict_request(tf, entry.predict_log.request, path, number))
            elif kind == "session_run_log":
                raise WarmupFormatError(f"Unsupported log_type for warmup: session_run_log (record {number} "
                                        f"of {path}); write predict_log records")
            else:  # classify/regress/multi-inference/streamed, or no log at all: TF Serving skips the last
                skipped[kind or "empty"] = skipped.get(kind or "empty", 0) + 1
    except tf.errors.NotFoundError:
        raise WarmupFormatError(f"warmup file {path} does not exist") from None
    except tf.errors.DataLossError as exc:
        raise WarmupFormatError(f"cannot read warmup record {number + 1} of {path}: {exc.message}. Please verify "
                                f"your warmup data is in TFRecord format.") from None
    except tf.errors.OpError as exc:
        raise WarmupFormatError(f"cannot read warmup file {path}: {exc.message}") from None
    if skipped:
        what = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
        log.warning("%s: skipped %d warmup record(s) that are not Predict requests (%s); sgserve serves "
                    "Predict only", path, sum(skipped.values()), what)
    return requests


def _tf_records(tf: Any, path: str) -> Iterator[bytes]:
    """Raw records. tf_record_iterator needs no eager context, so reading warmup data starts no TF
    thread pools before the worker has sized them; its deprecation notice is muted."""
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        records = tf.compat.v1.io.tf_record_iterator(path)
    finally:
        tf_logger.setLevel(level)
    yield from records


def _predict_request(tf: Any, request: Any, path: str, number: int) -> WarmupRequest:
    inputs: dict[str, np.ndarray] = {}
    for name, proto in sorted(request.inputs.items()):
        try:
            arr = tf.make_ndarray(proto)
        except Exception as exc:  # noqa: BLE001 - make_ndarray raises TypeError/ValueError/KeyError
            raise WarmupFormatError(f"warmup record {number} of {path}: input '{name}' is not a readable "
                                    f"TensorProto ({type(exc).__name__}: {exc})") from None
        inputs[name] = _as_bytes_objects(arr) if arr.dtype.kind in ("O", "S", "U") else arr
    return WarmupRequest(signature=request.model_spec.signature_name or DEFAULT_SIGNATURE, inputs=inputs)


def read_sgserve_warmup(path: str, limit: int = MAX_WARMUP_RECORDS) -> list[WarmupRequest]:
    """sgserve's warmup format: JSON lines, one request per line::

        {"signature": "serving_default", "inputs": {"ids": [[1, 2]], "q": ["text"]},
         "dtypes": {"ids": "int64"}, "model": "optional model name"}

    ``signature`` defaults to serving_default. ``dtypes`` is optional; it takes the wire dtype names
    (float32, int64, ..., string). Without it, strings are string tensors, booleans bool, integers
    int64 and other numbers float32. Strings become UTF-8 bytes; ``{"b64": "..."}`` (TF Serving's
    REST form) gives arbitrary bytes. Blank lines and lines starting with '#' are ignored.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise WarmupFormatError(f"warmup file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WarmupFormatError(f"cannot read warmup file {path}: {exc}") from None
    requests: list[WarmupRequest] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if len(requests) == limit:
            raise WarmupFormatError(f"Number of warmup records exceeds the maximum ({limit}) at {path} "
                                    f"(line {number}); keep the first {limit} requests")
        where = f"{path}:{number}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WarmupFormatError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); each line must "
                                    f"be one request object") from None
        requests.append(_json_request(obj, where))
    return requests


def _json_request(obj: Any, where: str) -> WarmupRequest:
    if not isinstance(obj, dict):
        raise WarmupFormatError(f"{where}: a request must be a JSON object with \"inputs\", got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_JSON_KEYS))
    if unknown:
        raise WarmupFormatError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a request has "
                                f"{', '.join(_JSON_KEYS)}")
    signature = obj.get("signature", DEFAULT_SIGNATURE)
    model = obj.get("model")
    inputs, dtypes = obj.get("inputs"), obj.get("dtypes", {})
    if not isinstance(signature, str) or not signature:
        raise WarmupFormatError(f"{where}: \"signature\" must be a non-empty string, got {signature!r}")
    if model is not None and (not isinstance(model, str) or not model):
        raise WarmupFormatError(f"{where}: \"model\" must be a non-empty string, got {model!r}")
    if not isinstance(inputs, dict):
        raise WarmupFormatError(f"{where}: \"inputs\" must be an object mapping input names to (nested) lists")
    if not isinstance(dtypes, dict):
        raise WarmupFormatError(f"{where}: \"dtypes\" must be an object mapping input names to dtype names")
    extra = sorted(set(dtypes) - set(inputs))
    if extra:
        raise WarmupFormatError(f"{where}: \"dtypes\" names {', '.join(map(repr, extra))}, which "
                                f"\"inputs\" does not have")
    arrays = {}
    for name, value in inputs.items():
        dtype = dtypes.get(name)
        if dtype is not None and dtype not in ALL_DTYPES:
            raise WarmupFormatError(f"{where}: input '{name}': unknown dtype {dtype!r} "
                                    f"(supported: {', '.join(ALL_DTYPES)})")
        try:
            arrays[name] = _json_array(value, dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            raise WarmupFormatError(f"{where}: input '{name}': {exc}") from None
    return WarmupRequest(signature=signature, inputs=arrays, model=model)


def _json_array(value: Any, dtype: str | None) -> np.ndarray:
    leaves = list(_leaves(value))
    is_text = [isinstance(x, (str, dict)) for x in leaves]
    if dtype is None:
        if leaves and all(is_text):
            dtype = STRING
        elif any(is_text):
            raise ValueError("mixes strings and numbers")
        elif leaves and all(isinstance(x, bool) for x in leaves):
            dtype = "bool"
        elif all(isinstance(x, int) for x in leaves):
            dtype = "int64"
        else:
            dtype = "float32"
    if dtype == STRING:
        if not all(is_text):
            raise ValueError("dtype string needs JSON strings (or {\"b64\": ...} objects)")
        shaped = np.array(_map_leaves(value, _json_bytes), dtype=object)
        if any(not isinstance(x, bytes) for x in shaped.reshape(-1)):
            raise ValueError("is not a rectangular nested list of strings")
        return shaped
    if any(is_text) or any(x is None for x in leaves):
        raise ValueError(f"dtype {dtype} needs numbers, got strings or null")
    try:
        arr = np.array(value)
    except ValueError:
        arr = np.empty(0, dtype=object)
    if arr.dtype == object:
        raise ValueError("is not a rectangular nested list of numbers (or holds an integer beyond 64 bits)")
    want = DTYPES[dtype]
    if want.kind in ("i", "u") and arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
        raise ValueError(f"dtype {dtype} needs integers, got fractional numbers")
    if want.kind in ("i", "u") and arr.size and arr.dtype.kind in ("i", "u", "f"):
        info = np.iinfo(want)
        if arr.min() < info.min or arr.max() > info.max:
            raise ValueError(f"values out of range for {dtype}")
    return arr.astype(want)


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _map_leaves(value: Any, fn: Any) -> Any:
    return [_map_leaves(v, fn) for v in value] if isinstance(value, list) else fn(value)


def _json_bytes(x: Any) -> bytes:
    if isinstance(x, dict):
        if set(x) != {"b64"} or not isinstance(x["b64"], str):
            raise ValueError("a binary string is written {\"b64\": \"<base64>\"}")
        try:
            return base64.b64decode(x["b64"], validate=True)
        except ValueError:
            raise ValueError("{\"b64\": ...} holds invalid base64") from None
    return x.encode("utf-8")


def _as_bytes_objects(arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape, dtype=object)
    for index, item in np.ndenumerate(arr):
        out[index] = item if isinstance(item, bytes) else str(item).encode("utf-8")
    return out


__all__ = ["MAX_WARMUP_RECORDS", "WarmupFormatError", "WarmupRequest", "tfserving_warmup_path",
           "read_tfserving_warmup", "read_sgserve_warmup"]
