"""CURVE authentication and admin rights, against a real server started through the real CLI.

One server (demo model, 1 worker, REST front door) serves the whole module with
--curve-secret-key, --curve-authorized-clients (alice) and --curve-admin-clients (admin). Keys come
from `sgserve keygen`; clients are sgserve.Client, the CLI, a stock pyzmq socket and HTTP.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator

import msgpack
import numpy as np
import pytest
import zmq

from sgserve import auth
from sgserve.client import Client
from sgserve.errors import DeadlineExceeded, PermissionDenied
from tests.conftest import ServerProcess, demo_inputs, free_port, group_alive, wait_until

CLI = [sys.executable, "-m", "sgserve.cli"]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    """`sgserve keygen` output plus the authorized and admin directories an operator would make."""
    d = tmp_path_factory.mktemp("keys")
    out = cli("keygen", str(d / "k"), "--client", "alice", "--client", "admin", "--client", "mallory")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 8  # server + 3 clients, a public and a secret file each
    (d / "clients").mkdir()
    (d / "admins").mkdir()
    shutil.copy(d / "k" / "alice.key", d / "clients")
    shutil.copy(d / "k" / "admin.key", d / "admins")  # admin keys are authorized too: no copy in clients
    return {"dir": str(d / "k"), "clients": str(d / "clients"), "admins": str(d / "admins"),
            **{name: str(d / "k" / f"{name}.key_secret") for name in ("server", "alice", "admin", "mallory")},
            "server_public": str(d / "k" / "server.key")}


def curve_client(server: ServerProcess, keys: dict[str, str], who: str, timeout: float = 10.0) -> Client:
    return Client(server.endpoint, timeout=timeout, curve_server_key=keys["server_public"],
                  curve_client_key=keys[who])


@pytest.fixture(scope="module")
def curve_server(keys, tmp_path_factory) -> Iterator[ServerProcess]:
    cache = str(tmp_path_factory.getbasetemp() / "sgserve-cache-demo")
    rest = free_port()
    s = ServerProcess(["--workers", "1", "--curve-secret-key", keys["server"], "--curve-authorized-clients",
                       keys["clients"], "--curve-admin-clients", keys["admins"], "--rest-api-port", str(rest)],
                      cache_dir=cache)
    s.rest_port = rest
    try:
        with curve_client(s, keys, "alice", timeout=1.0) as c:
            def ready() -> bool:
                assert s.proc.poll() is None, s.proc.communicate()[1][-3000:]
                return all(w["state"] == "READY" for w in c.status()["workers"]) and c.status()["gateways"]
            wait_until(ready, timeout=180, what="the CURVE server's worker READY")
        wait_until(lambda: socket.create_connection(("127.0.0.1", rest), 1).close() or True, timeout=60,
                   what="the gateway's REST port")
        yield s
    finally:
        s.stop()
    assert not group_alive(s.proc.pid)


def test_keygen_writes_zeromq_certificates_with_private_secrets(keys) -> None:
    public, secret = zmq.auth.load_certificate(keys["alice"])
    assert len(public) == 40 and len(secret) == 40
    assert zmq.auth.load_certificate(keys["server_public"])[1] is None  # the public file has no secret
    for name in ("server", "alice", "admin", "mallory"):
        assert stat.S_IMODE(os.stat(keys[name]).st_mode) == 0o600
    again = cli("keygen", keys["dir"], "--client", "alice")
    assert again.returncode == 1 and "exists" in again.stderr  # a client's key is never overwritten


def test_unauthenticated_client_gets_nothing(curve_server) -> None:
    with Client(curve_server.endpoint, timeout=1.0) as plain:
        with pytest.raises(DeadlineExceeded, match="no reply"):
            plain.status()
        assert plain.ping(timeout=1.0) is False


def test_unlisted_key_gets_nothing(curve_server, keys) -> None:
    with curve_client(curve_server, keys, "mallory", timeout=1.0) as c:
        with pytest.raises(DeadlineExceeded, match="no reply"):
            c.predict("demo", demo_inputs(2))


def test_authorized_client_predicts_but_admin_commands_get_403(curve_server, keys) -> None:
    with curve_client(curve_server, keys, "alice") as c:
        out = c.predict("demo", demo_inputs(3))
        assert out["score"].shape == (3,) and np.all((out["score"] > 0) & (out["score"] < 1))
        assert c.status()["workers"][0]["state"] == "READY"  # status is not an admin command
        for call in (c.shutdown, lambda: c.pin("demo", 1), lambda: c.unpin("demo")):
            with pytest.raises(PermissionDenied) as info:
                call()
            assert info.value.code == 403 and "--curve-admin-clients" in info.value.message
        assert c.ping()
    # reload_config from a stock pyzmq DEALER with the same key: 403 too, and the config is unchanged
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        auth.apply_client_curve(sock, auth.client_curve(keys["server_public"], keys["alice"]))
        sock.connect(curve_server.endpoint)
        sock.send_multipart([b"SGS1", msgpack.packb({"type": "reload_config", "id": 9, "config": ""})])
        assert sock.poll(10_000), "no reply to reload_config"
        reply = msgpack.unpackb(sock.recv_multipart()[1])
        assert (reply["id"], reply["code"]) == (9, 403)
    finally:
        sock.close(0)
        ctx.term()


def test_admin_key_pins_and_the_cli_takes_keys_from_options_and_env(curve_server, keys) -> None:
    with curve_client(curve_server, keys, "admin") as c:
        assert c.pin("demo", 1)["pinned"] == 1
        assert c.unpin("demo")["pinned"] is None
    by_option = cli("status", "--json", "--endpoint", curve_server.endpoint, "--curve-server-key",
                    keys["server_public"], "--curve-client-key", keys["alice"])
    assert by_option.returncode == 0, by_option.stderr
    assert json.loads(by_option.stdout)["workers"][0]["state"] == "READY"
    env = {"SGSERVE_ENDPOINT": curve_server.endpoint, auth.ENV_SERVER_KEY: keys["server_public"],
           auth.ENV_CLIENT_KEY: keys["alice"]}
    by_env = cli("predict", "demo", "--json", '{"user_id": [1, 2], "item_id": [3, 4]}', env=env)
    assert by_env.returncode == 0, by_env.stderr
    assert len(json.loads(by_env.stdout)["outputs"]["score"]) == 2
    refused = cli("stop", env=env)
    assert refused.returncode == 1 and "403 PERMISSION_DENIED" in refused.stderr
    unkeyed = cli("status", "--endpoint", curve_server.endpoint, "--timeout", "1")
    assert unkeyed.returncode == 1 and "no reply" in unkeyed.stderr


def test_gateway_serves_rest_with_curve_on(curve_server, keys) -> None:
    body = json.dumps({"inputs": {"user_id": [5, 6], "item_id": [7, 8]}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{curve_server.rest_port}/v1/models/demo:predict", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        rest = json.loads(resp.read())["outputs"]
    with curve_client(curve_server, keys, "alice") as c:
        native = c.predict("demo", {"user_id": np.array([5, 6]), "item_id": np.array([7, 8])})
    np.testing.assert_allclose(rest["score"], native["score"], rtol=1e-6)


def test_bench_takes_the_curve_options(curve_server, keys) -> None:
    out = cli("bench", "demo", "--endpoint", curve_server.endpoint, "-n", "20", "-c", "1", "--warmup", "0", "-q",
              "--json", "-", "--curve-server-key", keys["server_public"], "--curve-client-key", keys["alice"])
    assert out.returncode == 0, out.stderr
    point = json.loads(out.stdout)["points"][0]
    assert (point["ok"], point["errors"]) == (20, 0), point


def test_runtime_dir_and_segments_are_private_to_the_servers_user(curve_server, keys) -> None:
    with curve_client(curve_server, keys, "alice") as c:
        sid = c.status()["server"]["server_id"]
    runtime = os.path.join(tempfile.gettempdir(), f"sgserve_{sid}")
    st = os.stat(runtime)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, os.getuid())
    gateway_key = os.path.join(runtime, "gateway.key_secret")
    assert stat.S_IMODE(os.stat(gateway_key).st_mode) == 0o600
    segments = [n for n in os.listdir("/dev/shm") if n.startswith(f"sgserve_{sid}_")]
    assert segments
    for name in segments:
        st = os.stat(os.path.join("/dev/shm", name))
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, os.getuid()), name


def test_admin_key_shuts_the_server_down_from_the_cli(curve_server, keys) -> None:
    """Last in the module: the server is gone afterwards."""
    env = {auth.ENV_SERVER_KEY: keys["server_public"], auth.ENV_CLIENT_KEY: keys["admin"]}
    out = cli("stop", "--endpoint", curve_server.endpoint, env=env)
    assert out.returncode == 0, out.stderr
    assert wait_until(lambda: curve_server.proc.poll() is not None, timeout=30, what="the server to exit")
    assert curve_server.proc.returncode == 0


def test_bad_curve_settings_stop_the_start_before_loading(keys, tmp_path) -> None:
    no_clients = cli("start", "--curve-secret-key", keys["server"], "--endpoint", f"tcp://127.0.0.1:{free_port()}")
    assert no_clients.returncode == 2 and "--curve-authorized-clients" in no_clients.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    start = time.monotonic()
    public_only = cli("start", "--curve-secret-key", keys["server_public"], "--curve-authorized-clients", str(empty))
    assert public_only.returncode == 2 and "no secret key" in public_only.stderr
    assert time.monotonic() - start < 30
