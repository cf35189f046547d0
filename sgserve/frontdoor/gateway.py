"""The gateway process: TF Serving's gRPC and REST front doors on one asyncio event loop.

``python -m sgserve.frontdoor.gateway --spec JSON`` (started by the broker through launcher.py, one
process or several sharing the ports with SO_REUSEPORT). It is a client of the broker like any
other: one DEALER socket (link.py) carries every request, so the broker, the workers and the native
ZeroMQ path do not change when the front doors are on, and a crash here costs the front doors, not
the server. It imports no TensorFlow.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import sys

import click

from sgserve.logs import setup_logging
from sgserve.process import EXIT_CONFIG_ERROR, EXIT_FATAL, die_with_parent, set_process_name

log = logging.getLogger(__name__)

GRPC_MAX_MESSAGE = (1 << 31) - 1  # TF Serving lifts gRPC's 4 MiB cap too; --max-request-bytes bounds a request


@dataclasses.dataclass
class GatewaySpec:
    """What one gateway process serves; built by launcher.py from the server's config."""

    broker: str  # the broker's client endpoint
    index: int = 0
    port: int = 0  # gRPC; 0 = none
    rest_api_port: int = 0  # REST; 0 = none
    rest_api_timeout_in_ms: int = 30000
    metrics_path: str | None = None  # Prometheus text on the REST port; None = off
    ssl: dict | None = None  # SslConfig fields (server_key, server_cert, custom_ca, client_verify)
    max_request_bytes: int = 64 * 1024 * 1024
    host: str = ""  # "" = every interface, as TF Serving
    curve_server_key: str | None = None  # with CURVE: the broker's public key (Z85)
    curve_client_key: str | None = None  # with CURVE: this gateway's secret certificate (in the runtime dir)
    admin_certs: list[str] = dataclasses.field(default_factory=list)  # PEM: TLS clients that may reload the config

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


async def serve(spec: GatewaySpec) -> None:
    import grpc  # noqa: PLC0415 - after logging is set up

    from sgserve.frontdoor.grpc_service import add_services  # noqa: PLC0415
    from sgserve.frontdoor.link import BrokerLink  # noqa: PLC0415
    from sgserve.frontdoor.rest import RestApi  # noqa: PLC0415
    from sgserve.frontdoor.service import Gateway  # noqa: PLC0415

    link = BrokerLink(spec.broker, curve_server_key=spec.curve_server_key, curve_client_key=spec.curve_client_key)
    link.start()
    gateway = Gateway(link)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    grpc_server = runner = None
    try:
        if spec.port:
            grpc_server = grpc.aio.server(options=[
                ("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", min(GRPC_MAX_MESSAGE, spec.max_request_bytes)),
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE)])
            verify = bool(spec.ssl and spec.ssl.get("client_verify"))
            add_services(grpc_server, gateway, admin_certs=spec.admin_certs if verify else [])
            address = f"{spec.host or '[::]'}:{spec.port}"
            if spec.ssl:
                bound = grpc_server.add_secure_port(address, _credentials(grpc, spec.ssl))
            else:
                bound = grpc_server.add_insecure_port(address)
            if not bound:
                raise OSError(f"cannot listen for gRPC on port {spec.port}")
            await grpc_server.start()
        if spec.rest_api_port:
            from aiohttp import web  # noqa: PLC0415

            api = RestApi(gateway, spec.rest_api_timeout_in_ms, spec.metrics_path)
            runner = web.AppRunner(api.app(), access_log=None, handle_signals=False)
            await runner.setup()
            await web.TCPSite(runner, spec.host or None, spec.rest_api_port, reuse_port=True).start()
        log.info("gateway %d serving%s%s", spec.index, f" gRPC on {spec.port}" if spec.port else "",
                 f" REST on {spec.rest_api_port}" if spec.rest_api_port else "")
        await stop.wait()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
        if runner is not None:
            await runner.cleanup()
        link.close()


def _run(main_coroutine) -> None:  # noqa: ANN001
    """On uvloop where it is installed: a bare grpc.aio echo's p50 fell from 574 to 477 us with it
    (docs/architecture.md section 12); the default loop otherwise."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        asyncio.run(main_coroutine)
        return
    uvloop.run(main_coroutine)


def _credentials(grpc, ssl: dict):  # noqa: ANN001, ANN202 - grpc is imported lazily
    """TF Serving's SSLConfig: PEM text of the key, the certificate and (optionally) the client CA."""
    ca = ssl.get("custom_ca") or None
    return grpc.ssl_server_credentials([(ssl["server_key"].encode(), ssl["server_cert"].encode())],
                                       root_certificates=ca.encode() if ca else None,
                                       require_client_auth=bool(ssl.get("client_verify")))


@click.command()
@click.option("--spec", "spec_json", required=True, help="GatewaySpec as JSON")
def main(spec_json: str) -> None:
    spec = GatewaySpec(**json.loads(spec_json))
    die_with_parent()
    set_process_name(f"sgserve-gateway-{spec.index}")
    setup_logging("gateway")
    try:
        _run(serve(spec))
    except OSError as exc:  # a port taken: the server refuses to start, as for its own endpoint
        log.error("gateway %d cannot serve: %s", spec.index, exc)
        sys.exit(EXIT_CONFIG_ERROR)
    except Exception:  # noqa: BLE001
        log.exception("gateway %d failed", spec.index)
        sys.exit(EXIT_FATAL)


if __name__ == "__main__":
    main()
