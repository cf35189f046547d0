"""TF Serving's ``--batching_parameters_file``: a ``BatchingParameters`` message in protobuf text
format, parsed with the same message built at runtime, so a file that tensorflow_model_server accepts
is read unchanged. Unset fields take TF Serving's defaults. The worker's ``Batcher``
(sgserve/worker/batching.py) runs with these parameters.
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading
from typing import Any, Optional

from sgserve.errors import ConfigError


class BatchingConfigError(ConfigError):
    """A batching parameters file or value that TF Serving would refuse; the message says what to change.

    ``field`` names the parameter at fault, when there is one.
    """

    def __init__(self, message: str, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------

# TF Serving's defaults for unset fields. Sources: SharedBatchScheduler::Options and ::QueueOptions in
# tensorflow/core/kernels/batching_util/shared_batch_scheduler.h, and GetQueueOptions in
# tensorflow_serving/servables/tensorflow/bundle_factory_util.h (which maps the message onto them).
DEFAULT_MAX_BATCH_SIZE = 1000  # QueueOptions::input_batch_size_limit
DEFAULT_BATCH_TIMEOUT_MICROS = 0  # QueueOptions::batch_timeout_micros
DEFAULT_MAX_ENQUEUED_BATCHES = 10  # QueueOptions::max_enqueued_batches
DEFAULT_THREAD_POOL_NAME = "batch_threads"  # Options::thread_pool_name

_FILE_HINT = ("(expected a BatchingParameters message in protobuf text format, the "
              "--batching_parameters_file of tensorflow_model_server)")


def default_num_batch_threads() -> int:
    """TF Serving's default: port::MaxParallelism(), the CPUs this process may run on.

    In a pinned worker that is its own cores, which is why BatchingParameters leaves the value unset
    (None) until the Batcher is built inside the worker.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's BatchingParameters (session_bundle_config.proto), with its defaults filled in.

    Building one validates it as TF Serving does; a bad value raises BatchingConfigError.
    """

    # Most rows one request may bring, and (without splitting) most rows in one batch.
    # Default 1000: SharedBatchScheduler::QueueOptions::input_batch_size_limit.
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    # How long an open, non-full batch waits for more requests once a thread is free to run it.
    # Default 0: QueueOptions::batch_timeout_micros.
    batch_timeout_micros: int = DEFAULT_BATCH_TIMEOUT_MICROS
    # Batches that may wait per queue (the open batches count); beyond it submit() says 429.
    # Default 10: QueueOptions::max_enqueued_batches. 0 is read as 1 without splitting, as
    # SharedBatchScheduler::AddQueue does for old configs.
    max_enqueued_batches: int = DEFAULT_MAX_ENQUEUED_BATCHES
    # Threads that run batches. Default: SharedBatchScheduler::Options::num_batch_threads =
    # port::MaxParallelism(); None here means "that default, resolved in the process that runs the
    # batches" (see default_num_batch_threads and resolved_num_batch_threads).
    num_batch_threads: Optional[int] = None
    # Name of the batch threads. Default "batch_threads": SharedBatchScheduler::Options.
    thread_pool_name: str = DEFAULT_THREAD_POOL_NAME
    # Batch sizes a batch is padded up to (empty: no padding). Default empty: BatchingSessionOptions.
    allowed_batch_sizes: tuple[int, ...] = ()
    # Pad inputs that differ in non-batch dimensions so that they can share a batch. Default false.
    pad_variable_length_inputs: bool = False
    # Split a request larger than the room left in a batch over several batches. Default false.
    enable_large_batch_splitting: bool = False
    # Most rows in one batch when splitting. Default max_batch_size (bundle_factory_util.h
    # GetQueueOptions); without splitting TF Serving ignores the field and so does sgserve: the
    # value here is then always max_batch_size.
    max_execution_batch_size: Optional[int] = None

    def __post_init__(self) -> None:
        def check_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise BatchingConfigError(f"{name} must be an integer; was {value!r}", name)

        for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches"):
            check_int(name)
        if self.num_batch_threads is not None:
            check_int("num_batch_threads")
        if self.max_execution_batch_size is not None:
            check_int("max_execution_batch_size")
        # Messages follow TF Serving's (SharedBatchScheduler::Create / AddQueue, bundle_factory_util.cc).
        if self.max_batch_size <= 0:
            raise BatchingConfigError(f"max_batch_size must be positive; was {self.max_batch_size}", "max_batch_size")
        if self.batch_timeout_micros < 0:
            raise BatchingConfigError(f"batch_timeout_micros must be non-negative; was {self.batch_timeout_micros}",
                                      "batch_timeout_micros")
        if self.max_enqueued_batches < 0 or (self.max_enqueued_batches == 0 and self.enable_large_batch_splitting):
            raise BatchingConfigError(f"max_enqueued_batches must be positive; was {self.max_enqueued_batches}",
                                      "max_enqueued_batches")
        if self.max_enqueued_batches == 0:
            object.__setattr__(self, "max_enqueued_batches", 1)
        if self.num_batch_threads is not None and self.num_batch_threads <= 0:
            raise BatchingConfigError(f"num_batch_threads must be positive; was {self.num_batch_threads}",
                                      "num_batch_threads")
        if not isinstance(self.thread_pool_name, str):
            raise BatchingConfigError(f"thread_pool_name must be a string; was {self.thread_pool_name!r}",
                                      "thread_pool_name")
        sizes = tuple(self.allowed_batch_sizes)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            raise BatchingConfigError(f"allowed_batch_sizes must be integers; was {list(sizes)}", "allowed_batch_sizes")
        object.__setattr__(self, "allowed_batch_sizes", sizes)
        if sizes:
            if sizes[0] <= 0:
                raise BatchingConfigError(f"allowed_batch_sizes entries must be positive; first entry was {sizes[0]}",
                                          "allowed_batch_sizes")
            for before, after in zip(sizes, sizes[1:]):
                if after <= before:
                    raise BatchingConfigError(f"allowed_batch_sizes entries must be monotonically increasing; "
                                              f"{after} follows {before}", "allowed_batch_sizes")
            if sizes[-1] != self.max_batch_size:
                raise BatchingConfigError(f"Last entry in allowed_batch_sizes must match max_batch_size; last entry "
                                          f"was {sizes[-1]}; expected {self.max_batch_size}", "allowed_batch_sizes")
        if self.enable_large_batch_splitting:
            execution = self.max_execution_batch_size
            if execution is None:
                object.__setattr__(self, "max_execution_batch_size", self.max_batch_size)
            elif execution <= 0:
                raise BatchingConfigError(f"max_execution_batch_size must be positive; was {execution}",
                                          "max_execution_batch_size")
            elif execution > self.max_batch_size:
                raise BatchingConfigError(
                    f"When enable_large_batch_splitting is true, max_batch_size must be greater than or equal "
                    f"to max_execution_batch_size; max_batch_size is {self.max_batch_size}, "
                    f"max_execution_batch_size is {execution}", "max_execution_batch_size")
        else:
            object.__setattr__(self, "max_execution_batch_size", self.max_batch_size)

    @property
    def batch_size_limit(self) -> int:
        """Most rows in one batch that runs: max_execution_batch_size (= max_batch_size without splitting)."""
        assert self.max_execution_batch_size is not None
        return self.max_execution_batch_size

    def resolved_num_batch_threads(self) -> int:
        """num_batch_threads, or TF Serving's default for this process when it was not set."""
        return self.num_batch_threads if self.num_batch_threads is not None else default_num_batch_threads()

    def padded_batch_size(self, rows: int) -> int:
        """The smallest allowed batch size that holds ``rows`` (TF's RoundToLowestAllowedBatchSize)."""
        for size in self.allowed_batch_sizes:
            if size >= rows:
                return size
        return rows

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (for a WorkerSpec); from_dict() reads it back."""
        d = dataclasses.asdict(self)
        d["allowed_batch_sizes"] = list(self.allowed_batch_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BatchingParameters":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BatchingConfigError(f"unknown batching parameter(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "allowed_batch_sizes" in d:
            d["allowed_batch_sizes"] = tuple(d["allowed_batch_sizes"])
        return cls(**d)


# The BatchingParameters message as tensorflow_serving/servables/tensorflow/session_bundle_config.proto
# declares it: field name, number and type. (That proto is not in the tensorflow-serving-api wheel.)
_PROTO_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("max_batch_size", 1, "google.protobuf.Int64Value"),
    ("batch_timeout_micros", 2, "google.protobuf.Int64Value"),
    ("max_enqueued_batches", 3, "google.protobuf.Int64Value"),
    ("num_batch_threads", 4, "google.protobuf.Int64Value"),
    ("thread_pool_name", 5, "google.protobuf.StringValue"),
    ("allowed_batch_sizes", 6, "repeated int64"),
    ("pad_variable_length_inputs", 7, "bool"),
    ("enable_large_batch_splitting", 8, "google.protobuf.BoolValue"),
    ("max_execution_batch_size", 9, "google.protobuf.Int64Value"),
)
_MESSAGE_NAME = "tensorflow.serving.BatchingParameters"
_message_class: Any = None
_message_lock = threading.Lock()


def _batching_parameters_message() -> Any:
    """The generated class of tensorflow.serving.BatchingParameters, built once in a private pool."""
    global _message_class
    with _message_lock:
        if _message_class is None:
            from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

            fdp = descriptor_pb2.FileDescriptorProto(
                name="tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
                package="tensorflow.serving", syntax="proto3",
                dependency=["google/protobuf/wrappers.proto"])
            msg = fdp.message_type.add(name="BatchingParameters")
            F = descriptor_pb2.FieldDescriptorProto
            for name, number, kind in _PROTO_FIELDS:
                field = msg.field.add(name=name, number=number, json_name=_json_name(name))
                if kind.startswith("google.protobuf."):
                    field.label, field.type, field.type_name = F.LABEL_OPTIONAL, F.TYPE_MESSAGE, "." + kind
                elif kind == "repeated int64":
                    field.label, field.type = F.LABEL_REPEATED, F.TYPE_INT64
                else:
                    field.label, field.type = F.LABEL_OPTIONAL, F.TYPE_BOOL
            pool = descriptor_pool.DescriptorPool()
            pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
            pool.Add(fdp)
            _message_class = message_factory.GetMessageClass(pool.FindMessageTypeByName(_MESSAGE_NAME))
        return _message_class


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def parse_batching_parameters(text: str, source: str = "<batching parameters>") -> BatchingParameters:
    """The BatchingParameters of a TF Serving batching parameters file's text.

    Syntax errors and unknown fields are BatchingConfigError with ``source:line:column``.
    """
    from google.protobuf import text_format

    proto = _batching_parameters_message()()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        message = str(exc)
        if line is not None:
            prefix = f"{line}:{column} : "
            message = message[len(prefix):] if message.startswith(prefix) else message
        hint = _FILE_HINT
        if "has no field named" in message:
            hint = f"(valid fields: {', '.join(name for name, _, _ in _PROTO_FIELDS)})"
        elif 'Expected "{"' in message:
            hint = ("(all fields but allowed_batch_sizes and pad_variable_length_inputs are google.protobuf "
                    "wrappers: write e.g. max_batch_size { value: 128 })")
        where = f"{source}:{line}:{column}" if line is not None else source
        raise BatchingConfigError(f"{where}: syntax error: {message.rstrip('.')} {hint}") from None
    values: dict[str, Any] = {}
    for name, _, kind in _PROTO_FIELDS:
        if kind.startswith("google.protobuf."):
            if proto.HasField(name):
                values[name] = getattr(proto, name).value
        elif kind == "repeated int64":
            values[name] = tuple(int(v) for v in getattr(proto, name))
        else:
            values[name] = bool(getattr(proto, name))
    try:
        return BatchingParameters(**values)
    except BatchingConfigError as exc:
        line = _line_of(text, exc.field) if exc.field else None
        where = f"{source}:{line}" if line is not None else source
        raise BatchingConfigError(f"{where}: {exc}", exc.field) from None


def _line_of(text: str, field: str) -> Optional[int]:
    """The last line that sets ``field`` (the proto keeps no positions, so search; comments skipped)."""
    pattern = re.compile(r"(^|[\s{;,])" + re.escape(field) + r"\s*[:{]")
    found = None
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.search(line.split("#", 1)[0]):
            found = number
    return found


def load_batching_parameters(path: str) -> BatchingParameters:
    """Reads and parses a batching parameters file; a file that cannot be read is a BatchingConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise BatchingConfigError(f"cannot read batching parameters file {path}: {reason}") from None
    return parse_batching_parameters(text, source=path)
