"""Helpers for broker tests: a real Broker in a thread, real echo worker processes, real sockets."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psutil
import zmq

from sgserve.broker.broker import Broker
from sgserve.config import ModelSpec, ServerConfig
from sgserve.models.manager import ModelManager
from sgserve.models.tfs_config import ModelConfig, parse_version_policy
from sgserve.protocol import MAGIC
from tests.conftest import wait_until

ECHO_WORKER = str(Path(__file__).with_name("echo_worker.py"))

SIGNATURES = {
    "serving_default": {"inputs": {"x": {"dtype": "float32", "shape": [-1]}},
                        "outputs": {"x": {"dtype": "float32", "shape": [-1]}}, "method": "predict"},
    "classify": {"inputs": {}, "outputs": {}, "method": "classify"},
}


def demo_models() -> list[ModelSpec]:
    return [
        ModelSpec(name="demo", version=1, base_path="/models/demo", segment="/sgs_test_demo_1",
                  segment_bytes=1024, signatures=SIGNATURES, load_seconds=0.5),
        ModelSpec(name="demo", version=2, base_path="/models/demo", segment="/sgs_test_demo_2",
                  segment_bytes=2048, signatures=SIGNATURES, load_seconds=0.25),
        ModelSpec(name="other", version=7, base_path="/models/other", segment="/sgs_test_other_7",
                  segment_bytes=0, signatures={"serving_default": {}}),
    ]


def fixed_manager(config: ServerConfig, root: str, specs: list[ModelSpec] | None = None,
                  server_id: str = "test") -> ModelManager:
    """A ModelManager through its normal constructor that serves ``specs`` (default: demo_models())
    as they are: each model's base path, under ``root``, holds exactly their version directories and
    serves them all, so nothing is ever loaded or unloaded."""
    specs = demo_models() if specs is None else specs
    configs: dict[str, ModelConfig] = {}
    for spec in specs:
        base = os.path.join(root, spec.name)
        os.makedirs(os.path.join(base, str(spec.version)), exist_ok=True)
        configs[spec.name] = ModelConfig(name=spec.name, base_path=base, version_policy=parse_version_policy("all"))
    return ModelManager(config, server_id=server_id, models=list(configs.values()), initial=specs)


def test_config(**overrides: Any) -> ServerConfig:
    base = dict(workers=2, cpus_per_worker=1, allow_oversubscribe=True, endpoint="tcp://127.0.0.1:*",
                heartbeat_interval=0.2, heartbeat_liveness=3, worker_timeout=5.0, boot_timeout=10.0,
                drain_timeout=2.0, max_enqueued=64, worker_pipeline=2)
    base.update(overrides)
    return ServerConfig(**base)


test_config.__test__ = False  # not a test, despite the name


class RunningBroker:
    """A Broker running in a background thread, plus helpers to talk to it."""

    def __init__(self, broker: Broker, thread: threading.Thread, ready: threading.Event) -> None:
        self.broker = broker
        self.thread = thread
        self.ready = ready
        self.rc: int | None = None
        self.ctx = zmq.Context()
        self._sockets: list[zmq.Socket] = []

    @property
    def endpoint(self) -> str:
        return self.broker.endpoint

    def socket(self, kind: int = zmq.DEALER, identity: bytes | None = None) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(self.endpoint)
        self._sockets.append(sock)
        return sock

    def worker_pids(self) -> dict[int, int | None]:
        return {s.index: s.pid for s in self.broker.table}

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition") -> None:
        wait_until(predicate, timeout, what)

    def stop(self, timeout: float = 20.0) -> int | None:
        self.broker.request_stop()
        self.thread.join(timeout)
        return self.rc

    def close(self) -> None:
        for sock in self._sockets:
            sock.close(linger=0)
        self.ctx.term()


def send(sock: zmq.Socket, header: dict[str, Any], frames: list[Any] = ()) -> None:
    sock.send_multipart([MAGIC, msgpack.packb(header, use_bin_type=True), *frames])


def recv(sock: zmq.Socket, timeout: float = 10.0) -> tuple[dict[str, Any], list[bytes]]:
    assert sock.poll(timeout * 1000), "no reply from the broker"
    frames = sock.recv_multipart()
    if frames and frames[0] == b"":
        frames = frames[1:]
    assert frames[0] == MAGIC
    return msgpack.unpackb(frames[1], raw=False), frames[2:]


def predict_header(rid: Any, **extra: Any) -> tuple[dict[str, Any], list[bytes]]:
    x = np.arange(3, dtype=np.float32) + (rid if isinstance(rid, int) else 0)
    header = {"type": "predict", "id": rid, "model": "demo",
              "inputs": [{"name": "x", "dtype": "float32", "shape": [3]}]}
    header.update(extra)
    return header, [x.tobytes()]


def descendants() -> list[psutil.Process]:
    """Child processes of this test process that are still running (zombies do not count)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out
