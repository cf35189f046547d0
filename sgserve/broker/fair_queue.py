"""The broker's queue of requests waiting for a free worker, fair between clients.

One client flooding must not take the queue from everyone else. Two rules do it:

- **Admission (longest queue drop).** While the queue has room, every request is admitted, so a
  lone client can use all of ``--max-enqueued``. When it is full, a newcomer is admitted only if
  some client holds at least two more queued requests than the newcomer's client; that client's
  newest request is pushed out (answered 429) to make room. Otherwise the newcomer gets 429. A
  client's share is therefore ``--max-enqueued`` divided by the clients that have requests
  waiting, and only a client over its share is refused while others are under theirs.
- **Dequeuing (round robin).** Each client with queued requests has its own FIFO; ``pop`` takes
  the oldest request of the next client in turn. Within a client the order stays oldest first.

Retries of requests whose worker died go to a separate front lane, ahead of every client: they
were admitted long ago. Parts of a split request are queued without the bound (their request was
admitted as one).

A client is its ZeroMQ identity. The gRPC/REST gateway multiplexes many connections over one
DEALER, so a request from a gateway names its connection in the header key ``connection``, and
each connection counts as a client. The broker honours that key only from identities that start
with the gateway prefix: a random token the broker makes at start and hands to its gateways in
their environment (``protocol.GATEWAY_TOKEN_ENV``), which a native client cannot guess, so it cannot claim
many clients' shares over one socket.
"""
from __future__ import annotations

import collections
import os
import secrets
from typing import Callable, Iterator

from sgserve.broker.policies import DispatchRequest
from sgserve.protocol import CONNECTION_KEY, GATEWAY_ID_TAG, GATEWAY_TOKEN_ENV

MAX_CONNECTION_BYTES = 256

ClientKey = bytes
_FRONT = None  # the lane key of the retries' lane in ``_last``


def gateway_identity_prefix() -> bytes:
    """Makes the gateway token, exports it for the gateway processes (child_env copies
    ``os.environ``) and returns the routing-id prefix the broker trusts."""
    token = os.environ.get(GATEWAY_TOKEN_ENV)
    if not token:
        token = os.environ[GATEWAY_TOKEN_ENV] = secrets.token_hex(16)
    return GATEWAY_ID_TAG + bytes.fromhex(token)


class Refused(Exception):
    """The queue is full and this request's client holds a fair share already."""


class FairQueue:
    """See the module docstring. ``len``, ``bool`` and iteration (retries first, then each
    client's requests, oldest first) work as on the deque it replaces."""

    __slots__ = ("limit", "_gateway_prefix", "_front", "_lanes", "_ring", "_size", "_last")

    def __init__(self, limit: int, gateway_prefix: bytes | None = None) -> None:
        self.limit = limit
        self._gateway_prefix = gateway_prefix
        self._front: collections.deque[DispatchRequest] = collections.deque()
        self._lanes: dict[ClientKey, collections.deque[DispatchRequest]] = {}
        self._ring: collections.deque[ClientKey] = collections.deque()  # clients with requests, in turn
        self._size = 0
        self._last: ClientKey | None = _FRONT

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[DispatchRequest]:
        yield from self._front
        for lane in self._lanes.values():
            yield from lane

    @property
    def clients(self) -> int:
        """Clients with requests waiting (retries not counted)."""
        return len(self._lanes)

    def client_of(self, request: DispatchRequest) -> ClientKey:
        """The identity a request counts against: the ZeroMQ identity, or a gateway's connection."""
        identity = request.client_id
        prefix = self._gateway_prefix
        if prefix is not None and identity.startswith(prefix):
            connection = request.header.get(CONNECTION_KEY)
            if type(connection) is str:
                return identity + b"\x00" + connection.encode()[:MAX_CONNECTION_BYTES]
        return identity

    # -- adding ----------------------------------------------------------------------------------
    def push(self, request: DispatchRequest) -> DispatchRequest | None:
        """Admits a new request at the back of its client's lane; returns the request pushed out
        to make room (the caller answers it 429), or None. Raises Refused when it is not admitted."""
        key = self.client_of(request)
        evicted = None
        if self._size >= self.limit:
            evicted = self._push_out(len(self._lanes.get(key, ())))
            if evicted is None:
                raise Refused()
        self._append(key, request)
        return evicted

    def push_unbounded(self, request: DispatchRequest) -> None:
        """A part of a split request that found no free worker: its request was admitted whole."""
        self._append(self.client_of(request), request)

    def push_front(self, request: DispatchRequest) -> None:
        """A retry: ahead of every client's requests (call in reverse to keep several in order)."""
        self._front.appendleft(request)
        self._size += 1

    def _append(self, key: ClientKey, request: DispatchRequest) -> None:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = collections.deque()
            self._ring.append(key)
        lane.append(request)
        self._size += 1

    def _push_out(self, mine: int) -> DispatchRequest | None:
        """The newest request of the client with the most queued, when it holds at least two more
        than ``mine``: moving one slot from it never leaves it with fewer than the newcomer."""
        if not self._lanes:
            return None
        key, lane = max(self._lanes.items(), key=lambda item: len(item[1]))
        if len(lane) < mine + 2:
            return None
        request = lane.pop()
        self._size -= 1
        if not lane:
            self._drop_lane(key)
        return request

    # -- taking ----------------------------------------------------------------------------------
    def pop(self) -> DispatchRequest:
        """The next request: a retry if any, else the oldest of the next client in turn."""
        self._size -= 1
        if self._front:
            self._last = _FRONT
            return self._front.popleft()
        ring = self._ring
        key = ring.popleft()
        lane = self._lanes[key]
        request = lane.popleft()
        if lane:
            ring.append(key)
        else:
            del self._lanes[key]
        self._last = key
        return request

    def unpop(self, request: DispatchRequest) -> None:
        """Puts back what ``pop`` just returned (no worker took it): first again, as before."""
        self._size += 1
        key = self._last
        if key is _FRONT:
            self._front.appendleft(request)
            return
        lane = self._lanes.get(key)
        if lane is None:
            self._lanes[key] = collections.deque((request,))
        else:
            lane.appendleft(request)
            ring = self._ring
            if ring[-1] == key:
                ring.pop()
            else:  # something queued meanwhile (a nested pump): find it
                ring.remove(key)
        self._ring.appendleft(key)

    def discard(self, answered: Callable[[DispatchRequest], bool]) -> None:
        """Drops every request for which ``answered(request)`` is True (it has sent the answer),
        keeping the order of the rest."""
        if self._front:
            self._front = collections.deque(r for r in self._front if not answered(r))
        for key, lane in list(self._lanes.items()):
            keep = [r for r in lane if not answered(r)]
            if not keep:
                self._drop_lane(key)
            elif len(keep) != len(lane):
                self._lanes[key] = collections.deque(keep)
        self._size = len(self._front) + sum(len(lane) for lane in self._lanes.values())

    def _drop_lane(self, key: ClientKey) -> None:
        del self._lanes[key]
        self._ring.remove(key)

    def clear(self) -> None:
        self._front.clear()
        self._lanes.clear()
        self._ring.clear()
        self._size = 0


__all__ = ["FairQueue", "Refused", "gateway_identity_prefix"]
