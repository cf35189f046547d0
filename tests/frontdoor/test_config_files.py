"""TF Serving's --monitoring_config_file and --ssl_config_file, read from real files with TF Serving's
message definitions (sgserve/frontdoor/config_files.py)."""
from __future__ import annotations

from concurrent import futures
from pathlib import Path

import pytest

from sgserve.config import ServerConfig
from sgserve.errors import ConfigError
from sgserve.frontdoor.config_files import (DEFAULT_PROMETHEUS_PATH, MonitoringConfig, SslConfig,
                                            check_front_door_files, load_monitoring_config, load_ssl_config)
from tests.conftest import import_required

# tensorflow_serving/servables/tensorflow/testdata/monitoring_config.txt, verbatim.
TFS_MONITORING_EXAMPLE = """prometheus_config: {
  enable: true,
  path: "/monitoring/prometheus/metrics"
}
"""

# A self-signed P-256 key and certificate for localhost / 127.0.0.1 (openssl req -x509, 100 years): test data only.
KEY_PEM = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgEDjN4ST44x0rbzcN
LgcdSrSlySIZB3Dxz8Rr7lHxjI2hRANCAAStu73FSa7RzfHuaeMuf521Mu/ppypT
+AOitmgGbnsyGgMRPyLTupG0ccl3ZFzZ/A5QYX4AqaWHrAHg5Y5B/5mJ
-----END PRIVATE KEY-----
"""
CERT_PEM = """-----BEGIN CERTIFICATE-----
MIIBmjCCAUGgAwIBAgIUM13VLCkt2Yu1aKHdoWH35nQi6GwwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTIwMjAyMTM1NFoYDzIxMjYxMTA4
MDIxMzU0WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAStu73FSa7RzfHuaeMuf521Mu/ppypT+AOitmgGbnsyGgMRPyLTupG0
ccl3ZFzZ/A5QYX4AqaWHrAHg5Y5B/5mJo28wbTAdBgNVHQ4EFgQUy9flA8P/oog5
S7Bfo57tXe539m8wHwYDVR0jBBgwFoAUy9flA8P/oog5S7Bfo57tXe539m8wDwYD
VR0TAQH/BAUwAwEB/zAaBgNVHREEEzARgglsb2NhbGhvc3SHBH8AAAEwCgYIKoZI
zj0EAwIDRwAwRAIgR5XLpeelnRqT3WcKeNgohO9tWeRKihSkGNAFlPNN7XsCIEEA
+q3NnI+lBcV4F7Qgrukq4D4ltDEonNeN7uDn/Be2
-----END CERTIFICATE-----
"""


def pem_field(name: str, pem: str) -> str:
    """A PEM as SSLConfig files write it: one quoted line each, which protobuf text format joins."""
    return f"{name}:\n" + "".join(f'  "{line}\\n"\n' for line in pem.splitlines())


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, expected", [
    (TFS_MONITORING_EXAMPLE, MonitoringConfig(True, "/monitoring/prometheus/metrics")),
    ('prometheus_config { enable: true path: "/metrics" }', MonitoringConfig(True, "/metrics")),
    ("prometheus_config { enable: true }", MonitoringConfig(True, DEFAULT_PROMETHEUS_PATH)),  # TF Serving's default
    ("# metrics off\nprometheus_config { enable: false }\n", MonitoringConfig(False, DEFAULT_PROMETHEUS_PATH)),
    ("", MonitoringConfig(False, DEFAULT_PROMETHEUS_PATH)),
])
def test_monitoring_config(tmp_path: Path, text: str, expected: MonitoringConfig) -> None:
    assert load_monitoring_config(write(tmp_path, "monitoring.config", text)) == expected


@pytest.mark.parametrize("text, parts", [
    ("prometheus_config {\n  enable: true\n  pth: '/x'\n}\n",
     [":3:3: syntax error", 'no field named "pth"', "valid fields there: enable, path"]),
    ("prometheus {\n  enable: true\n}\n", [":1:1: syntax error", 'no field named "prometheus"',
                                          "valid fields there: prometheus_config"]),
    ("prometheus_config {\n  enable: yes\n}\n", [":2:", "syntax error", "MonitoringConfig message in protobuf text "
                                                "format, the --monitoring_config_file of tensorflow_model_server"]),
    ("prometheus_config { enable: true\n", [":1:29: syntax error", 'Expected "}"']),
])
def test_monitoring_config_errors_say_where(tmp_path: Path, text: str, parts: list[str]) -> None:
    path = write(tmp_path, "monitoring.config", text)
    with pytest.raises(ConfigError) as e:
        load_monitoring_config(path)
    message = str(e.value)
    assert message.startswith(path + ":"), message
    for part in parts:
        assert part in message, message


def test_ssl_config_holds_pem_text_usable_by_grpc(tmp_path: Path) -> None:
    text = pem_field("server_key", KEY_PEM) + pem_field("server_cert", CERT_PEM) + \
        pem_field("custom_ca", CERT_PEM) + "client_verify: true\n"
    ssl = load_ssl_config(write(tmp_path, "ssl.config", text))
    assert ssl == SslConfig(server_key=KEY_PEM, server_cert=CERT_PEM, custom_ca=CERT_PEM, client_verify=True)
    # The fields are what gRPC takes: a secure port binds with them.
    grpc = import_required("grpc")
    creds = grpc.ssl_server_credentials([(ssl.server_key.encode(), ssl.server_cert.encode())],
                                        root_certificates=ssl.custom_ca.encode(),
                                        require_client_auth=ssl.client_verify)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        assert server.add_secure_port("127.0.0.1:0", creds) > 0
        server.start()
    finally:
        server.stop(0)


@pytest.mark.parametrize("text, parts", [
    ('server_key: "/etc/tls/key.pem"\nserver_cert: "/etc/tls/cert.pem"\n',
     ["server_key does not hold PEM text", "not file paths"]),
    (pem_field("server_key", KEY_PEM), ["server_cert is empty", "needs server_key and server_cert"]),
    (pem_field("server_key", KEY_PEM) + pem_field("server_cert", CERT_PEM) + "client_verify: maybe\n",
     [":19:", "syntax error"]),
    ('server_keys: "x"\n', [":1:1: syntax error", 'no field named "server_keys"',
                            "valid fields there: server_key, server_cert, custom_ca, client_verify"]),
])
def test_ssl_config_errors(tmp_path: Path, text: str, parts: list[str]) -> None:
    path = write(tmp_path, "ssl.config", text)
    with pytest.raises(ConfigError) as e:
        load_ssl_config(path)
    message = str(e.value)
    assert message.startswith(path + ":"), message
    for part in parts:
        assert part in message, message


def test_check_front_door_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert check_front_door_files(ServerConfig()) == (None, None)
    monitoring = write(tmp_path, "monitoring.config", TFS_MONITORING_EXAMPLE)
    ssl = write(tmp_path, "ssl.config", pem_field("server_key", KEY_PEM) + pem_field("server_cert", CERT_PEM))
    got = check_front_door_files(ServerConfig(monitoring_config_file=monitoring, ssl_config_file=ssl,
                                              port=8500, rest_api_port=8501))
    assert got == (MonitoringConfig(True, DEFAULT_PROMETHEUS_PATH), SslConfig(KEY_PEM, CERT_PEM, "", False))
    assert not caplog.records
    # Files for front doors that are off: read all the same, and a warning each.
    check_front_door_files(ServerConfig(monitoring_config_file=monitoring, ssl_config_file=ssl))
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "--monitoring-config-file enables Prometheus metrics",
        "--ssl-config-file configures TLS for the gRPC port"]
    with pytest.raises(ConfigError, match=r"cannot read --ssl-config-file .*nope\.config: No such file"):
        check_front_door_files(ServerConfig(ssl_config_file=str(tmp_path / "nope.config")))
