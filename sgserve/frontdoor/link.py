"""The gateway's one connection to the broker: a DEALER socket carrying many requests at once.

Every gRPC and REST request becomes one native request (docs/protocol.md) on this socket, with a
fresh integer id; replies arrive in completion order and are matched to their waiting coroutine by
that id. A request whose reply does not come within its timeout (plus a little grace for the
broker's own 504) fails with DEADLINE_EXCEEDED, and a late reply is dropped. The broker does the
rest: deadlines in its queue, retries, fair errors.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Mapping

import numpy as np
import zmq
import zmq.asyncio

from sgserve.errors import DeadlineExceeded, Internal, ServeError, error_from_code
from sgserve.protocol import OK, decode_tensors, pack, unpack_header

log = logging.getLogger(__name__)

REPLY_GRACE = 0.5  # seconds past a request's own timeout to wait for the broker's 504
SNDHWM = 100_000  # requests queued towards the broker before sends block (ZeroMQ's high-water mark)


class BrokerLink:
    """Native requests from coroutines of one event loop; see the module docstring."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, SNDHWM)
        self._sock.setsockopt(zmq.RCVHWM, SNDHWM)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        """Starts reading replies; call from inside the running loop."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    async def call(self, header: dict[str, Any], tensors: Mapping[str, np.ndarray] | None = None,
                   timeout: float | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Sends one request; (reply header, output arrays) of a 200, else the typed ServeError."""
        request_id = next(self._ids)
        header["id"] = request_id
        if timeout is not None:
            header["timeout_ms"] = timeout * 1000.0
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self._sock.send_multipart(pack(header, tensors), copy=False)
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

    async def _read_replies(self) -> None:
        sock = self._sock
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                reply, payload = unpack_header(frames)
            except ServeError as exc:
                log.error("dropping an unreadable reply from the broker: %s", exc.message)
                continue
            future = self._waiting.get(reply.get("id"))  # absent: its caller gave up (timeout)
            if future is not None and not future.done():
                future.set_result((reply, payload))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(Internal("the gateway is stopping"))
        self._sock.close(linger=0)
        self._ctx.term()


__all__ = ["BrokerLink", "REPLY_GRACE"]
