"""The broker's handle on the gateway processes: start them, restart one that dies, stop them.

The broker calls ``poll`` from its supervision step (it never blocks) and ``stop`` when it stops.
A gateway that exits with EXIT_CONFIG_ERROR (its port is taken) cannot start at all: that stops the
server, as a taken --endpoint does. Any other death is restarted at once, then with a backoff.
"""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import time
from typing import Sequence

from sgserve.frontdoor.gateway import GatewaySpec
from sgserve.process import EXIT_CONFIG_ERROR, child_env, describe_exit

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 2.0
STOP_GRACE = 3.0


class FrontDoor:
    """N gateway processes serving the same ports (SO_REUSEPORT)."""

    def __init__(self, specs: Sequence[GatewaySpec]) -> None:
        self.specs = list(specs)
        self.procs: list[subprocess.Popen | None] = [None] * len(self.specs)
        self.restarts = [0] * len(self.specs)
        self._due = [0.0] * len(self.specs)
        self.started = False

    def connect_to(self, endpoint: str) -> None:
        """The broker's bound client endpoint, as a gateway on this host reaches it."""
        for host in ("0.0.0.0", "*", "[::]"):
            endpoint = endpoint.replace(f"tcp://{host}:", "tcp://127.0.0.1:")
        self.specs = [dataclasses.replace(spec, broker=endpoint) for spec in self.specs]

    def use_curve(self, server_public: bytes, key_dir: str) -> bytes:
        """With CURVE on, the gateways connect with a key pair made now in ``key_dir`` (the server's
        0700 runtime directory; only the path travels on their command line). Returns its public
        key, which the broker then authorizes as an admin: the gateways serve
        HandleReloadConfigRequest, and apply the admin rule to their own callers (grpc_service.py)."""
        from sgserve.auth import gateway_cert  # noqa: PLC0415

        secret_path, public = gateway_cert(key_dir)
        self.specs = [dataclasses.replace(spec, curve_server_key=server_public.decode(), curve_client_key=secret_path)
                      for spec in self.specs]
        return public

    def start(self) -> None:
        self.started = True
        for i in range(len(self.specs)):
            self._spawn(i)

    def _spawn(self, i: int) -> None:
        cmd = [sys.executable, "-m", "sgserve.frontdoor.gateway", "--spec", self.specs[i].to_json()]
        self.procs[i] = subprocess.Popen(cmd, env=child_env(), stdin=subprocess.DEVNULL)
        log.info("gateway %d started (pid %d)", i, self.procs[i].pid)

    def poll(self, now: float) -> str | None:
        """Restarts dead gateways; the reason the server must stop, when one can never start."""
        if not self.started:
            return None
        for i, proc in enumerate(self.procs):
            if proc is None:
                if now >= self._due[i]:
                    self._spawn(i)
                continue
            rc = proc.poll()
            if rc is None:
                continue
            if rc == EXIT_CONFIG_ERROR:
                return f"the gRPC/REST gateway cannot start: {describe_exit(rc)} (see its log line above)"
            self.restarts[i] += 1
            log.warning("gateway %d (pid %d) exited: %s; restarting it", i, proc.pid, describe_exit(rc))
            self.procs[i] = None
            self._due[i] = now + min(0.1 * 2 ** (self.restarts[i] - 1), RESTART_BACKOFF_MAX)
        return None

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

    def stop(self) -> None:
        """SIGTERM, a grace period, then SIGKILL; never raises."""
        self.started = False
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            p.terminate()
        end = time.monotonic() + STOP_GRACE
        for p in live:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def gateway_specs(config: object, metrics_path: str | None, ssl: dict | None) -> list[GatewaySpec]:
    """One GatewaySpec per gateway process the config asks for (none without --port/--rest_api_port);
    the broker fills in its endpoint (FrontDoor.connect_to) once it is bound."""
    port, rest = getattr(config, "port", 0) or 0, getattr(config, "rest_api_port", 0) or 0
    if not port and not rest:
        return []
    count = max(1, getattr(config, "rest_api_num_threads", 0) or 1)
    base = GatewaySpec(broker="", port=port, rest_api_port=rest,
                       rest_api_timeout_in_ms=getattr(config, "rest_api_timeout_in_ms", 30000),
                       metrics_path=metrics_path, ssl=ssl, max_request_bytes=getattr(config, "max_request_bytes"),
                       admin_certs=_admin_certs(getattr(config, "ssl_admin_client_certs", None)))
    return [dataclasses.replace(base, index=i) for i in range(count)]


def _admin_certs(path: str | None) -> list[str]:
    """The PEM certificates in --ssl-admin-client-certs (one file, one or more certificates)."""
    if not path:
        return []
    from sgserve.errors import ConfigError  # noqa: PLC0415

    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --ssl-admin-client-certs {path}: {exc}") from None
    end = "-----END CERTIFICATE-----"
    certs = [part.strip() + "\n" + end + "\n" for part in text.split(end) if "-----BEGIN CERTIFICATE-----" in part]
    if not certs:
        raise ConfigError(f"--ssl-admin-client-certs {path} holds no PEM certificate")
    return certs


__all__ = ["FrontDoor", "gateway_specs"]
