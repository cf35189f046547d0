"""Typed configuration: every server setting is declared once here; the CLI maps onto it 1:1."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from sgserve.protocol import default_endpoint


@dataclasses.dataclass
class ServerConfig:
    model_base_path: str | None = None  # TF Serving layout: BASE/<int version>/saved_model.pb
    model_name: str | None = None  # default: basename of model_base_path, or "demo"
    workers: int = 2
    cpus_per_worker: int = 1
    policy: str = "rr"  # rr | mod | least-loaded | package.module:callable
    endpoint: str = dataclasses.field(default_factory=default_endpoint)
    intra_op_threads: int | None = None  # default: cpus_per_worker
    inter_op_threads: int | None = None  # default: 1 when cpus_per_worker <= 2 else 2
    allow_oversubscribe: bool = False
    max_request_bytes: int = 64 * 1024 * 1024
    max_enqueued: int = 1024  # requests waiting in the broker for a free worker
    worker_pipeline: int = 2  # requests a worker may hold at once (1 running + queued); batching raises it
    heartbeat_interval: float = 1.0  # seconds between heartbeats, both ways
    heartbeat_liveness: int = 3  # missed heartbeats before an idle worker counts as dead
    worker_timeout: float = 30.0  # a request held longer than this marks its worker hung
    boot_timeout: float = 120.0  # a worker that is not READY by then failed to boot
    drain_timeout: float = 10.0  # on stop: how long in-flight requests may take
    # Model lifecycle (TF Serving's flags and meanings).
    model_config_file: str | None = None  # ModelServerConfig text format; replaces base path / name
    model_config_file_poll_wait_seconds: float = 0.0  # 0 = read once at start (TF Serving's default)
    file_system_poll_wait_seconds: float = 1.0  # how often base paths are scanned for versions
    max_num_load_retries: int = 5  # a failed load is retried this many times (e.g. a copy in progress)
    load_retry_interval: float = 60.0  # seconds between those retries
    model_version_policy: str = "latest"  # for --model-base-path: latest[:N] | all | specific:V,V
    version_transition: str = "availability-preserving"  # or "resource-preserving" (unload first)
    enable_model_warmup: bool = True  # warm each version before it takes traffic
    warmup_file: str | None = None  # sgserve's own JSON-lines warmup requests, for every model
    incremental_updates: bool = True  # share unchanged tensors (same crc32c) with the previous version
    # Server-side batching inside each worker (TF Serving's flags and meanings; sgserve/worker/batching.py).
    enable_batching: bool = False
    batching_parameters_file: str | None = None  # BatchingParameters text format; none: TF Serving's defaults
    # Resolved at start by server.resolve_batching, not a flag: BatchingParameters.to_dict() (None:
    # batching off), which every WorkerSpec carries; resolve_batching also raises worker_pipeline.
    batching_parameters: dict[str, Any] | None = None
    cache_dir: str = dataclasses.field(
        default_factory=lambda: os.environ.get(
            "SGSERVE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "sgserve")))

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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, s: str) -> "WorkerSpec":
        return cls(**json.loads(s))
