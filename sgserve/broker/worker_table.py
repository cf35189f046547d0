"""The broker's view of its workers: one WorkerSlot per index, owned by one WorkerTable.

Only WorkerTable's methods change a slot, so the invariants (a request id is in flight on exactly
one slot; the free list holds exactly the READY slots with capacity) live in one place. Everyone
else, dispatch policies included, reads slots and never writes them.
"""
from __future__ import annotations

import bisect
import dataclasses
import enum
import subprocess
import time
from typing import TYPE_CHECKING, Hashable, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    from sgserve.broker.policies import DispatchRequest



class WorkerState(str, enum.Enum):
    STARTING = "STARTING"  # process spawned, READY not received yet
    READY = "READY"  # connected and serving
    DEAD = "DEAD"  # exited, expired or hung; waiting for the supervisor to replace it


@dataclasses.dataclass(eq=False)
class WorkerSlot:
    """One worker index. The slot outlives its processes: a restart reuses index and cores."""

    index: int
    cores: list[int]
    identity: bytes | None = None  # the worker's DEALER identity, f"w{index}-{pid}"
    pid: int | None = None
    process: subprocess.Popen | None = None
    state: WorkerState = WorkerState.DEAD
    inflight: dict[Hashable, "DispatchRequest"] = dataclasses.field(default_factory=dict)
    served: int = 0
    restarts: int = 0
    last_seen: float = 0.0  # monotonic time of the worker's last message of any kind
    last_progress: float = 0.0  # monotonic time of its last reply (or READY): hang detection
    vouched_at: float = 0.0  # the watchdog last saw this silent idle worker alive (runnable or using CPU)
    started_at: float = 0.0  # monotonic time the current process was spawned
    spawned: int = 0  # processes started at this index so far
    loading: bool = False  # out of rotation while it maps and warms a model version (rolling update)
    # Model versions, as (name, version). Only WorkerTable's methods change these; the broker's
    # rollout coordinator (rollout.py) calls them.
    versions: set[tuple[str, int]] = dataclasses.field(default_factory=set)  # mapped by its process
    booting: set[tuple[str, int]] = dataclasses.field(default_factory=set)  # spawned with, until READY
    loading_version: tuple[str, int] | None = None  # W_LOAD sent, LOADED not received yet
    unloading_version: tuple[str, int] | None = None  # W_UNLOAD sent, UNLOADED not received yet
    change_sent_at: float = 0.0  # monotonic time that W_LOAD or W_UNLOAD was sent

    @property
    def load(self) -> int:
        return len(self.inflight)

    def describe(self) -> str:
        return f"worker {self.index} (pid {self.pid})"


