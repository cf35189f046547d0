"""Hang detection that tells a stopped or stuck worker from a starved one.

The silence rule (an idle worker heard nothing from for heartbeat interval x liveness) and
--worker-timeout (a request held 30 s) stay in the routing core. What they cannot see is a worker
that holds a request and is stopped (SIGSTOP) or stuck: it cannot heartbeat during a request, so
before this module it was replaced only after --worker-timeout. The rule (docs/architecture.md
section 6):

- **The broker's own gaps do not count.** A tick that comes more than ``LATE_SLACK`` s after it was
  due means the broker's loop did not run (not scheduled, or blocked): it heard nothing in that
  time, so that time counts against no worker (``WorkerTable.forgive``, and this module's clock).
- **Suspects.** A READY worker heard nothing from for half a heartbeat interval while it holds a
  request (1.5 intervals while idle: it heartbeats) is probed every ``probe_interval`` s: one read
  of /proc/PID/stat (psutil) gives its run state and its CPU time (user + system, all threads).
  Nobody else is probed, and nothing happens per request.
- **Signs of life.** CPU time that advanced since the last probe, a runnable (R: waiting for a
  core) or disk-sleeping (D: waiting for I/O) main thread, or a main thread that waited for a core
  since the last probe (its run delay, /proc/PID/schedstat). A worker that shows them is busy or
  starved, not hung.
- **Starved idle workers.** An idle worker whose main thread spent at least half the time since the
  last probe waiting for a core could not run to heartbeat: it is vouched for
  (``WorkerTable.vouch``), so the silence rule spares it. Merely using some CPU is not enough (a
  worker that runs but whose heartbeats do not arrive must still expire).
- **Hung.** A suspect holding a request that shows no sign of life for ``hang_timeout`` s of the
  broker's time (stopped: state T/t, or asleep with its CPU time still) is reported, unless one of
  its threads is runnable at that moment. The broker kills it; its requests are retried elsewhere.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import psutil

from sgserve.broker.worker_table import WorkerSlot, WorkerTable

log = logging.getLogger(__name__)

LATE_SLACK = 0.2  # seconds a tick may come after it was due before the gap counts as the broker's own
LIVE_STATES = frozenset((psutil.STATUS_RUNNING, psutil.STATUS_DISK_SLEEP))  # waiting for the machine
STOPPED_STATES = frozenset((psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP))


@dataclasses.dataclass
class _Probe:
    """What the last probe of one suspect saw; dropped when the worker is heard from."""

    process: psutil.Process
    heard: float  # the slot's last_seen when the suspicion began: a new message ends it
    cpu: float  # user + system seconds, all threads
    waited: float  # seconds the main thread has waited for a core (run delay), in total
    at: float  # monotonic time of this probe
    still_since: float  # the watchdog's clock at the last sign of life (or the first probe)


class Watchdog:
    """Probes suspects each ``check`` and names the hung ones; see the module docstring.

    ``tick`` is the broker loop's tick interval (when the next check is due); ``hang_timeout`` 0
    turns hang detection off but keeps the gap accounting (the silence rule still uses it).
    """

    def __init__(self, table: WorkerTable, *, hang_timeout: float, heartbeat_interval: float, tick: float) -> None:
        self.table = table
        self.hang_timeout = hang_timeout
        self.busy_after = heartbeat_interval / 2  # a busy worker cannot heartbeat: probing it is cheap
        self.idle_after = heartbeat_interval * 1.5  # an idle one does; later than that, it looks dead
        self.tick = tick
        self.probe_interval = min(0.25, max(tick, hang_timeout / 8 if hang_timeout > 0 else 0.25))
        self._probes: dict[int, _Probe] = {}
        self._last: float | None = None
        self._next_probe = 0.0
        self.absent = 0.0  # seconds the broker's loop did not run, in total
        self.late_ticks = 0
        self.max_gap = 0.0
        self.probes = 0  # /proc reads so far
        self.hangs = 0  # workers reported hung so far

    def clock(self, now: float) -> float:
        """The broker's own time: monotonic time less the gaps when its loop did not run."""
        return now - self.absent

    def check(self, now: float) -> list[tuple[WorkerSlot, str]]:
        """(slot, why) for each hung worker; call once per broker tick, before the core's tick."""
        self._account_gap(now)
        if now < self._next_probe:
            return []
        self._next_probe = now + self.probe_interval
        hung, suspects = [], set()
        for slot in self.table.suspects(now, self.busy_after, self.idle_after):
            suspects.add(slot.index)
            why = self._probe(slot, now)
            if why is not None:
                hung.append((slot, why))
        for index in [i for i in self._probes if i not in suspects]:
            del self._probes[index]  # heard from, dead or gone: the suspicion is over
        return hung

    def _account_gap(self, now: float) -> None:
        last, self._last = self._last, now
        if last is None:
            return
        gap = now - last
        self.max_gap = max(self.max_gap, gap)
        late = gap - self.tick
        if late > LATE_SLACK:
            self.absent += late
            self.late_ticks += 1
            self.table.forgive(late, now)
            for index, probe in self._probes.items():  # forgiving moved last_seen: the same suspicion
                slot = self.table.get(index)
                if slot is not None:
                    probe.heard = slot.last_seen
            log.info("broker loop did not run for %.2f s; that time counts against no worker", late)

    def _probe(self, slot: WorkerSlot, now: float) -> str | None:
        """Reads one suspect; a reason when it is hung."""
        probe = self._probes.get(slot.index)
        if probe is None or probe.process.pid != slot.pid or probe.heard != slot.last_seen:
            try:
                process = psutil.Process(slot.pid)
            except psutil.Error:
                return None  # gone: the supervisor reaps it
            probe = None
        else:
            process = probe.process
        sample = _sample(process)
        self.probes += 1
        if sample is None:
            self._probes.pop(slot.index, None)
            return None
        state, cpu, waited = sample
        clock = self.clock(now)
        if probe is None:
            self._probes[slot.index] = _Probe(process, slot.last_seen, cpu, waited, now, clock)
            return None
        starved = waited - probe.waited >= 0.5 * (now - probe.at)
        alive = cpu > probe.cpu or waited > probe.waited or state in LIVE_STATES
        probe.cpu, probe.waited, probe.at = cpu, waited, now
        if not slot.inflight:
            if starved:
                self.table.vouch(slot, now)
            return None
        if alive:
            probe.still_since = clock
            return None
        still = clock - probe.still_since
        if self.hang_timeout <= 0 or still < self.hang_timeout:
            return None
        if state not in STOPPED_STATES and _any_thread_runnable(process):
            probe.still_since = clock  # one thread waits for a core: starved, not hung
            return None
        self.hangs += 1
        what = "is stopped (SIGSTOP or a debugger)" if state in STOPPED_STATES else "used no CPU"
        return (f"{what} for {still:.1f} s while holding {len(slot.inflight)} request(s), with no reply "
                f"(--hang-timeout {self.hang_timeout:g} s)")

    def status(self) -> dict[str, Any]:
        """For the status request: what the watchdog has seen of the broker and the workers."""
        return {"hang_timeout": self.hang_timeout, "broker_absent_s": round(self.absent, 3),
                "late_ticks": self.late_ticks, "max_tick_gap_s": round(self.max_gap, 3),
                "probes": self.probes, "hangs": self.hangs, "suspects": sorted(self._probes)}


def _sample(process: psutil.Process) -> tuple[str, float, float] | None:
    """(run state, CPU seconds, main thread's run delay in seconds) from /proc/PID/stat and
    /proc/PID/schedstat; None when it is gone or a zombie. Without schedstat the delay reads 0."""
    try:
        with process.oneshot():
            state = process.status()
            times = process.cpu_times()
    except psutil.Error:
        return None
    if state in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        return None
    try:
        with open(f"/proc/{process.pid}/schedstat", "rb") as f:
            waited = int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        waited = 0.0
    return state, times.user + times.system, waited


def _any_thread_runnable(process: psutil.Process) -> bool:
    """True when a thread of ``process`` is runnable or in disk sleep (read once, at a verdict)."""
    try:
        threads = process.threads()
    except psutil.Error:
        return False
    for thread in threads:
        try:
            if psutil.Process(thread.id).status() in LIVE_STATES:
                return True
        except psutil.Error:
            continue
    return False


__all__ = ["Watchdog", "LATE_SLACK"]
