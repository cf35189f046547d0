"""Dispatch policies through the real CLI: which worker answered is in every response."""
from __future__ import annotations

import os

import numpy as np
import pytest

X = {"x": np.array([1.0], np.float32)}


@pytest.fixture
def hpt(models_dir) -> str:
    return os.path.join(models_dir, "hpt")


def test_mod_routes_by_key(start_server, hpt):
    srv = start_server(["--model-base-path", hpt, "--workers", "2", "--policy", "mod"])
    with srv.client() as c:
        for key in range(8):
            assert c.predict_full("hpt", X, routing_key=key).worker == key % 2
        # A string key always lands on the same worker.
        assert len({c.predict_full("hpt", X, routing_key="user-42").worker for _ in range(5)}) == 1


def test_plugin_policy_from_the_command_line(start_server, hpt):
    srv = start_server(["--model-base-path", hpt, "--workers", "2",
                        "--policy", "sgserve.broker.example_policy:vip_first"])
    with srv.client() as c:
        assert {c.predict_full("hpt", X, routing_key=f"vip-{i}").worker for i in range(6)} == {0}
        assert c.predict("hpt", X)["y"].tolist() == [2.5]
        st = c.status()
    assert st["server"]["policy"] == "sgserve.broker.example_policy:vip_first"


def test_bad_plugin_is_refused_at_start(hpt):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sgserve.cli", "start", "--model-base-path", hpt,
                        "--policy", "nosuch.module:fn", "--endpoint", "tcp://127.0.0.1:1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nosuch.module:fn" in r.stderr
