"""The broker's routing core: frames in, frames out, no sockets.

``RoutingCore`` is the whole request path of the broker as a state machine. The socket loop
(broker.py) hands it each client message (``from_client``) and each worker message
(``from_worker``), and calls ``tick`` every few milliseconds; the core answers through the two
send functions it was built with. Unit tests build it with functions that record frames, and feed
it frames: no processes, no sockets.

What it does per predict request, and nothing more: decode the client's header (routing needs the
model, version, signature, routing key and timeout), resolve the version, pick a worker with the
dispatch policy, and forward the client's header frame and payload frames untouched, behind one
command frame with the request id, resolved version, deadline and attempt. Tensor frames are
validated once, by the worker, which runs in parallel; the broker checks only the size limit and
the header fields it routes on. Replies are forwarded to the client untouched.

Every request it accepts gets exactly one answer: a worker reply, 429 when the queue is full, 504
when its deadline passes in the queue, a retry on another worker when the one holding it dies
(then 503), or 503 at shutdown.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from typing import Any, Callable, Sequence

from sgserve.broker import scatter
from sgserve.broker.fair_queue import FairQueue, Refused
from sgserve.broker.policies import DispatchPolicy, DispatchRequest
from sgserve.broker.stats import Stats
from sgserve.broker.worker_table import WorkerSlot, WorkerTable
from sgserve.config import ModelSpec, ServerConfig
from sgserve.models.signatures import leading_batch_dim
from sgserve.auth import ADMIN_TYPES, AdminRule
from sgserve.errors import (DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED, UNAVAILABLE, DeadlineExceeded,
                            InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, ServeError, Unavailable, names)
from sgserve.protocol import (DEFAULT_SIGNATURE, MAGIC, PREDICT, REPLY, REQUEST_TYPES, W_HEARTBEAT, W_REPLY,
                              Envelope, decode_header, error_reply, exception_reply, ok_header, pack, route_frame,
                              split_envelope, unpack_header)

log = logging.getLogger(__name__)

HELD_GRACE = 0.1  # seconds past its deadline a request held by a worker is answered 504 by the broker
_REPLY = W_REPLY[0]
_HEARTBEAT = W_HEARTBEAT[0]
_REPLY_SIZE = REPLY.size
_parse_reply = REPLY.unpack
# The metric labels a request's optional `api` and `entrypoint` header keys may take (the gateway
# sets them; anything else counts as a native predict).
API_LABELS = frozenset(("predict", "classify", "regress", "multi_inference"))
ENTRYPOINT_LABELS = frozenset(("ZMQ", "GRPC", "REST"))

SendToClient = Callable[[list[Any]], None]  # frames, the client's routing prefix first
SendToWorker = Callable[[bytes, list[Any]], bool]  # (worker identity, frames); False: the worker is gone
AdminHandler = Callable[[str, dict[str, Any]], dict[str, Any]]  # (type, header) -> reply fields
ControlHandler = Callable[[bytes, int, list[Any], float], None]  # (identity, command, frames, now)
LostHandler = Callable[[WorkerSlot, str], None]  # a worker taken out of service: kill its process
SplitVerdict = Callable[[str, int, str], "tuple[bool, str | None]"]  # (model, version, signature) -> (known, why not)


class RoutingCore:
    """See the module docstring. ``resolve(header) -> ModelSpec`` names the version a request is
    for (404/503 as ServeError); ``admin`` answers every request type but predict and ping;
    ``on_control`` gets backend commands other than replies and heartbeats (READY, LOADED...);
    ``on_lost`` is told about a worker the core took out of service (silent, hung, unreachable),
    after the core has failed over what it held."""

    def __init__(self, config: ServerConfig, table: WorkerTable, policy: DispatchPolicy, *,
                 resolve: Callable[[dict[str, Any]], ModelSpec], to_client: SendToClient,
                 to_worker: SendToWorker, admin: AdminHandler, on_control: ControlHandler,
                 on_lost: LostHandler, split_verdict: SplitVerdict, stats: Stats | None = None,
                 served: Callable[[str], bool] = lambda _name: True, admin_rule: AdminRule | None = None,
                 gateway_prefix: bytes | None = None) -> None:
        self.config = config
        self.stats = stats if stats is not None else Stats()  # every answered predict, for /metrics
        self._served = served  # is this a served model's name (a metric label clients cannot invent)
        self._admin_rule = admin_rule  # who may run shutdown, pin, unpin, reload_config (None: anyone)
        self.table = table
        self.policy = policy
        self.queue = FairQueue(config.max_enqueued, gateway_prefix)  # fair between clients (fair_queue.py)
        self.stopping = False  # set by the broker: every new request gets 503
        self._resolve = resolve
        self._to_client = to_client
        self._to_worker = to_worker
        self._admin = admin
        self._on_control = on_control
        self._on_lost = on_lost
        self._split_verdict = split_verdict
        self._rids = itertools.count(1)
        self._max_bytes = config.max_request_bytes
        self._split_min_rows = config.split_min_rows  # 0: never split
        self._split_max_parts = config.split_max_parts or 1 << 16  # 0: as many as are idle
        self._split_keeps_keys = getattr(policy, "name", None) != "rr"  # keyed policies keep stickiness
        self._split_ok: dict[tuple[str, int, str], bool] = {}
        self._split_model = split_models_rule(config.split_models)
        self.split_requests = 0  # requests answered by several workers (status counts them)
        self.split_parts = 0

    # -- client messages -------------------------------------------------------------------------
    def from_client(self, frames: Sequence[Any]) -> None:
        """One frontend message: ``[identity, (empty if REQ), MAGIC, header, payload...]``."""
        envelope, msg = split_envelope(frames)
        request_id = header = None
        received = time.monotonic()
        try:
            size = 0
            for frame in msg:
                size += len(frame)
            if size > self._max_bytes:
                request_id = _peek_id(msg)
                raise InvalidArgument(f"request is {size} bytes, over the server's limit of "
                                      f"{self._max_bytes} bytes (--max-request-bytes)")
            header, payload = unpack_header(msg)
            request_id = header.get("id")
            rtype = header.get("type")
            if rtype not in REQUEST_TYPES:
                what = "has no 'type'" if rtype is None else f"has unknown type {rtype!r}"
                raise InvalidArgument(f"request {what}; expected one of {', '.join(REQUEST_TYPES)}")
            if self.stopping:
                raise Unavailable("server is shutting down")
            if rtype == PREDICT:
                self._predict(envelope, header, msg[1], payload)
            else:
                if rtype in ADMIN_TYPES and self._admin_rule is not None and not self._admin_rule.allows(frames[0]):
                    raise PermissionDenied(self._admin_rule.refusal(rtype))  # frames[0] carries the peer's key
                self._to_client(envelope.wrap(pack(ok_header(request_id, **self._admin(rtype, header)))))
        except Exception as exc:  # noqa: BLE001 - a ServeError is the answer; anything else, 500 and keep serving
            if not isinstance(exc, ServeError):
                log.exception("unexpected error handling a client request")
            reply = exception_reply(request_id, exc, "internal error in the broker: ")
            self._to_client(envelope.wrap(reply))
            if header is not None and header.get("type") == PREDICT:
                self._count_header(header, decode_header(reply[1])["code"], time.monotonic() - received)

    def _predict(self, envelope: Envelope, header: dict[str, Any], header_frame: Any, payload: list[Any]) -> None:
        spec = self._resolve(header)
        signature = header.get("signature")
        if signature is None:
            signature = DEFAULT_SIGNATURE
        elif type(signature) is not str:
            raise InvalidArgument(f"'signature' must be a string, got {type(signature).__name__}")
        if signature not in spec.signatures:
            raise NotFound(f"model '{spec.name}' version {spec.version} has no signature '{signature}'; "
                           f"available signatures: {names(spec.signatures)}")
        output_filter = header.get("output_filter")
        if output_filter is not None and (type(output_filter) is not list
                                          or not all(type(n) is str for n in output_filter)):
            raise InvalidArgument("'output_filter' must be a list of output names")
        routing_key = header.get("routing_key")
        if routing_key is not None and not isinstance(routing_key, (int, str, bytes)):
            raise InvalidArgument(f"'routing_key' must be an integer, string or bytes, "
                                  f"got {type(routing_key).__name__}")
        timeout_ms = header.get("timeout_ms")
        deadline = None if timeout_ms is None else _deadline(timeout_ms)
        request = DispatchRequest(next(self._rids), envelope, header, payload, spec.name, spec.version, signature,
                                  routing_key, envelope.identity[0], deadline, time.monotonic(),
                                  header_frame=header_frame)
        queue = self.queue
        if not queue and ((self._split_min_rows and self._split(request, spec)) or self._dispatch(request)):
            return
        try:
            evicted = queue.push(request)
        except Refused:
            raise ResourceExhausted(f"server overloaded: {len(queue)} requests queued (--max-enqueued); "
                                    f"retry later") from None
        if evicted is not None:
            self.fail(evicted, RESOURCE_EXHAUSTED, f"server overloaded: {len(queue)} requests queued "
                                                   f"(--max-enqueued) and this client held the most; its newest "
                                                   f"was dropped for another client's; retry later")

    # -- splitting one request across idle workers (scatter-gather) -------------------------------
    def _split(self, request: DispatchRequest, spec: ModelSpec) -> bool:
        """Sends the request's rows to the idle workers in parts, when it is big enough, its
        signature is batch-major and two or more workers are idle; False to route it whole."""
        if request.routing_key is not None and self._split_keeps_keys:
            return False
        try:  # the header's word first: a small request costs one lookup, not a tensor check
            claimed = request.header["inputs"][0]["shape"][0]
        except (KeyError, IndexError, TypeError):
            return False
        if type(claimed) is not int or claimed < self._split_min_rows:
            return False
        idle = sum(1 for slot in self.table.free() if not slot.inflight)
        parts = min(idle, self._split_max_parts, claimed // max(1, self._split_min_rows // 2))
        if parts < 2 or not self._splittable(spec, request.signature):
            return False
        rows = scatter.rows_of(request.header, request.payload)  # checks the frames, too
        if rows is None or rows < self._split_min_rows:
            return False
        pieces = scatter.split_request(request.header, request.payload, parts)
        scattered = Scattered(request, [h["inputs"][0]["shape"][0] for h, _ in pieces])
        for index, (header, payload) in enumerate(pieces):
            part = dataclasses.replace(request, rid=next(self._rids), header=header, payload=payload,
                                       header_frame=pack(header)[1], scatter=scattered, part=index)
            if not self._dispatch(part):  # a worker went away meanwhile: the part waits its turn
                self.queue.push_unbounded(part)
        self.split_requests += 1
        self.split_parts += len(pieces)
        return True

    def _splittable(self, spec: ModelSpec, signature: str) -> bool:
        key = (spec.name, spec.version, signature)
        ok = self._split_ok.get(key)
        if ok is None:
            why = None if self._split_model(spec.name) else "--split-models leaves it out"
            why = why or leading_batch_dim(spec.signatures[signature])
            if why is None:
                known, why = self._split_verdict(spec.name, spec.version, signature)
                if not known:
                    return False  # no worker has checked it yet: whole, and ask again next time
            ok = self._split_ok[key] = why is None
        return ok

    def _part_replied(self, request: DispatchRequest, frames: list[Any]) -> None:
        """One part's reply: the first error answers the request; the last success merges them all."""
        scattered = request.scatter
        if scattered.answered:
            return  # another part failed first: its reply was the answer
        gather = scattered.gather
        try:
            gather.add(request.part, decode_header(frames[0]), list(frames[1:]))
        except ServeError as exc:  # a worker reply the broker cannot read
            self.fail(request, INTERNAL, f"unreadable reply from a worker for part {request.part}: {exc.message}")
            return
        if gather.failed or gather.done:  # Gather.reply: the first failure, else the merge (or its 500)
            scattered.answered = True
            reply = gather.reply()
            self._to_client(scattered.request.envelope.wrap(reply))
            self._count(scattered.request, decode_header(reply[1])["code"], time.monotonic())

    # -- worker messages -------------------------------------------------------------------------
    def from_worker(self, frames: Sequence[Any]) -> None:
        """One backend message: ``[worker identity, command frame, ...]``."""
        if len(frames) < 2:
            log.warning("dropping a malformed backend message (%d frames)", len(frames))
            return
        identity = frames[0].bytes
        head = frames[1].bytes
        command = head[0] if head else -1
        now = time.monotonic()
        if command == _REPLY:
            if len(frames) < 3 or len(head) != _REPLY_SIZE:
                log.warning("dropping a reply without request id and header from %r", identity)
                return
            _, rid, code, batch = _parse_reply(head)
            request = self.table.mark_idle(rid, identity, now)
            if request is None:
                slot = self.table.by_identity(identity)
                if slot is not None:
                    self.table.seen(slot, now)
                log.debug("dropping a reply from %r for a request it no longer holds", identity)
                return
            if request.answered:
                pass  # its client already had a 504 at the deadline (_expire_held)
            elif request.scatter is None:
                self._to_client(request.envelope.prefix + [MAGIC, *frames[2:]])
                self._count(request, code, now)
                if batch:
                    self.stats.batch(request.model, batch)
            else:
                self._part_replied(request, frames[2:])
            if self.queue:
                self.pump()
        elif command == _HEARTBEAT:
            slot = self.table.by_identity(identity)
            if slot is not None:
                self.table.seen(slot, now)
        else:
            self._on_control(identity, command, list(frames[2:]), now)

    # -- dispatch --------------------------------------------------------------------------------
    def _dispatch(self, request: DispatchRequest) -> bool:
        """True when the request is handled (sent, or failed with an answer); False to keep it queued."""
        table = self.table
        while True:
            slots = table.free()
            if not slots:
                return False
            if request.died_on is not None:
                slots = _avoiding(slots, request.died_on)
            try:
                slot = self.policy.choose(request, slots)
            except Exception as exc:  # noqa: BLE001 - a plugin bug fails one request, not the server
                log.exception("dispatch policy %r failed", self.config.policy)
                self.fail(request, INTERNAL, f"dispatch policy {self.config.policy!r} failed: "
                                             f"{type(exc).__name__}: {exc}")
                return True
            if slot is None:
                return False
            if not isinstance(slot, WorkerSlot) or table.get(slot.index) is not slot or not table.has_capacity(slot):
                log.error("dispatch policy %r returned %r, which is not one of the free workers",
                          self.config.policy, slot)
                self.fail(request, INTERNAL, f"dispatch policy {self.config.policy!r} returned "
                                             f"something other than one of the free workers")
                return True
            route = route_frame(request.rid, request.version, request.deadline, request.attempt)
            if self._to_worker(slot.identity, [route, request.header_frame, *request.payload]):
                request.sent_at = time.monotonic()
                table.mark_busy(slot, request)
                return True
            self.worker_lost(slot, "disconnected from the broker")

    def pump(self) -> None:
        """Moves queued requests to free workers, oldest first; answers the expired ones."""
        queue = self.queue
        wall = time.time()
        now = time.monotonic()
        while queue and self.table.free():
            request = queue.pop()
            if request.scatter is not None and request.scatter.answered:
                continue  # another part failed: the client has its answer
            if self._expire(request, wall, now):
                continue
            if not self._dispatch(request):
                queue.unpop(request)
                return

    def _expire(self, request: DispatchRequest, wall: float, now: float) -> bool:
        """Answers a queued request whose time is up; True when it did."""
        if request.died_on is not None:
            if (request.deadline is not None and wall >= request.deadline) or \
                    (request.retry_until is not None and now >= request.retry_until):
                self.fail(request, UNAVAILABLE, f"worker {request.died_on} died while serving the request, "
                                                f"and no other worker could take it in time")
                return True
            return False
        if request.deadline is not None and wall >= request.deadline:
            waited = (now - request.received_at) * 1000.0
            self.fail(request, DEADLINE_EXCEEDED, f"deadline exceeded after {waited:.0f} ms queued in the "
                                                  f"broker waiting for a free worker; the request was not run")
            return True
        return False

    # -- time ------------------------------------------------------------------------------------
    def tick(self, now: float, silence: float, worker_timeout: float) -> None:
        """Expired queued requests, silent workers (nothing heard for ``silence`` s while idle) and
        hung workers (a request held ``worker_timeout`` s without a reply)."""
        queue = self.queue
        wall = time.time()
        if queue:
            queue.discard(lambda request: self._expire(request, wall, now))
            if self.table.free():
                self.pump()
        self._expire_held(wall)
        for slot in self.table.expired(now, silence):
            self.worker_lost(slot, f"sent nothing for {now - slot.last_seen:.1f} s "
                                   f"(heartbeat interval {self.config.heartbeat_interval:g} s x "
                                   f"liveness {self.config.heartbeat_liveness})")
        for slot in self.table.hung(now, worker_timeout):
            self.worker_lost(slot, f"held a request for over {worker_timeout:g} s without replying (--worker-timeout)")

    def _expire_held(self, wall: float) -> None:
        """Answers 504 for a request a worker still holds HELD_GRACE s past its deadline: a stopped
        or slow worker must not keep its client waiting past it. The worker keeps the request (it
        is still running it) and its late reply is dropped; if the worker dies, it is not retried."""
        for slot in self.table:
            for request in slot.inflight.values():
                if request.deadline is not None and not request.answered and wall > request.deadline + HELD_GRACE:
                    self.fail(request, DEADLINE_EXCEEDED, f"deadline exceeded while worker {slot.index} held the "
                                                          f"request; its result will be discarded")
                    request.answered = True

    # -- failures --------------------------------------------------------------------------------
    def worker_lost(self, slot: WorkerSlot, why: str) -> None:
        """Takes a silent, hung or unreachable worker out of service; the broker kills it."""
        log.warning("worker %d (pid %s) %s; killing it", slot.index, slot.pid, why)
        orphans = self.table.mark_dead(slot)
        self._on_lost(slot, why)
        self.fail_over(orphans, slot.index)

    def fail_over(self, orphans: list[DispatchRequest], index: int) -> None:
        """Retries each request a dead worker held once, on another worker; else answers 503."""
        orphans = [r for r in orphans if not r.answered]  # answered 504 already: nothing to retry
        if not orphans:
            return
        retry_until = time.monotonic() + self.config.boot_timeout
        retried = 0
        for request in reversed(orphans):  # appendleft in reverse keeps their order at the front
            if self.stopping or request.attempt >= 1:
                again = " (it was already a retry)" if request.attempt >= 1 else ""
                self.fail(request, UNAVAILABLE, f"worker {index} died while serving the request{again}")
            else:
                request.attempt = 1
                request.died_on = index
                request.retry_until = retry_until
                self.queue.push_front(request)
                retried += 1
        log.warning("worker %d held %d request(s): %d retried, %d failed with 503", index, len(orphans),
                    retried, len(orphans) - retried)
        self.pump()

    def fail(self, request: DispatchRequest, code: int, message: str) -> None:
        scattered = request.scatter
        if scattered is not None:
            if scattered.answered:
                return
            scattered.answered = True
            self._to_client(request.envelope.wrap(error_reply(request.request_id, code, message,
                                                              parts=scattered.gather.parts)))
            self._count(scattered.request, code, time.monotonic())
            return
        self._to_client(request.envelope.wrap(error_reply(request.request_id, code, message)))
        self._count(request, code, time.monotonic())

    # -- counting (the metrics of every answered predict) -----------------------------------------
    def _count(self, request: DispatchRequest, code: int, now: float) -> None:
        header = request.header
        api, entrypoint = header.get("api"), header.get("entrypoint")
        self.stats.request(request.model, api if api in API_LABELS else "predict",
                           entrypoint if entrypoint in ENTRYPOINT_LABELS else "ZMQ", code, now - request.received_at)

    def _count_header(self, header: dict[str, Any], code: int, latency_s: float) -> None:
        """A predict answered before it was routed (400, 404, 429...): labelled with the model it
        names when that is a served model's name, else ''. Clients cannot grow the label set."""
        model = header.get("model")
        if type(model) is not str or not self._served(model):
            model = ""
        api, entrypoint = header.get("api"), header.get("entrypoint")
        self.stats.request(model, api if api in API_LABELS else "predict",
                           entrypoint if entrypoint in ENTRYPOINT_LABELS else "ZMQ", code, latency_s)

    def fail_all(self, reason: str) -> None:
        """Answers every queued and in-flight request 503 (the server is going away)."""
        pending = list(self.queue)
        self.queue.clear()
        for slot in self.table:
            pending.extend(self.table.mark_dead(slot))
        for request in pending:
            if not request.answered:
                self.fail(request, UNAVAILABLE, reason)

    # -- reading ---------------------------------------------------------------------------------
    def drained(self) -> bool:
        return not self.queue and self.table.inflight_count() == 0

    def requests_for(self, model: str, version: int) -> int:
        """Queued and in-flight requests for one version: an UNLOADING version waits for zero."""
        n = sum(1 for r in self.queue if r.version == version and r.model == model)
        for slot in self.table:
            n += sum(1 for r in slot.inflight.values() if r.version == version and r.model == model)
        return n


