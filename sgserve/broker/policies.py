"""Dispatch policies: which free worker gets a request.

A policy sees the request and the workers that can take it now (READY, fewer than
``worker_pipeline`` requests in flight), sorted by index, and returns one of them, or None to keep
the request queued (the broker keeps FIFO order: it stops draining its queue at a request the
policy declines, until a worker frees up). A policy that needs every slot, such as MOD, which hashes
onto the configured worker count, may define ``bind(table)``; the broker calls it once before the
first ``choose``. Policies read slots; they never change them.

Built-ins: ``rr`` (round robin), ``mod`` (DeepRec SessionGroup's MOD), ``least-loaded``.
Plugins: ``--policy package.module:callable``; see ``load_policy`` and ``example_policy.py``.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import zlib
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from sgserve.broker.worker_table import WorkerSlot, WorkerTable
from sgserve.protocol import Envelope

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True, eq=False)
class DispatchRequest:
    """A predict request inside the broker, from arrival until its reply is sent."""

    rid: int  # the broker's request id: the backend correlation key (protocol.ROUTE)
    envelope: Envelope  # how to address the reply to the client
    header: dict[str, Any]  # the client's header, decoded (read-only: the worker gets header_frame)
    payload: list[Any]  # tensor frames, forwarded untouched
    model: str
    version: int
    signature: str
    routing_key: int | str | bytes | None
    client_id: bytes  # the client's ZeroMQ identity (MOD hashes it when there is no routing_key)
    deadline: float | None  # absolute time.time() seconds, or None
    received_at: float  # monotonic
    attempt: int = 0
    sent_at: float = 0.0  # monotonic time of the last dispatch to a worker
    died_on: int | None = None  # index of the worker that died holding it (attempt 1): the retry avoids it
    retry_until: float | None = None  # monotonic bound on waiting for a retry
    header_frame: Any = None  # the client's header frame, forwarded to the worker untouched
    scatter: Any = None  # core.Scattered when this is one part of a split request
    part: int = 0  # which part (row range, in order) of a split request this is
    answered: bool = False  # answered 504 while a worker held it past its deadline: its reply is dropped

    @property
    def request_id(self) -> Any:
        return self.header.get("id")


@runtime_checkable
class DispatchPolicy(Protocol):
    """Picks a worker for a request. Optional: ``bind(self, table: WorkerTable) -> None``."""

    def choose(self, request: DispatchRequest, slots: Sequence[WorkerSlot]) -> WorkerSlot | None:
        ...


ChooseFunction = Callable[[DispatchRequest, Sequence[WorkerSlot]], "WorkerSlot | None"]


class RoundRobin:
    """Each request goes to the next free worker after the one chosen last, by index."""

    name = "rr"

    def __init__(self) -> None:
        self._last = -1

    def choose(self, request: DispatchRequest, slots: Sequence[WorkerSlot]) -> WorkerSlot | None:
        if not slots:
            return None
        last = self._last
        chosen = slots[0]
        for slot in slots:
            if slot.index > last:
                chosen = slot
                break
        self._last = chosen.index
        return chosen


class LeastLoaded:
    """The free worker with the fewest requests in flight; ties go to the lowest index."""

    name = "least-loaded"

    def choose(self, request: DispatchRequest, slots: Sequence[WorkerSlot]) -> WorkerSlot | None:
        best: WorkerSlot | None = None
        for slot in slots:  # sorted by index, so the first minimum wins ties
            if best is None or len(slot.inflight) < len(best.inflight):
                best = slot
        return best


def routing_hash(key: int | str | bytes) -> int:
    """Stable across processes and runs (unlike hash()): ints are themselves, str/bytes crc32."""
    if isinstance(key, int):
        return key
    if isinstance(key, str):
        key = key.encode("utf-8")
    return zlib.crc32(key)


class Mod:
    """DeepRec SessionGroup's MOD: worker = hash(routing_key) % configured worker count.

    The key is the request's ``routing_key``, or the client's ZeroMQ identity when it has none, so
    one client's requests stay on one worker. When the target worker cannot take the request (not
    READY, or its pipeline is full), the request goes to the next free index after it, wrapping
    around: the same key keeps landing on the same fallback, and nothing waits for one busy worker
    while others are free.
    """

    name = "mod"

    def __init__(self, workers: int | None = None) -> None:
        self._workers = workers

    def bind(self, table: WorkerTable) -> None:
        self._workers = table.size

    def target(self, request: DispatchRequest) -> int:
        key = request.routing_key if request.routing_key is not None else request.client_id
        return routing_hash(key) % (self._workers or 1)

    def choose(self, request: DispatchRequest, slots: Sequence[WorkerSlot]) -> WorkerSlot | None:
        if not slots:
            return None
        target = self.target(request)
        for slot in slots:  # sorted by index: the first at or after the target, else wrap around
            if slot.index >= target:
                return slot
        return slots[0]


class FunctionPolicy:
    """Adapts a plain ``(request, slots) -> slot`` function to DispatchPolicy."""

    def __init__(self, fn: ChooseFunction, name: str) -> None:
        self._fn = fn
        self.name = name

    def choose(self, request: DispatchRequest, slots: Sequence[WorkerSlot]) -> WorkerSlot | None:
        return self._fn(request, slots)


BUILTIN_POLICIES: dict[str, Callable[[], DispatchPolicy]] = {
    "rr": RoundRobin,
    "round-robin": RoundRobin,
    "mod": Mod,
    "least-loaded": LeastLoaded,
}


def load_policy(spec: str) -> DispatchPolicy:
    """The policy named by ``--policy``: a built-in name or ``package.module:callable``.

    The callable may be a DispatchPolicy class or factory (called with no arguments), an object
    with a ``choose`` method, or a plain ``(request, slots) -> slot`` function. Raises ValueError
    naming the spec when it cannot be resolved, so a typo fails at start, not on the first request.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--policy must be a name or package.module:callable, got {spec!r}")
    spec = spec.strip()
    builtin = BUILTIN_POLICIES.get(spec)
    if builtin is not None:
        return builtin()
    if ":" not in spec:
        raise ValueError(f"unknown dispatch policy {spec!r}: use one of rr, mod, least-loaded, "
                         f"or package.module:callable for a plugin")
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"dispatch policy {spec!r} must look like package.module:callable")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - an import can fail in any way; name the spec
        raise ValueError(f"cannot load dispatch policy {spec!r}: importing {module_name!r} failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"cannot load dispatch policy {spec!r}: {module_name!r} has no attribute "
                             f"{attr_path!r}") from None
    try:
        return _as_policy(obj, spec)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin factory can fail in any way
        raise ValueError(f"cannot load dispatch policy {spec!r}: creating it failed: "
                         f"{type(exc).__name__}: {exc}") from exc


def _as_policy(obj: Any, spec: str) -> DispatchPolicy:
    if inspect.isclass(obj):
        obj = obj()
    elif not hasattr(obj, "choose") and callable(obj) and _required_positional(obj) == 0:
        obj = obj()  # a factory
    if callable(getattr(obj, "choose", None)):
        return obj
    if callable(obj):
        if _required_positional(obj) not in (2, None):
            raise ValueError(f"dispatch policy {spec!r} must take (request, slots) and return a slot")
        return FunctionPolicy(obj, spec)
    raise ValueError(f"dispatch policy {spec!r} is neither a DispatchPolicy (with a choose method) "
                     f"nor a function (request, slots) -> slot")


def _required_positional(fn: Any) -> int | None:
    """How many positional arguments ``fn`` requires; None when it cannot tell (or *args)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    count = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            count += 1
    return count


__all__ = ["DispatchRequest", "DispatchPolicy", "RoundRobin", "LeastLoaded", "Mod", "FunctionPolicy",
           "BUILTIN_POLICIES", "load_policy", "routing_hash"]
