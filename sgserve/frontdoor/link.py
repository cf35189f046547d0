"""The gateway's one connection to the broker: a DEALER socket carrying many requests at once.

Every gRPC and REST request becomes one native request (docs/protocol.md) on this socket, with a
fresh integer id; replies arrive in completion order and are matched to their waiting coroutine by
that id. A request whose reply does not come within its timeout (plus a little grace for the
broker's own 504) fails with DEADLINE_EXCEEDED, and a late reply is dropped. The broker does the
rest: deadlines in its queue, retries, fair errors.
"""
from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
from typing import Any, Mapping

import numpy as np
import zmq

from sgserve.auth import apply_client_curve, client_curve
from sgserve.errors import DeadlineExceeded, Internal, ResourceExhausted, ServeError, error_from_code
from sgserve.protocol import (CONNECTION_KEY, GATEWAY_TOKEN_ENV, OK, decode_tensors, gateway_routing_id, pack,
                              recv_frames, send_frames, unpack_header)

log = logging.getLogger(__name__)

REPLY_GRACE = 0.5  # seconds past a request's own timeout to wait for the broker's 504
_NOBLOCK = int(zmq.NOBLOCK)
SNDHWM = 100_000  # requests queued towards the broker before sends block (ZeroMQ's high-water mark)
# Fair admission: with the broker's token (protocol.GATEWAY_TOKEN_ENV) in its routing id, the gateway
# names the gRPC/REST connection each request comes from, and each connection gets its own share.
# The connection the current request came from (set by the transport in the handler's task: the
# gRPC peer, or the REST client's address and port); None: the gateway counts as one client.
CONNECTION: contextvars.ContextVar[str | None] = contextvars.ContextVar("sgserve_connection", default=None)


class BrokerLink:
    """Native requests from coroutines of one event loop; see the module docstring.

    The socket is a plain (not zmq.asyncio) DEALER whose file descriptor the loop watches: sends
    never block (a full queue towards the broker is a 429 at once), and replies are drained when
    the descriptor signals. ZeroMQ's descriptor is edge-triggered, so every send is followed by a
    look at the socket's events (a send can consume the edge that announced a reply). Measured
    against zmq.asyncio's futures in docs/architecture.md section 12.
    """

    def __init__(self, endpoint: str, *, curve_server_key: str | None = None,
                 curve_client_key: str | None = None) -> None:
        """With CURVE on, the broker's public key (Z85) and this gateway's secret certificate path."""
        self.endpoint = endpoint
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        if curve_server_key:
            apply_client_curve(self._sock, client_curve(curve_server_key.encode(), curve_client_key))
        self._sock.setsockopt(zmq.LINGER, 0)
        token = os.environ.get(GATEWAY_TOKEN_ENV)
        if token:  # the pid keeps the ids of several gateways, and of a restarted one, distinct
            self._sock.setsockopt(zmq.ROUTING_ID, gateway_routing_id(token, os.getpid()))
        self._sock.setsockopt(zmq.SNDHWM, SNDHWM)
        self._sock.setsockopt(zmq.RCVHWM, SNDHWM)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False

    def start(self) -> None:
        """Starts reading replies; call from inside the running loop."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.getsockopt(zmq.FD), self._drain)

    async def call(self, header: dict[str, Any], tensors: Mapping[str, np.ndarray] | None = None,
                   timeout: float | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Sends one request; (reply header, output arrays) of a 200, else the typed ServeError."""
        request_id = next(self._ids)
        header["id"] = request_id
        if timeout is not None:
            header["timeout_ms"] = timeout * 1000.0
        connection = CONNECTION.get()
        if connection is not None:
            header[CONNECTION_KEY] = connection
        future = self._loop.create_future()
        self._waiting[request_id] = future
        try:
            try:
                send_frames(self._sock, pack(header, tensors), _NOBLOCK)
            except zmq.Again:
                raise ResourceExhausted(f"gateway overloaded: {SNDHWM} requests queued towards the broker; "
                                        f"retry later") from None
            self._after_send()
            wait = None if timeout is None else timeout + min(REPLY_GRACE, 0.05 + timeout / 2)
            try:
                reply, payload = await asyncio.wait_for(future, wait)
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"no reply from the broker within {wait:g} s") from None
        finally:
            self._waiting.pop(request_id, None)
        code = reply.get("code")
        if code != OK:
            raise error_from_code(code if isinstance(code, int) else 500, str(reply.get("message", "")))
        outputs = decode_tensors(reply.get("outputs"), payload, "outputs") if reply.get("outputs") else {}
        return reply, outputs

    def _after_send(self) -> None:
        if not self._drain_scheduled and self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Reads every reply waiting on the socket and wakes its caller."""
        self._drain_scheduled = False
        sock, waiting = self._sock, self._waiting
        while True:
            try:
                frames = recv_frames(sock, _NOBLOCK)
            except zmq.Again:
                return
            try:
                reply, payload = unpack_header(frames)
            except ServeError as exc:
                log.error("dropping an unreadable reply from the broker: %s", exc.message)
                continue
            future = waiting.get(reply.get("id"))  # absent: its caller gave up (timeout)
            if future is not None and not future.done():
                future.set_result((reply, payload))

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(Internal("the gateway is stopping"))
        self._sock.close(linger=0)
        self._ctx.term()


__all__ = ["BrokerLink", "REPLY_GRACE", "CONNECTION"]