class WorkerTable:
    """All worker slots, the request-id index and the free list.

    ``free()`` is maintained incrementally (not recomputed per request), sorted by index, so
    dispatch costs no per-request scan of the table beyond what the policy itself does.
    """

    def __init__(self, size: int, pipeline: int) -> None:
        if size < 1:
            raise ValueError(f"a server needs at least one worker, got {size}")
        if pipeline < 1:
            raise ValueError(f"worker_pipeline must be at least 1, got {pipeline}")
        self.size = size
        self.pipeline = pipeline
        self._slots: list[WorkerSlot | None] = [None] * size
        self._by_identity: dict[bytes, WorkerSlot] = {}
        self._by_rid: dict[Hashable, WorkerSlot] = {}
        self._free: list[WorkerSlot] = []
        self._free_view: tuple[WorkerSlot, ...] | None = ()

    # -- reading -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[WorkerSlot]:
        return (s for s in self._slots if s is not None)

    def __len__(self) -> int:
        return sum(1 for s in self._slots if s is not None)

    def get(self, index: int) -> WorkerSlot | None:
        if 0 <= index < self.size:
            return self._slots[index]
        return None

    def by_identity(self, identity: bytes) -> WorkerSlot | None:
        return self._by_identity.get(identity)

    def free(self) -> Sequence[WorkerSlot]:
        """READY slots with capacity, sorted by index (a tuple: policies cannot edit it)."""
        view = self._free_view
        if view is None:
            view = self._free_view = tuple(self._free)
        return view

    def has_capacity(self, slot: WorkerSlot) -> bool:
        return slot.state is WorkerState.READY and not slot.loading and len(slot.inflight) < self.pipeline

    def inflight_count(self) -> int:
        return len(self._by_rid)

    def all_ready(self) -> bool:
        return all(s is not None and s.state is WorkerState.READY for s in self._slots)

    def expired(self, now: float, silence: float) -> list[WorkerSlot]:
        """Idle connected workers that have said nothing for ``silence`` seconds, and that the
        watchdog has not seen alive (starved, not dead) in that time either."""
        return [s for s in self if s.state is WorkerState.READY
                and not s.inflight and now - max(s.last_seen, s.vouched_at) > silence]

    def suspects(self, now: float, busy_after: float, idle_after: float) -> list[WorkerSlot]:
        """Connected workers silent for ``busy_after`` seconds while they hold a request, or for
        ``idle_after`` while idle (an idle worker heartbeats): the watchdog probes them."""
        return [s for s in self if s.state is WorkerState.READY
                and now - s.last_seen > (busy_after if s.inflight else idle_after)]

    def hung(self, now: float, timeout: float) -> list[WorkerSlot]:
        """Workers holding requests that made no progress for ``timeout`` seconds.

        Progress is a reply; the clock starts at the later of the last reply and the dispatch of the
        oldest request held, so a request queued behind a slow one is not counted twice.
        """
        out = []
        for s in self:
            if s.inflight and s.state is not WorkerState.DEAD:
                oldest = next(iter(s.inflight.values()))
                if now - max(oldest.sent_at, s.last_progress) > timeout:
                    out.append(s)
        return out

    def overdue(self, now: float, boot_timeout: float) -> list[WorkerSlot]:
        """Workers still STARTING ``boot_timeout`` seconds after their spawn."""
        return [s for s in self if s.state is WorkerState.STARTING and now - s.started_at > boot_timeout]

    # -- lifecycle ---------------------------------------------------------------------------
    def add(self, index: int, cores: list[int]) -> WorkerSlot:
        if not 0 <= index < self.size:
            raise ValueError(f"worker index {index} is outside 0..{self.size - 1}")
        if self._slots[index] is not None:
            raise ValueError(f"worker index {index} already has a slot")
        slot = WorkerSlot(index=index, cores=list(cores))
        self._slots[index] = slot
        return slot

    def spawned(self, slot: WorkerSlot, process: subprocess.Popen, now: float | None = None) -> None:
        """A new process now runs at this slot's index; it is STARTING until it says READY."""
        if slot.state is not WorkerState.DEAD:
            raise ValueError(f"worker {slot.index} is {slot.state.value}; only a DEAD slot can be respawned")
        now = time.monotonic() if now is None else now
        if slot.spawned:
            slot.restarts += 1
        slot.spawned += 1
        slot.process = process
        slot.pid = process.pid
        slot.identity = None
        slot.state = WorkerState.STARTING
        slot.started_at = now
        slot.last_seen = now
        slot.last_progress = now

    def mark_ready(self, slot: WorkerSlot, identity: bytes, pid: int, now: float) -> None:
        if slot.state is not WorkerState.STARTING:
            raise ValueError(f"worker {slot.index} is {slot.state.value}, not STARTING")
        slot.identity = identity
        slot.pid = pid
        slot.state = WorkerState.READY
        slot.versions, slot.booting = slot.booting, set()  # a worker maps what it was spawned with
        slot.loading_version = slot.unloading_version = None
        slot.last_seen = now
        slot.last_progress = now
        self._by_identity[identity] = slot
        self._set_free(slot)

    def seen(self, slot: WorkerSlot, now: float) -> None:
        slot.last_seen = now

    def mark_busy(self, slot: WorkerSlot, request: "DispatchRequest") -> None:
        """Records that ``slot`` now holds ``request`` (the broker has just sent it)."""
        if not self.has_capacity(slot):
            raise ValueError(f"worker {slot.index} cannot take a request: {slot.state.value}, "
                             f"{len(slot.inflight)} of {self.pipeline} in flight")
        slot.inflight[request.rid] = request
        self._by_rid[request.rid] = slot
        if len(slot.inflight) >= self.pipeline:
            self._set_free(slot)

    def mark_idle(self, rid: Hashable, identity: bytes, now: float) -> "DispatchRequest | None":
        """The request ``rid`` came back from the worker ``identity``; None when it is not ours.

        A reply for an unknown id (a request already failed over, or one from a worker we declared
        dead) is dropped by the caller.
        """
        slot = self._by_rid.get(rid)
        if slot is None or slot.identity != identity:
            return None
        del self._by_rid[rid]
        request = slot.inflight.pop(rid)
        slot.served += 1
        slot.last_seen = now
        slot.last_progress = now
        if len(slot.inflight) == self.pipeline - 1:
            self._set_free(slot)
        return request

    def vouch(self, slot: WorkerSlot, now: float) -> None:
        """The watchdog saw this silent worker alive (starved, not dead): the silence rule waits."""
        slot.vouched_at = now

    def forgive(self, seconds: float, now: float) -> None:
        """The broker's loop did not run for ``seconds``: it heard nothing then, so that time counts
        against no worker. Moves each worker's silence and progress clocks forward (never past now)."""
        for slot in self:
            if slot.state is WorkerState.DEAD:
                continue
            slot.last_seen = min(now, slot.last_seen + seconds)
            progress = slot.last_progress
            if slot.inflight:
                progress = max(progress, next(iter(slot.inflight.values())).sent_at)
            slot.last_progress = min(now, progress + seconds)

    def set_loading(self, slot: WorkerSlot, loading: bool) -> None:
        """Takes a worker out of rotation while it loads a version, or puts it back."""
        slot.loading = loading
        self._set_free(slot)

    # -- model versions on workers -------------------------------------------------------------
    def spawning_with(self, slot: WorkerSlot, versions: Iterable[tuple[str, int]]) -> None:
        """The process about to start at this slot loads ``versions`` at boot."""
        slot.booting = set(versions)

    def start_loading(self, slot: WorkerSlot, key: tuple[str, int], now: float, out_of_rotation: bool) -> None:
        """W_LOAD was sent; out of rotation until LOADED when others can serve meanwhile."""
        slot.loading_version = key
        slot.change_sent_at = now
        if out_of_rotation:
            self.set_loading(slot, True)

    def finish_loading(self, slot: WorkerSlot, loaded: bool) -> None:
        """LOADED arrived (or the load was given up): back in rotation, with the version if ``loaded``."""
        if loaded and slot.loading_version is not None:
            slot.versions.add(slot.loading_version)
        slot.loading_version = None
        self.set_loading(slot, False)

    def start_unloading(self, slot: WorkerSlot, key: tuple[str, int], now: float, out_of_rotation: bool) -> None:
        slot.unloading_version = key
        slot.change_sent_at = now
        if out_of_rotation:
            self.set_loading(slot, True)

    def finish_unloading(self, slot: WorkerSlot, key: tuple[str, int]) -> None:
        """The worker no longer maps ``key`` (UNLOADED, or it stopped answering about it)."""
        slot.versions.discard(key)
        if slot.unloading_version == key:
            slot.unloading_version = None
            self.set_loading(slot, False)

    def forget_version(self, slot: WorkerSlot, key: tuple[str, int]) -> None:
        """Counts ``key`` as gone from a worker that cannot be told to drop it (dead, unreachable)."""
        slot.versions.discard(key)

    def mark_dead(self, slot: WorkerSlot) -> list["DispatchRequest"]:
        """Takes the slot out of service; returns the requests it held, for the caller to fail over."""
        orphans = list(slot.inflight.values())
        for rid in slot.inflight:
            self._by_rid.pop(rid, None)
        slot.inflight.clear()
        if slot.identity is not None:
            self._by_identity.pop(slot.identity, None)
        slot.state = WorkerState.DEAD
        slot.loading = False
        slot.versions, slot.booting = set(), set()  # whatever it held or was loading, it has no more
        slot.loading_version = slot.unloading_version = None
        self._set_free(slot)
        return orphans

    def process_gone(self, slot: WorkerSlot) -> None:
        """The slot's process was reaped; the slot keeps its pid for the record."""
        slot.process = None

    def remove(self, index: int) -> WorkerSlot:
        """Forgets a slot entirely (its requests must have been failed over first)."""
        slot = self._slots[index]
        if slot is None:
            raise ValueError(f"worker index {index} has no slot")
        if slot.state is not WorkerState.DEAD:
            self.mark_dead(slot)
        self._slots[index] = None
        return slot

    # -- the free list -----------------------------------------------------------------------
    def _set_free(self, slot: WorkerSlot) -> None:
        """Puts ``slot`` in or out of the free list to match its state and load."""
        want = self.has_capacity(slot)
        pos = bisect.bisect_left(self._free, slot.index, key=_index)
        present = pos < len(self._free) and self._free[pos] is slot
        if want and not present:
            self._free.insert(pos, slot)
            self._free_view = None
        elif present and not want:
            del self._free[pos]
            self._free_view = None


def _index(slot: WorkerSlot) -> int:
    return slot.index