def _deadline(timeout_ms: Any) -> float | None:
    """Absolute time.time() deadline from the client's timeout_ms; 504 when already passed."""
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)) or timeout_ms != timeout_ms:
        raise InvalidArgument(f"'timeout_ms' must be a number of milliseconds, got {timeout_ms!r}")
    if timeout_ms <= 0:
        raise DeadlineExceeded(f"deadline exceeded before the request reached the server "
                               f"(timeout_ms={timeout_ms})")
    if math.isinf(timeout_ms):
        return None
    return time.time() + timeout_ms / 1000.0


def _avoiding(slots: Sequence[WorkerSlot], index: int) -> Sequence[WorkerSlot]:
    """The free slots but the one at ``index`` (where a retried request's worker just died), unless
    it is the only one: a retry goes elsewhere when it can, and never waits for that."""
    others = tuple(slot for slot in slots if slot.index != index)
    return others or slots


def _peek_id(msg: Sequence[Any]) -> Any:
    """The request id of an oversized message, when its header is small enough to read."""
    try:
        if len(msg) >= 2 and len(msg[1]) <= 65536:
            header, _ = unpack_header(msg[:2])
            return header.get("id")
    except Exception:  # noqa: BLE001 - best effort only
        pass
    return None


__all__ = ["RoutingCore"]

class Scattered:
    """A client request split into parts: answered exactly once, by the first part that fails or
    by the merge of every part's outputs, in row order."""

    __slots__ = ("request", "gather", "answered")

    def __init__(self, request: DispatchRequest, rows: list[int]) -> None:
        self.request = request
        self.gather = scatter.Gather(request.request_id, len(rows), rows=rows)
        self.answered = False


def split_models_rule(text: str) -> Callable[[str], bool]:
    """--split-models: ``all``, ``a,b`` (only those) or ``-a,-b`` (all but those)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or names == ["all"]:
        return lambda _name: True
    if all(n.startswith("-") for n in names):
        excluded = {n[1:] for n in names}
        return lambda name: name not in excluded
    if any(n.startswith("-") for n in names):
        raise ValueError(f"--split-models {text!r}: give names to split, or -names to leave out, not both")
    included = set(names)
    return lambda name: name in included
