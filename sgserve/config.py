"""Typed configuration. Every `sgserve start` setting is declared once, as a ServerConfig field: its
name, type, default and help text live here, and sgserve/settings.py derives the command-line
options, their environment variables and the README's options table from these fields."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from sgserve.protocol import default_endpoint

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
VERSION_TRANSITIONS = ("availability-preserving", "resource-preserving")


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one ServerConfig field appears to a person: on the command line, in --help and the README.

    ``flag`` is the option's spelling when it is not ``--<field name with dashes>`` (a boolean that
    defaults to on says its off spelling too); ``shown_default`` says the default in words where the
    value alone would not (None, a unit, a size)."""

    help: str
    flag: str = ""
    shown_default: str = ""
    choices: tuple[str, ...] = ()
    path: bool = False


def setting(default: Any = dataclasses.MISSING, *, help: str, factory: Any = dataclasses.MISSING,  # noqa: A002
            **how: Any) -> Any:
    """A ServerConfig field that is a setting (a field made otherwise is derived, never a flag)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"setting": Setting(help, **how)})


class ByteRate(int):
    """Bytes per second, written as a size: ``200MiB``, ``1.5GiB/s``, ``500MB``, ``0`` (no limit).

    A click option of this type turns a value it cannot read into a usage error (exit 2)."""

    _UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "ki": 2**10, "m": 10**6, "mb": 10**6,
              "mib": 2**20, "mi": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "gi": 2**30}

    def __new__(cls, value: Any = 0) -> "ByteRate":
        if isinstance(value, int):
            number, unit = float(value), ""
        else:
            m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*(?:/s)?\s*", str(value))
            if not m or m.group(2).lower() not in cls._UNITS:
                raise ValueError(f"{value!r} is not a byte rate: write e.g. 200MiB, 1GiB, 500MB or 0 (unlimited)")
            number, unit = float(m.group(1)), m.group(2).lower()
        if number < 0:
            raise ValueError(f"{value!r} is not a byte rate: it must be 0 (unlimited) or more")
        return super().__new__(cls, int(number * cls._UNITS[unit]))


def _default_cache_dir() -> str:
    return os.environ.get("SGSERVE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "sgserve"))


@dataclasses.dataclass
class ServerConfig:
    """Everything `sgserve start` was told; the CLI builds it from its options, tests build it directly.

    The field order is the order of `sgserve start --help` and of the README's options table."""

    # Models and versions (TF Serving's flags and meanings).
    model_base_path: str | None = setting(
        None, path=True, shown_default="built-in demo",
        help="TF Serving layout `BASE/<integer version>/saved_model.pb`, watched for new and removed versions")
    model_name: str | None = setting(
        None, shown_default="base path's last part, or demo", help="the name clients use")
    model_version_policy: str = setting(
        "latest", help="which versions of `--model-base-path` to serve: `latest[:N]`, `all`, or `specific:V1,V2` "
                       "(a config file says it per model)")
    model_config_file: str | None = setting(
        None, path=True, shown_default="none",
        help="TF Serving's `ModelServerConfig` text file (`model_config_list { config { name base_path "
             "model_version_policy version_labels } }`): several models in one server; existing TF Serving "
             "files work unchanged. Replaces `--model-base-path` and `--model-name`")
    model_config_file_poll_wait_seconds: float = setting(
        0.0, shown_default="0: read once, as TF Serving",
        help="re-read `--model-config-file` this often (seconds), adding and removing models while serving")
    file_system_poll_wait_seconds: float = setting(
        1.0, shown_default="1 s", help="how often each model's base path is scanned for new or removed versions; "
                                       "0 or less: once, at start (as TF Serving)")
    allow_version_labels_for_unavailable_models: bool = setting(
        False, shown_default="off",
        help="a NEW version label in the model config may point at a version that is not loaded yet (it answers "
             "once that version is available); moving an existing label still needs an available version "
             "(TF Serving's meaning)")
    max_num_load_retries: int = setting(
        5, help="a failed load (e.g. a version still being copied) is retried this many times, then FAILED")
    load_retry_interval: float = setting(60.0, shown_default="60 s", help="seconds between load retries")
    load_bandwidth: ByteRate = setting(
        ByteRate(0), shown_default="0: unlimited",
        help="the most bytes per second the loader writes a new version while serving, e.g. `200MiB` or `1GiB` "
             "(units B, KiB, MiB, GiB, KB, MB, GB; `/s` optional): a full retrain's write then disturbs the "
             "serving requests less, at the cost of a longer load (bench/RESULTS.md section 4.4)")
    version_transition: str = setting(
        "availability-preserving", choices=VERSION_TRANSITIONS,
        help="load the new version before the old one unloads (`availability-preserving`), or unload first "
             "(`resource-preserving`: hosts that cannot hold two versions)")
    incremental_updates: bool = setting(
        True, flag="--incremental-updates/--no-incremental-updates", shown_default="on",
        help="a new version shares the tensors that did not change (same checkpoint crc32c) with the previous one")
    segment_dir: str = setting(
        "/dev/shm", path=True,
        help="where each version's segment lives: `/dev/shm` (RAM), or a directory on an SSD/NVMe volume, where "
             "each segment is a file the workers map the same way and the page cache keeps the hot pages in RAM "
             "(models larger than the memory the server may use)")
    enable_model_warmup: bool = setting(
        True, flag="--enable-model-warmup/--no-model-warmup", shown_default="on",
        help="warm each version on every worker before it takes traffic")
    warmup_file: str | None = setting(
        None, path=True, shown_default="none",
        help="sgserve JSON-lines warmup requests, for versions without `assets.extra/tf_serving_warmup_requests`")
    # Server-side batching inside each worker (TF Serving's flags and meanings; sgserve/worker/batching.py).
    enable_batching: bool = setting(
        False, shown_default="off",
        help="server-side batching in every worker: requests for the same model, version and signature from "
             "different clients run as one model call (TF Serving's --enable_batching)")
    batching_parameters_file: str | None = setting(
        None, path=True, shown_default="TF Serving's defaults",
        help="TF Serving's `BatchingParameters` text file (`max_batch_size { value: 32 } batch_timeout_micros "
             "{ value: 1000 } ...`): `max_batch_size`, `batch_timeout_micros`, `max_enqueued_batches`, "
             "`num_batch_threads`, `allowed_batch_sizes`, `pad_variable_length_inputs`, "
             "`enable_large_batch_splitting`. Needs `--enable-batching`")
    max_batching_pipeline: int = setting(
        4096, help="with `--enable-batching`: the most requests the broker lets one worker hold, enough to fill "
                   "its queued and running batches; more wait in the broker (`--max-enqueued`)")
    # Workers and cores.
    workers: int = setting(2, help="worker processes")
    cpus_per_worker: int = setting(1, help="cores per worker: worker i is pinned to cores `[i*K, (i+1)*K)`")
    allow_oversubscribe: bool = setting(
        False, shown_default="off", help="allow more worker cores than the machine has (refused without it)")
    intra_op_threads: int | None = setting(
        None, shown_default="`--cpus-per-worker`", help="TensorFlow intra-op pool per worker")
    inter_op_threads: int | None = setting(
        None, shown_default="1, or 2 above 2 cores per worker", help="TensorFlow inter-op pool per worker")
    # The broker.
    policy: str = setting(
        "rr", help="dispatch policy: `rr`, `mod` (routing key, else client identity, modulo workers, as DeepRec's "
                   "MOD), `least-loaded`, or `package.module:callable`")
    endpoint: str = setting(
        factory=default_endpoint, shown_default="`tcp://127.0.0.1:8510`",
        help="where clients connect (a ZeroMQ endpoint; loopback by default)")
    curve_secret_key: str | None = setting(
        None, path=True, shown_default="none: CURVE off",
        help="the server's secret certificate (`DIR/server.key_secret` from `sgserve keygen DIR`): CURVE "
             "authentication and encryption on `--endpoint`; needs `--curve-authorized-clients`")
    curve_authorized_clients: str | None = setting(
        None, path=True, shown_default="none",
        help="a directory of client public keys (`*.key`): with CURVE, only these clients (and the admin "
             "keys) get any answer; others fail the handshake and get nothing")
    curve_admin_clients: str | None = setting(
        None, path=True, shown_default="none: loopback clients",
        help="a directory of client public keys (`*.key`) allowed to run `shutdown`, `pin`, `unpin` and "
             "`reload_config`; others get 403. Without it (or without CURVE) those commands are accepted "
             "only from loopback or ipc clients")
    max_request_bytes: int = setting(
        64 * 1024 * 1024, shown_default="64 MiB", help="largest request payload accepted; larger ones get 400")
    split_min_rows: int = setting(
        64, help="split a predict request of at least this many rows along its first dimension across the idle "
                 "workers (each part at least half this many rows), when a worker found its signature answers "
                 "the same split at load; 0: never split (bench/RESULTS.md section 10 chose 64)")
    split_max_parts: int = setting(
        0, shown_default="all idle workers", help="the most parts one split request runs as")
    split_models: str = setting(
        "all", help="which models `--split-min-rows` applies to: `all`, a comma list of names (only those), or "
                    "a comma list of `-name` (all but those)")
    max_enqueued: int = setting(
        1024, help="requests that may wait in the broker for a free worker before new ones get 429; when it is "
                   "full, a client holding the most of them has its newest dropped (429) to admit another "
                   "client's, and queued requests are taken round robin between clients")
    client_hwm: int = setting(
        1000, help="per client connection: replies the broker holds for a client that does not read them (more "
                   "are dropped and counted) and requests it buffers before it stops reading that connection "
                   "(ZeroMQ's SNDHWM and RCVHWM on the frontend)")
    worker_pipeline: int = setting(
        2, help="requests the broker lets one worker hold at once (1 running + queued); `--enable-batching` raises it")
    worker_timeout: float = setting(
        30.0, shown_default="30 s",
        help="seconds a worker may hold one request before it counts as hung and is killed and restarted")
    boot_timeout: float = setting(
        120.0, shown_default="120 s",
        help="seconds a worker may take to map the model and warm up; one not READY by then fails the start "
             "(no restart loop)")
    drain_timeout: float = setting(10.0, shown_default="10 s", help="on stop, seconds in-flight requests may take")
    heartbeat_interval: float = setting(
        1.0, shown_default="1 s", help="seconds between heartbeats, from the broker to each worker and back")
    heartbeat_liveness: int = setting(
        3, help="heartbeat intervals an idle worker may stay silent before it counts as dead and is restarted")
    hang_timeout: float = setting(
        2.0, shown_default="2 s",
        help="seconds a worker holding a request may stay stopped, or use no CPU time, once silent for half a "
             "heartbeat interval, before it counts as hung and is killed (its requests are retried elsewhere); "
             "a worker that is runnable or whose CPU time advances is starved, not hung, and time the broker "
             "itself was not running never counts. 0: off (only `--worker-timeout`)")
    # TF Serving's front doors: its gRPC and REST APIs, beside the native ZeroMQ endpoint (sgserve/frontdoor/).
    port: int = setting(
        0, shown_default="0: off",
        help="TF Serving's gRPC port (`PredictionService`, `ModelService`); 0: no gRPC front door. TF Serving "
             "defaults to 8500; sgserve keeps it off unless asked, so that `sgserve start` alone opens no extra port")
    rest_api_port: int = setting(
        0, shown_default="0: off",
        help="TF Serving's REST port (`/v1/models/...`); 0: off, as in TF Serving. Prometheus metrics "
             "(`--monitoring-config-file`) and the liveness endpoint `/healthz` are served on it too")
    rest_api_num_threads: int = setting(
        0, shown_default="0: 1",
        help="front-door processes sharing the gRPC and REST ports (SO_REUSEPORT), each one asyncio event loop; "
             "unlike TF Serving's thread count, 0 means 1")
    rest_api_timeout_in_ms: int = setting(
        30000, shown_default="30000 ms",
        help="REST requests without a deadline of their own get this one (milliseconds)")
    monitoring_config_file: str | None = setting(
        None, path=True, shown_default="none: no metrics",
        help="TF Serving's `MonitoringConfig` text file (`prometheus_config { enable: true path: "
             "\"/monitoring/prometheus/metrics\" }`): Prometheus metrics on `--rest-api-port`")
    ssl_config_file: str | None = setting(
        None, path=True, shown_default="none: plaintext",
        help="TF Serving's `SSLConfig` text file (`server_key`, `server_cert` and `custom_ca` as PEM text, "
             "`client_verify`): TLS on `--port`")
    ssl_admin_client_certs: str | None = setting(
        None, path=True, shown_default="none: loopback callers",
        help="a PEM file of client certificates that may call `HandleReloadConfigRequest` on `--port` from any "
             "address (needs `client_verify` in `--ssl-config-file`); other callers must be on loopback")
    # The process.
    cache_dir: str = setting(
        factory=_default_cache_dir, path=True, shown_default="`~/.cache/sgserve`",
        help="where the built-in demo model is built, once")
    log_level: str = setting(
        "warning", choices=LOG_LEVELS,
        help="`debug` also shows TensorFlow's own start-up messages, hidden otherwise")
    log_format: str = setting(
        "text", choices=LOG_FORMATS,
        help="`text`: one line per record (time, level, role, pid, message); `json`: one JSON object per line "
             "(time, level, role, pid, logger, message), for log shippers")
    # Derived at start, not a setting: server.resolve_batching puts BatchingParameters.to_dict() here
    # (None: batching off), which every WorkerSpec carries; it also raises worker_pipeline.
    batching_parameters: dict[str, Any] | None = None

    def resolved_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model_base_path:
            return os.path.basename(os.path.normpath(self.model_base_path)) or "model"
        return "demo"

    def intra_threads(self) -> int:
        return self.intra_op_threads or self.cpus_per_worker

    def inter_threads(self) -> int:
        return self.inter_op_threads or (1 if self.cpus_per_worker <= 2 else 2)


