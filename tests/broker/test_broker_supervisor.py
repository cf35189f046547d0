"""Supervisor pieces that need no running broker: core assignment, worker specs, environment."""
from __future__ import annotations

import json
import os
import sys

import pytest

from broker_helpers import demo_models, test_config
from sgserve.broker.supervisor import DEFAULT_WORKER_COMMAND, Supervisor, assign_cores
from sgserve.process import child_env, describe_exit
from sgserve.broker.worker_table import WorkerTable
from sgserve.config import WorkerSpec


def test_assign_cores_disjoint_runs() -> None:
    assert assign_cores(2, 2, cpus=[0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert assign_cores(3, 1, cpus=[4, 6, 8]) == [[4], [6], [8]]


def test_assign_cores_refuses_oversubscription_unless_allowed() -> None:
    with pytest.raises(ValueError, match="3 workers x 1 cpus need 3 cores.*--allow-oversubscribe"):
        assign_cores(3, 1, cpus=[0, 1])
    assert assign_cores(3, 1, cpus=[0, 1], allow_oversubscribe=True) == [[0], [1], [0]]
    with pytest.raises(ValueError, match="--cpus-per-worker"):
        assign_cores(1, 0, cpus=[0])


def test_worker_spec_and_command() -> None:
    config = test_config(workers=2, cpus_per_worker=1, heartbeat_interval=0.5, intra_op_threads=3)
    table = WorkerTable(2, 2)
    table.add(0, [0])
    slot = table.add(1, [5])
    sup = Supervisor(config, lambda _index: demo_models(), table, backend_endpoint="ipc:///tmp/x", server_id="sid")
    assert sup.command == list(DEFAULT_WORKER_COMMAND) == [sys.executable, "-m", "sgserve.worker"]
    spec = WorkerSpec.from_json(sup.worker_spec(slot).to_json())
    assert spec.index == 1 and spec.cores == [5] and spec.backend == "ipc:///tmp/x"
    assert spec.server_id == "sid" and spec.heartbeat_interval == 0.5
    assert spec.intra_op_threads == 3 and spec.inter_op_threads == 1
    assert [m["version"] for m in spec.models] == [1, 2, 7]
    json.loads(sup.worker_spec(slot).to_json())  # plain JSON on the command line
    custom = Supervisor(config, lambda _index: demo_models(), table, backend_endpoint="x", server_id="s",
                        command=["/bin/echo", "hi"])
    assert custom.command == ["/bin/echo", "hi"]


def test_child_env_makes_this_sgserve_importable(monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = child_env()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert env["PYTHONPATH"].split(os.pathsep) == [root, "/elsewhere"]


def test_describe_exit() -> None:
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(3) == "exit code 3"
