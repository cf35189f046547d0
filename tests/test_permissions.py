"""Without CURVE, the admin commands are taken only from loopback or ipc peers.

The server binds every interface (tcp://0.0.0.0) and is reached twice: over loopback, and from a test
host of our own, a network namespace joined to this one by a veth pair (tests/netns.py), whose client
(tests/netns_client.py) reaches the server at the namespace's gateway address 10.213.X.1 from
10.213.X.2: a real socket, so ZeroMQ's Peer-Address says where it came from. The same rule holds on
TF Serving's gRPC HandleReloadConfigRequest, which the gateway judges, except for a TLS client whose
verified certificate is in --ssl-admin-client-certs. No traffic leaves for any other address.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from typing import Iterator

import pytest
import zmq

from sgserve.auth import AdminRule, is_local_peer, is_loopback_endpoint
from sgserve.client import Client
from tests.conftest import ServerProcess, free_port, group_alive, wait_until
from tests.netns import NetnsUnavailable, TestHost, finish_json, own_test_host
from tests.netns_client import reload_config


@pytest.fixture(scope="module")
def test_host() -> Iterator[TestHost]:
    try:
        with own_test_host() as host:
            yield host
    except NetnsUnavailable as exc:
        pytest.skip(f"no test host in a network namespace: {exc} (test_admin_rule_* covers loopback and ipc)")


def _first_frame(bind: str, connect: str) -> zmq.Frame:
    """The identity frame a ROUTER bound at ``bind`` receives from a DEALER connected to ``connect``."""
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind(bind)
        dealer.connect(connect.replace("PORT", router.last_endpoint.decode().rpartition(":")[2]))
        dealer.send(b"x")
        assert router.poll(5000)
        frame = router.recv_multipart(copy=False)[0]
        return frame
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def test_admin_rule_reads_the_peer_address_of_real_frames(tmp_path) -> None:
    rule = AdminRule("tcp://0.0.0.0:1", None)
    assert rule.allows(_first_frame("tcp://0.0.0.0:0", "tcp://127.0.0.1:PORT"))
    ipc = f"ipc://{tmp_path}/s"
    assert AdminRule(ipc, None).allows(_first_frame(ipc, ipc))
    assert not rule.allows(zmq.Frame(b"made here"))  # no connection behind it: not trusted
    assert not AdminRule("tcp://127.0.0.1:1", {b"k" * 40}).allows(zmq.Frame(b"x"))
    assert is_local_peer("::1") and is_local_peer("::ffff:127.0.0.1") and not is_local_peer("10.1.2.3")
    assert is_loopback_endpoint("tcp://127.0.0.1:8510") and is_loopback_endpoint("ipc:///tmp/x")
    assert not is_loopback_endpoint("tcp://*:8510") and not is_loopback_endpoint("tcp://0.0.0.0:8510")


def test_admin_rule_refuses_frames_from_another_host(test_host: TestHost) -> None:
    ctx = zmq.Context()
    router, client = ctx.socket(zmq.ROUTER), None
    try:
        router.bind("tcp://0.0.0.0:0")
        port = router.last_endpoint.decode().rpartition(":")[2]
        client = test_host.popen("tests.netns_client", "frame", f"tcp://{test_host.host_address}:{port}")
        assert router.poll(60_000), client.communicate()[1] if client.poll() is not None else "no frame"
        identity, body = router.recv_multipart(copy=False)
        router.send_multipart([identity, b"seen"])
        assert body.bytes == b"from the namespace"
        assert identity.get("Peer-Address") == test_host.address
        assert not AdminRule("tcp://0.0.0.0:1", None).allows(identity)
        assert finish_json(client, 60) == {"reply": "seen"}
    finally:
        if client is not None and client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.communicate()
        router.close(0)
        ctx.term()


def make_pki(d: str, server_ips: list[str]) -> None:
    """A CA, a server certificate for ``server_ips``, and two client certificates (admin, other)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=" + ",".join(f"IP:{ip}" for ip in server_ips) + "\n")
    for name in ("server", "admin", "other"):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ext = ["-extfile", "server.ext"] if name == "server" else []
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *ext)


def pem_field(name: str, pem: bytes) -> str:
    return f"{name}:\n" + "".join(f'  "{line}\\n"\n' for line in pem.decode().splitlines())


@pytest.fixture
def open_server(cache_dir, tmp_path, test_host: TestHost) -> Iterator[ServerProcess]:
    """Every interface, no CURVE; gRPC with TLS and client certificates, `admin` listed as an admin."""
    make_pki(str(tmp_path), ["127.0.0.1", test_host.host_address])
    pem = {n: (tmp_path / n).read_bytes() for n in ("server.key", "server.pem", "ca.pem")}
    ssl = tmp_path / "ssl.config"
    ssl.write_text(pem_field("server_key", pem["server.key"]) + pem_field("server_cert", pem["server.pem"])
                   + pem_field("custom_ca", pem["ca.pem"]) + "client_verify: true\n")
    port, grpc_port = free_port(), free_port()
    s = ServerProcess(["--workers", "1", "--endpoint", f"tcp://0.0.0.0:{port}", "--port", str(grpc_port),
                       "--ssl-config-file", str(ssl), "--ssl-admin-client-certs", str(tmp_path / "admin.pem")],
                      cache_dir=cache_dir)
    s.port, s.grpc_port, s.pki_dir = port, grpc_port, str(tmp_path)
    s.endpoint = f"tcp://127.0.0.1:{port}"
    try:
        with Client(s.endpoint, timeout=1.0) as c:
            def ready() -> bool:
                assert s.proc.poll() is None, s.proc.communicate()[1][-3000:]
                st = c.status()
                return all(w["state"] == "READY" for w in st["workers"]) and st["gateways"]
            wait_until(ready, timeout=180, what="the server's worker READY")
        wait_until(lambda: socket.create_connection(("127.0.0.1", grpc_port), 1).close() or True, timeout=60,
                   what="the gateway's gRPC port")
        yield s
    finally:
        s.stop()
    assert not group_alive(s.proc.pid)


def test_without_curve_admin_commands_need_loopback(open_server, cache_dir, test_host: TestHost) -> None:
    base_path = os.path.join(cache_dir, "demo")
    far = test_host.run_json("tests.netns_client", "admin", f"tcp://{test_host.host_address}:{open_server.port}",
                             f"{test_host.host_address}:{open_server.grpc_port}", open_server.pki_dir, base_path)
    assert far["predict"] == {"code": 200, "value": [2]}
    for command in ("shutdown", "pin", "unpin"):
        assert far[command]["code"] == 403, far
        assert "loopback" in far[command]["message"], far
    assert far["reload_other"]["code"] == "PERMISSION_DENIED", far  # verified, but not a listed certificate
    assert far["reload_admin"] == {"code": "OK", "error_code": 0}  # listed certificate: applied
    near = reload_config(f"127.0.0.1:{open_server.grpc_port}", base_path, open_server.pki_dir, "other")
    assert near == {"code": "OK", "error_code": 0}  # loopback: applied
    with Client(open_server.endpoint, timeout=10.0) as c:
        assert c.pin("demo", 1)["pinned"] == 1
        c.shutdown()
    assert wait_until(lambda: open_server.proc.poll() is not None, timeout=30, what="the server to exit")
    assert open_server.proc.returncode == 0
    _, err_text = open_server.proc.communicate()
    assert "reachable from other hosts and CURVE is off" in err_text