@dataclasses.dataclass
class ModelSpec:
    """One loaded model version as the broker and the workers see it (no TensorFlow needed)."""

    name: str
    version: int
    base_path: str
    segment: str  # POSIX shm name: /sgserve_<pid>_<start time>_<model>_<version>_<rand>
    segment_bytes: int  # bytes of variable data in the segment
    signatures: dict[str, Any]  # sig -> {"inputs": {n: {dtype, shape}}, "outputs": {...}, "method": str}
    load_seconds: float = 0.0
    # Every segment this version maps: its own first, then earlier versions' segments that hold
    # tensors it shares with them unchanged (incremental update). segment_bytes counts all of them.
    segments: list[str] = dataclasses.field(default_factory=list)
    own_bytes: int = -1  # bytes of variable data in its own segment (-1: all of segment_bytes)

    @property
    def version_dir(self) -> str:
        return os.path.join(self.base_path, str(self.version))

    def all_segments(self) -> list[str]:
        return self.segments or [self.segment]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(**d)


@dataclasses.dataclass
class WorkerSpec:
    """Everything a worker process needs, passed as JSON on its command line."""

    index: int
    cores: list[int]
    backend: str  # broker's backend endpoint (the worker connects a DEALER to it)
    models: list[dict[str, Any]]  # ModelSpec dicts
    intra_op_threads: int
    inter_op_threads: int
    heartbeat_interval: float = 1.0
    server_id: str = ""
    warmup: bool = True  # warm each version up before saying READY / LOADED
    warmup_file: str | None = None  # sgserve JSON-lines warmup requests (see sgserve/models/warmup.py)
    batching: dict[str, Any] | None = None  # BatchingParameters.to_dict(); None: one request at a time
    split_check: bool = False  # check at load whether each signature answers the same split (--split-min-rows)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, s: str) -> "WorkerSpec":
        return cls(**json.loads(s))
