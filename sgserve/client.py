"""The Python client: numpy arrays in, numpy arrays out, typed errors, never an endless wait.

One DEALER socket per thread (ZeroMQ sockets must not be shared between threads), so a Client can
be used from many threads at once. Each request carries a fresh id; a reply with another id (a late
answer to an earlier request that timed out) is discarded. After a timeout the thread's socket is
closed and replaced, so a request that never got through is not delivered later (Lazy Pirate).

With CURVE (a server started with --curve-secret-key) the client needs the server's public key
and its own secret key; a client the server does not know gets no answer at all, so its calls end
in DeadlineExceeded ("no reply"), never in an error reply.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np
import zmq

from sgserve.auth import Key, apply_client_curve, client_curve
from sgserve.errors import (DEADLINE_EXCEEDED, OK, UNAVAILABLE, DeadlineExceeded, Internal, InvalidArgument,
                            ServeError, error_from_code)
from sgserve.protocol import (METADATA, PIN, PING, PREDICT, SHUTDOWN, STATUS, UNPIN, decode_tensors, default_endpoint,
                              pack, recv_frames, send_frames, unpack_header)

DEFAULT_WAIT = 60.0  # seconds to wait for a reply when no timeout is given: no call waits forever
REPLY_GRACE = 0.5  # at most this long past the request's deadline for the server's own 504 to arrive
PING_WAIT = 5.0  # seconds ping() waits when no timeout is given

RoutingKey = int | str | bytes


@dataclasses.dataclass
class PredictResult:
    """A predict reply with where and how fast it was served."""

    outputs: dict[str, np.ndarray]
    model: str
    version: int
    worker: int
    latency_s: float
    parts: int = 1  # >1: the broker split the rows across this many workers (--split-min-rows)
    workers: tuple[int, ...] = ()  # with parts > 1: each part's worker, in row order


class Client:
    """A thread-safe client for one sgserve endpoint.

    ``timeout`` (seconds) is the default for every call: it travels with the request as
    ``timeout_ms`` (so the server does not run a request nobody waits for) and bounds the wait.

    ``curve_server_key`` and ``curve_client_key`` turn on CURVE: each is a certificate file path
    (the server's public ``server.key``; the client's ``client.key_secret``, from `sgserve keygen`),
    or the Z85 key itself as bytes (the server's public key; the client's secret key). Left out,
    they come from $SGSERVE_CURVE_SERVER_KEY and $SGSERVE_CURVE_CLIENT_KEY (paths), as the
    endpoint comes from $SGSERVE_ENDPOINT.
    """

    def __init__(self, endpoint: str | None = None, *, timeout: float | None = None,
                 curve_server_key: Key = None, curve_client_key: Key = None) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self._curve = client_curve(curve_server_key, curve_client_key)  # read once: a bad key fails here
        self._ctx = zmq.Context()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sockets: set[zmq.Socket] = set()
        self._ids = itertools.count(1)
        self._prefix = os.getpid()  # ids stay distinct if the client is forked
        self._closed = False

    # -- requests ------------------------------------------------------------------------------
    def predict(self, model: str, inputs: Mapping[str, np.ndarray], *, version: int | None = None,
                version_label: str | None = None, signature: str | None = None,
                output_filter: Sequence[str] | None = None, routing_key: RoutingKey | None = None,
                timeout: float | None = None) -> dict[str, np.ndarray]:
        """Runs ``model`` on ``inputs``; returns its outputs by name."""
        return self.predict_full(model, inputs, version=version, version_label=version_label, signature=signature,
                                 output_filter=output_filter, routing_key=routing_key, timeout=timeout).outputs

    def predict_full(self, model: str, inputs: Mapping[str, np.ndarray], *, version: int | None = None,
                     version_label: str | None = None, signature: str | None = None,
                     output_filter: Sequence[str] | None = None, routing_key: RoutingKey | None = None,
                     timeout: float | None = None) -> PredictResult:
        """Like predict, plus the version and worker that served it and the round-trip time.

        ``version`` or ``version_label`` (e.g. "stable", "canary") picks a version; neither means the
        model's serving version. Output arrays are read-only views of the received message (no
        copy); copy one to modify it.
        """
        header: dict[str, Any] = {"type": PREDICT, "model": model}
        if version is not None:
            header["version"] = int(version)
        if version_label is not None:
            header["version_label"] = version_label
        if signature is not None:
            header["signature"] = signature
        if output_filter is not None:
            header["output_filter"] = list(output_filter)
        if routing_key is not None:
            header["routing_key"] = routing_key
        started = time.perf_counter()
        reply, payload = self._call(header, inputs, timeout)
        latency = time.perf_counter() - started
        outputs = decode_tensors(reply.get("outputs"), payload, "outputs")
        return PredictResult(outputs=outputs, model=reply.get("model", model),
                             version=reply.get("version", version), worker=reply.get("worker", -1),
                             latency_s=latency, parts=reply.get("parts", 1),
                             workers=tuple(reply.get("workers") or ()))

    def metadata(self, model: str, version: int | None = None, *, version_label: str | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
        """{"model", "version", "versions", "signatures"} as the server describes them."""
        header: dict[str, Any] = {"type": METADATA, "model": model}
        if version is not None:
            header["version"] = int(version)
        if version_label is not None:
            header["version_label"] = version_label
        reply, _ = self._call(header, None, timeout)
        return _body(reply)

    def pin(self, model: str, version: int, *, timeout: float | None = None) -> dict[str, Any]:
        """Rollback: serve ``version`` (loaded first if needed) for requests naming no version,
        until ``unpin``. Returns {"model", "pinned", "pinned_state", "serving_version"} at once;
        poll it (or status) until serving_version is the pinned one."""
        reply, _ = self._call({"type": PIN, "model": model, "version": int(version)}, None, timeout)
        return _body(reply)

    def unpin(self, model: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Returns ``model`` to its version policy."""
        reply, _ = self._call({"type": UNPIN, "model": model}, None, timeout)
        return _body(reply)

    def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """{"server", "workers", "models"}: what the server runs and how it is doing."""
        reply, _ = self._call({"type": STATUS}, None, timeout)
        return _body(reply)

    def ping(self, *, timeout: float | None = None) -> bool:
        """True when the server answers; False when it does not in time or is shutting down."""
        wait = timeout if timeout is not None else (self.timeout if self.timeout is not None else PING_WAIT)
        try:
            self._call({"type": PING}, None, wait)
        except ServeError as exc:
            if exc.code in (UNAVAILABLE, DEADLINE_EXCEEDED):
                return False
            raise
        return True

    def shutdown(self, *, timeout: float | None = None) -> None:
        """Asks the server to stop gracefully (it drains in-flight requests first)."""
        self._call({"type": SHUTDOWN}, None, timeout)

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Closes every thread's socket. Call it once the threads using this client are done."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.endpoint!r}, timeout={self.timeout!r}{', curve' if self._curve else ''})"

    # -- internals -----------------------------------------------------------------------------
    def _socket(self) -> zmq.Socket:
        if self._closed:
            raise RuntimeError("this Client is closed")
        sock = getattr(self._local, "socket", None)
        if sock is not None:
            return sock
        with self._lock:
            if self._closed:
                raise RuntimeError("this Client is closed")
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            apply_client_curve(sock, self._curve)
            sock.connect(self.endpoint)
            self._sockets.add(sock)
        self._local.socket = sock
        self._local.rcvtimeo = -1
        return sock

    def _drop_socket(self, sock: zmq.Socket) -> None:
        self._local.socket = None
        with self._lock:
            self._sockets.discard(sock)
        sock.close(linger=0)

    def _call(self, header: dict[str, Any], tensors: Mapping[str, np.ndarray] | None,
              timeout: float | None) -> tuple[dict[str, Any], list[Any]]:
        """Sends one request and waits for its reply; raises the typed error for a non-200 code."""
        if timeout is None:
            timeout = self.timeout
        if timeout is not None:
            if timeout <= 0:
                raise InvalidArgument(f"timeout must be positive, got {timeout!r}")
            header["timeout_ms"] = timeout * 1000.0
            wait = timeout + min(REPLY_GRACE, 0.05 + timeout / 2)
        else:
            wait = DEFAULT_WAIT
        request_id = [self._prefix, next(self._ids)]
        header["id"] = request_id
        frames = pack(header, tensors)
        sock = self._socket()
        send_frames(sock, frames)
        local = self._local
        deadline = time.monotonic() + wait
        wait_ms = max(1, int(wait * 1000.0))
        while True:
            if local.rcvtimeo != wait_ms:  # set only when it changes: one call fewer per request
                sock.setsockopt(zmq.RCVTIMEO, wait_ms)
                local.rcvtimeo = wait_ms
            try:
                reply_frames = recv_frames(sock)
            except zmq.Again:
                self._drop_socket(sock)
                raise DeadlineExceeded(f"no reply from {self.endpoint} within {wait:g} s "
                                       f"(is the server running?)") from None
            try:
                reply, payload = unpack_header(reply_frames)
            except ServeError as exc:
                raise Internal(f"malformed reply from {self.endpoint}: {exc.message}") from None
            if reply.get("id") != request_id:  # a late reply to an earlier request that timed out
                wait_ms = int((deadline - time.monotonic()) * 1000.0)
                if wait_ms <= 0:
                    self._drop_socket(sock)
                    raise DeadlineExceeded(f"no reply from {self.endpoint} within {wait:g} s "
                                           f"(is the server running?)")
                continue
            code = reply.get("code")
            if code != OK:
                raise error_from_code(code if isinstance(code, int) else 500, str(reply.get("message", "")))
            return reply, payload


def _body(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k not in ("id", "code", "message")}


__all__ = ["Client", "PredictResult", "DEFAULT_WAIT"]
