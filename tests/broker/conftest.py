"""Fixtures for broker tests: each starts a real Broker in a thread over real echo worker processes."""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import uuid
from typing import Any, Iterator

import pytest

# The helpers, the echo worker and the test plugins live next to this file; make them importable
# by plain name whatever pytest's import mode (plugins are loaded by "module:callable" specs).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from broker_helpers import ECHO_WORKER, RunningBroker, descendants, fixed_manager, test_config
from sgserve.broker.broker import Broker
from sgserve.config import ModelSpec


@pytest.fixture
def start_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """start_broker(worker_args=[...], wait_ready=True, models=..., **config) -> RunningBroker."""
    started: list[RunningBroker] = []

    def start(*, worker_args: list[str] = (), wait_ready: bool = True, models: list[ModelSpec] | None = None,
              **overrides: Any) -> RunningBroker:
        config = test_config(**overrides)
        ready = threading.Event()
        backend = f"ipc://{tempfile.gettempdir()}/sgs-test-{uuid.uuid4().hex[:12]}.sock"
        sid = f"test-{uuid.uuid4().hex[:6]}"
        manager = fixed_manager(config, str(tmp_path_factory.mktemp("models")), models, server_id=sid)
        broker = Broker(config, manager, server_id=sid,
                        backend_endpoint=backend,
                        worker_command=[sys.executable, ECHO_WORKER, *worker_args], on_ready=ready.set)
        holder: list[RunningBroker] = []

        def run() -> None:
            rc = broker.run()
            holder[0].rc = rc

        thread = threading.Thread(target=run, name="broker", daemon=True)
        running = RunningBroker(broker, thread, ready)
        holder.append(running)
        started.append(running)
        thread.start()
        if wait_ready:
            assert ready.wait(15), f"workers not READY: {broker.fatal_error or broker.status()['workers']}"
        return running

    yield start
    for running in started:
        running.stop()
        running.close()
        assert not running.thread.is_alive(), "Broker.run() did not return"
    leftovers = descendants()
    for p in leftovers:
        p.kill()
    assert not leftovers, f"worker processes survived the broker: {leftovers}"
