"""TF Serving's ``--monitoring_config_file`` and ``--ssl_config_file``: protobuf text files, read with
TF Serving's own message definitions so that the files people have work unchanged.

Neither proto (tensorflow_serving/config/monitoring_config.proto, ssl_config.proto) is in the
tensorflow-serving-api wheel, so their message classes are built here at run time in a private
descriptor pool, as sgserve/models/batching_params.py does for BatchingParameters. ``sgserve start``
checks both files before it loads anything (``check_front_door_files``).
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
from typing import Any

from sgserve.config import ServerConfig
from sgserve.errors import ConfigError

log = logging.getLogger(__name__)

# PrometheusExporter::kPrometheusPath (tensorflow_serving/util/prometheus_exporter.cc): the metrics
# page's path when prometheus_config enables it without one.
DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"

_PACKAGE = "tensorflow.serving"
# (message, ((field, number, type), ...)) as TF Serving's protos declare them; a type that is not a
# scalar is a message of this package.
_MONITORING_PROTO = ("tensorflow_serving/config/monitoring_config.proto", (
    ("PrometheusConfig", (("enable", 1, "bool"), ("path", 2, "string"))),
    ("MonitoringConfig", (("prometheus_config", 1, "PrometheusConfig"),)),
))
_SSL_PROTO = ("tensorflow_serving/config/ssl_config.proto", (
    ("SSLConfig", (("server_key", 1, "string"), ("server_cert", 2, "string"), ("custom_ca", 3, "string"),
                   ("client_verify", 4, "bool"))),
))
_classes: dict[str, Any] = {}
_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class MonitoringConfig:
    """What --monitoring_config_file asks for: a Prometheus page on the REST port, at ``path``."""

    prometheus_enabled: bool = False
    path: str = DEFAULT_PROMETHEUS_PATH


@dataclasses.dataclass(frozen=True)
class SslConfig:
    """TLS for the gRPC port. As in TF Serving, the key and certificates are PEM text, not file paths."""

    server_key: str
    server_cert: str
    custom_ca: str = ""  # PEM of the CA that signs client certificates ("" : the system's roots)
    client_verify: bool = False  # require and verify a client certificate


def _message_class(proto: tuple[str, tuple[Any, ...]], message: str) -> Any:
    """The generated class of ``tensorflow.serving.<message>``, built once in a private pool."""
    key = f"{_PACKAGE}.{message}"
    with _lock:
        if key not in _classes:
            from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # noqa: PLC0415

            F = descriptor_pb2.FieldDescriptorProto
            scalars = {"bool": F.TYPE_BOOL, "string": F.TYPE_STRING}
            fdp = descriptor_pb2.FileDescriptorProto(name=proto[0], package=_PACKAGE, syntax="proto3")
            for name, fields in proto[1]:
                msg = fdp.message_type.add(name=name)
                for field, number, kind in fields:
                    f = msg.field.add(name=field, number=number, label=F.LABEL_OPTIONAL, json_name=_json_name(field))
                    if kind in scalars:
                        f.type = scalars[kind]
                    else:
                        f.type, f.type_name = F.TYPE_MESSAGE, f".{_PACKAGE}.{kind}"
            pool = descriptor_pool.DescriptorPool()
            pool.Add(fdp)
            for name, _ in proto[1]:
                _classes[f"{_PACKAGE}.{name}"] = message_factory.GetMessageClass(
                    pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        return _classes[key]


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _parse(text: str, source: str, proto: tuple[str, tuple[Any, ...]], message: str, flag: str) -> Any:
    """``text`` parsed into a new ``message``; a syntax error or unknown field names file:line:column."""
    from google.protobuf import text_format  # noqa: PLC0415

    msg = _message_class(proto, message)()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        detail = re.sub(r"^\d+:\d+ : ", "", str(exc)).rstrip(".")
        unknown = re.search(r'Message type "[\w.]+\.(\w+)" has no field named', detail)
        fields = dict(proto[1]).get(unknown.group(1), ()) if unknown else ()
        hint = (f"(valid fields there: {', '.join(f for f, _, _ in fields)})" if fields else
                f"(expected a {message} message in protobuf text format, the {flag} of tensorflow_model_server)")
        where = f"{source}:{line}:{column}" if line is not None else source
        raise ConfigError(f"{where}: syntax error: {detail} {hint}") from None
    return msg


def parse_monitoring_config(text: str, source: str = "<monitoring config>") -> MonitoringConfig:
    """TF Serving's MonitoringConfig text (``prometheus_config { enable: true path: "..." }``)."""
    msg = _parse(text, source, _MONITORING_PROTO, "MonitoringConfig", "--monitoring_config_file")
    prometheus = msg.prometheus_config
    return MonitoringConfig(prometheus_enabled=prometheus.enable, path=prometheus.path or DEFAULT_PROMETHEUS_PATH)


def parse_ssl_config(text: str, source: str = "<SSL config>") -> SslConfig:
    """TF Serving's SSLConfig text. A missing key or certificate, or a file path where TF Serving
    wants PEM text, is refused now rather than by the gRPC server later."""
    msg = _parse(text, source, _SSL_PROTO, "SSLConfig", "--ssl_config_file")
    for field in ("server_key", "server_cert", "custom_ca"):
        value = getattr(msg, field)
        if field != "custom_ca" and not value:
            raise ConfigError(f"{source}: {field} is empty; TLS on --port needs server_key and server_cert "
                              f"(PEM text, as in TF Serving)")
        if value and "-----BEGIN" not in value:
            raise ConfigError(f"{source}: {field} does not hold PEM text (no -----BEGIN line); TF Serving's "
                              f"SSLConfig takes the key and certificates themselves, not file paths")
    return SslConfig(server_key=msg.server_key, server_cert=msg.server_cert, custom_ca=msg.custom_ca,
                     client_verify=msg.client_verify)


def _read(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read {flag} {path}: {reason}") from None


def load_monitoring_config(path: str) -> MonitoringConfig:
    return parse_monitoring_config(_read(path, "--monitoring-config-file"), source=path)


def load_ssl_config(path: str) -> SslConfig:
    return parse_ssl_config(_read(path, "--ssl-config-file"), source=path)


def check_front_door_files(config: ServerConfig) -> tuple[MonitoringConfig | None, SslConfig | None]:
    """Reads both files at start-up, so that a bad one stops `sgserve start` (exit 2) before any model
    loads. A file for a front door that is off is read all the same, and a warning says so."""
    monitoring = load_monitoring_config(config.monitoring_config_file) if config.monitoring_config_file else None
    ssl = load_ssl_config(config.ssl_config_file) if config.ssl_config_file else None
    if monitoring is not None and monitoring.prometheus_enabled and not config.rest_api_port:
        log.warning("--monitoring-config-file enables Prometheus metrics, which are served on --rest-api-port; "
                    "that port is off (0), so there is no metrics page")
    if ssl is not None and not config.port:
        log.warning("--ssl-config-file configures TLS for the gRPC port, which is off (--port 0)")
    return monitoring, ssl
