"""Worker processes: spawn, reap, restart at the same index, and stop them all.

gunicorn's arbiter, trimmed: a worker that dies is replaced at its index with its cores; a worker
that says it can never boot (EXIT_BOOT_ERROR, EXIT_MODEL_ERROR), does not become READY within
boot_timeout, or dies over and over is a fatal error for the whole server, never a restart loop.
The supervisor owns processes and restart history; slot state changes go through the WorkerTable.

With the default worker command, workers are forked from a zygote (sgserve/worker/zygote.py) that
has imported TensorFlow once, so that they share its pages instead of each importing it: about
55 MiB of private memory per worker instead of about 250 MiB (bench/RESULTS.md, section 8). The
kernel re-parents each forked worker to this process (a child subreaper), so it is this process's
child like a spawned one: ``ForkedWorker`` gives it Popen's interface. Workers wait (stay DEAD)
while the zygote imports; a zygote that cannot start, or dies too often, makes the supervisor run
the command itself instead. ``SGSERVE_WORKER_ZYGOTE=0`` turns the zygote off.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Iterable, Sequence

from sgserve.broker.worker_table import WorkerSlot, WorkerState, WorkerTable
from sgserve.config import ModelSpec, ServerConfig, WorkerSpec
from sgserve.process import EXIT_BOOT_ERROR, become_child_subreaper, child_env, describe_exit, never_restart_reason

log = logging.getLogger(__name__)

DEFAULT_WORKER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "sgserve.worker")
MAX_DEATHS = 5  # deaths of one index tolerated within DEATH_WINDOW seconds; one more is fatal
DEATH_WINDOW = 60.0
RESTART_BACKOFF_MAX = 2.0  # seconds; repeated deaths wait 0, 0.2, 0.4, ... before the restart
STOP_GRACE = 5.0  # seconds a worker has to exit after W_STOP before SIGTERM
TERM_GRACE = 2.0  # seconds after SIGTERM before SIGKILL
ZYGOTE_ENV = "SGSERVE_WORKER_ZYGOTE"  # "0": never fork workers from a zygote
ZYGOTE_COMMAND: tuple[str, ...] = (sys.executable, "-m", "sgserve.worker.zygote")
ZYGOTE_FORK_TIMEOUT = 10.0  # seconds a ready zygote may take to fork one worker
ZYGOTE_POLL = 0.05  # seconds between checks of a zygote that is still importing
ZYGOTE_MAX_STARTS = 3  # zygotes started in a server's life; after that, workers are plain processes

@dataclasses.dataclass
class Fatal:
    """Why the server must stop (a worker can never serve, or the broker broke), and the exit code
    ``Broker.run`` returns for it."""

    message: str
    exit_code: int = 1


def assign_cores(workers: int, cpus_per_worker: int, cpus: Sequence[int] | None = None,
                 allow_oversubscribe: bool = False) -> list[list[int]]:
    """Disjoint core sets, worker i gets the i-th run of ``cpus_per_worker`` usable cores."""
    if workers < 1 or cpus_per_worker < 1:
        raise ValueError(f"--workers and --cpus-per-worker must be at least 1, got {workers} and {cpus_per_worker}")
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cpus = list(cpus)
    need = workers * cpus_per_worker
    if need > len(cpus) and not allow_oversubscribe:
        raise ValueError(f"{workers} workers x {cpus_per_worker} cpus need {need} cores, but this machine has "
                         f"{len(cpus)} available to sgserve (cores {','.join(map(str, cpus))}); lower --workers "
                         f"or --cpus-per-worker, or pass --allow-oversubscribe to share cores between workers")
    return [[cpus[(i * cpus_per_worker + j) % len(cpus)] for j in range(cpus_per_worker)]
            for i in range(workers)]


class ForkedWorker:
    """A worker that the zygote forked and the kernel re-parented to this process (a child
    subreaper): the part of ``subprocess.Popen`` the supervisor and the broker use. It is our child,
    so its pid cannot be reused before ``poll`` reaps it, and signals before that reach it."""

    def __init__(self, pid: int, args: Sequence[str]) -> None:
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: as Popen does, call it a clean exit
                self.returncode = 0
            else:
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.005)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"ForkedWorker(pid={self.pid}, returncode={self.returncode})"


class ZygoteError(Exception):
    pass


class Zygote:
    """The supervisor's end of a worker zygote: started at once, ready once it says so."""

    def __init__(self, env: dict[str, str], ready_timeout: float) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen([*ZYGOTE_COMMAND, str(theirs.fileno()), str(os.getpid())], env=env,
                                         stdin=subprocess.DEVNULL, close_fds=True, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.sock.setblocking(False)
        self.pid = self.proc.pid
        self.deadline = time.monotonic() + ready_timeout
        self.ready = False
        self.error: str | None = None
        self._buf = b""
        self._token = 0

    def _read(self, timeout: float = 0.0) -> list[dict]:
        """The messages that arrived (waiting up to ``timeout`` s for the first); sets ``error`` on EOF."""
        if self.error is None and b"\n" not in self._buf:
            try:
                if select.select([self.sock], [], [], timeout)[0]:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        self.error = "closed its socket"
                    self._buf += chunk
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                self.error = f"socket error: {exc}"
        out = []
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def check(self, now: float) -> str:
        """"ready", "starting", or "failed" (then ``error`` says why)."""
        if self.error is None:
            for msg in self._read():
                if "ready" in msg:
                    self.ready = True
                elif "error" in msg:
                    self.error = f"could not preload TensorFlow: {msg['error']}"
        if self.error is None and self.proc.poll() is not None:
            self.error = f"exited ({describe_exit(self.proc.returncode)})"
        if self.error is None and not self.ready and now > self.deadline:
            self.error = "was not ready within --boot-timeout"
        if self.error is not None:
            return "failed"
        return "ready" if self.ready else "starting"

    def fork(self, argv: Sequence[str], timeout: float = ZYGOTE_FORK_TIMEOUT) -> int:
        """Asks the zygote to fork a worker with ``argv``; its pid (now our child)."""
        self._token += 1
        token = self._token
        line = json.dumps({"spawn": token, "argv": list(argv)}).encode() + b"\n"
        deadline = time.monotonic() + timeout
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(timeout)
            self.sock.sendall(line)
        except OSError as exc:
            raise ZygoteError(f"cannot reach it: {exc}") from None
        finally:
            self.sock.setblocking(False)
        while True:
            left = deadline - time.monotonic()
            for msg in self._read(max(0.0, left)):
                if msg.get("spawned") == token:
                    if "pid" in msg:
                        return int(msg["pid"])
                    raise ZygoteError(f"could not fork: {msg.get('error')}")
            if self.error is not None:
                raise ZygoteError(self.error)
            if time.monotonic() >= deadline:
                self.error = f"did not fork a worker within {timeout:g} s"
                raise ZygoteError(self.error)

    def close(self, grace: float = 2.0) -> None:
        """Closing the socket makes it exit; SIGKILL after ``grace`` seconds."""
        try:
            self.sock.close()
        except OSError:
            pass
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                log.error("worker zygote pid %d survived SIGKILL", self.proc.pid)


_STARTING = object()  # _zygote_for_spawn: the zygote is still importing; try again shortly


class Supervisor:
    """Starts worker processes at table slots and decides what a death means."""

    def __init__(self, config: ServerConfig,
                 models: Callable[[int], Sequence[ModelSpec]], table: WorkerTable, *,
                 backend_endpoint: str, server_id: str, command: Sequence[str] | None = None) -> None:
        self.config = config
        self.table = table
        self.backend_endpoint = backend_endpoint
        self.server_id = server_id
        self.command = list(command) if command else list(DEFAULT_WORKER_COMMAND)
        # What a worker started now must load: the versions it will serve (they change over time).
        self._models = models
        self._env = child_env()
        self._procs: set[subprocess.Popen] = set()  # every process spawned and not yet reaped
        self._deaths: dict[int, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._restart_at: dict[int, float] = {}
        self.stopping = False  # set by the broker when it stops: deaths are no longer restarted
        # Only the default command forks its workers from a zygote; a custom one runs as given.
        self._use_zygote = (command is None and os.environ.get(ZYGOTE_ENV, "1") != "0"
                            and sys.platform.startswith("linux"))
        self._zygote: Zygote | None = None
        self._zygote_starts = 0

    def worker_spec(self, slot: WorkerSlot) -> WorkerSpec:
        return WorkerSpec(
            index=slot.index,
            cores=list(slot.cores),
            backend=self.backend_endpoint,
            models=[m.to_dict() for m in self._models(slot.index)],
            intra_op_threads=self.config.intra_threads(),
            inter_op_threads=self.config.inter_threads(),
            heartbeat_interval=self.config.heartbeat_interval,
            split_check=self.config.split_min_rows > 0,
            server_id=self.server_id,
            warmup=self.config.enable_model_warmup,
            warmup_file=self.config.warmup_file,
            batching=self.config.batching_parameters,
        )

    def spawn(self, slot: WorkerSlot, now: float | None = None) -> Fatal | None:
        if self._use_zygote:
            t = time.monotonic() if now is None else now
            zygote = self._zygote_for_spawn(t)
            if zygote is _STARTING:  # the slot stays DEAD until the zygote has imported TensorFlow
                self._restart_at[slot.index] = t + ZYGOTE_POLL
                return None
            if isinstance(zygote, Zygote):
                spec = self.worker_spec(slot).to_json()
                try:
                    pid = zygote.fork([spec])
                except ZygoteError as exc:
                    log.warning("worker zygote (pid %d) %s; starting worker %d as its own process",
                                zygote.pid, exc, slot.index)
                    self._drop_zygote()
                else:
                    proc = ForkedWorker(pid, [*ZYGOTE_COMMAND, spec])
                    self._procs.add(proc)
                    self.table.spawned(slot, proc, now)
                    log.info("worker %d: forked pid %d from the zygote on cores %s%s", slot.index, pid,
                             slot.cores, f" (restart {slot.restarts})" if slot.restarts else "")
                    return None
        argv = [*self.command, self.worker_spec(slot).to_json()]
        try:
            proc = subprocess.Popen(argv, env=self._env, stdin=subprocess.DEVNULL, close_fds=True,
                                    start_new_session=False)
        except OSError as exc:
            return Fatal(f"cannot start worker {slot.index} ({self.command[0]!r}): {exc}",
                                 EXIT_BOOT_ERROR)
        self._procs.add(proc)
        self.table.spawned(slot, proc, now)
        log.info("worker %d: spawned pid %d on cores %s%s", slot.index, proc.pid, slot.cores,
                 f" (restart {slot.restarts})" if slot.restarts else "")
        return None

    def _zygote_for_spawn(self, now: float) -> Zygote | object | None:
        """The ready zygote, _STARTING while it imports, or None: run the command instead."""
        z = self._zygote
        if z is not None:
            state = z.check(now)
            if state == "ready":
                return z
            if state == "starting":
                return _STARTING
            was_ready = z.ready
            log.warning("worker zygote (pid %d) %s; %s", z.pid, z.error,
                        "starting another" if was_ready and self._zygote_starts < ZYGOTE_MAX_STARTS
                        else "starting workers as their own processes from now on")
            self._drop_zygote()
            if not was_ready:  # it could not import what a worker imports: a worker would fail alike
                self._use_zygote = False
                return None
        if self._zygote_starts >= ZYGOTE_MAX_STARTS:
            self._use_zygote = False
            return None
        if not become_child_subreaper():
            log.info("cannot become a child subreaper (PR_SET_CHILD_SUBREAPER); workers are not forked "
                     "from a zygote")
            self._use_zygote = False
            return None
        try:
            self._zygote = Zygote(self._env, self.config.boot_timeout)
        except OSError as exc:
            log.warning("cannot start the worker zygote: %s; starting workers as their own processes", exc)
            self._use_zygote = False
            return None
        self._zygote_starts += 1
        log.info("worker zygote: pid %d imports TensorFlow once; the workers are forked from it",
                 self._zygote.pid)
        return _STARTING

    def _drop_zygote(self) -> None:
        if self._zygote is not None:
            z, self._zygote = self._zygote, None
            z.close(grace=0.5)

    def start_all(self) -> Fatal | None:
        for slot in self.table:
            failure = self.spawn(slot)
            if failure is not None:
                return failure
        return None

    def reap(self) -> list[tuple[WorkerSlot, int]]:
        """(slot, exit code) for each worker process that exited since the last call."""
        exited = []
        for slot in self.table:
            proc = slot.process
            if proc is not None:
                rc = proc.poll()
                if rc is not None:
                    self._procs.discard(proc)
                    self.table.process_gone(slot)
                    exited.append((slot, rc))
        return exited

    def on_exit(self, slot: WorkerSlot, rc: int, now: float) -> Fatal | None:
        """Schedules a restart at the same index, or says why the server must stop instead."""
        what = f"worker {slot.index} (pid {slot.pid})"
        if self.stopping:
            log.info("%s exited (%s) while the server stops", what, describe_exit(rc))
            return None
        if never_restart_reason(rc):
            return Fatal(f"{what} exited with code {rc}: {never_restart_reason(rc)}; not restarting it "
                                 f"(see the worker's log above)", rc)
        deaths = self._deaths[slot.index]
        deaths.append(now)
        while deaths and now - deaths[0] > DEATH_WINDOW:
            deaths.popleft()
        if len(deaths) > MAX_DEATHS:
            return Fatal(f"{what} died {len(deaths)} times in {DEATH_WINDOW:.0f} s (last: "
                                 f"{describe_exit(rc)}); giving up rather than restarting it in a loop")
        delay = 0.0 if len(deaths) <= 1 else min(0.1 * 2 ** (len(deaths) - 1), RESTART_BACKOFF_MAX)
        log.warning("%s exited (%s); restarting it%s", what, describe_exit(rc),
                    f" in {delay:.1f} s" if delay else "")
        self._restart_at[slot.index] = now + delay
        return None

    def restart_due(self, now: float) -> Fatal | None:
        for index, when in list(self._restart_at.items()):
            if now >= when:
                del self._restart_at[index]
                slot = self.table.get(index)
                if slot is not None and slot.state is WorkerState.DEAD and slot.process is None:
                    failure = self.spawn(slot, now)
                    if failure is not None:
                        return failure
        return None

    def boot_overdue(self, now: float) -> Fatal | None:
        for slot in self.table.overdue(now, self.config.boot_timeout):
            self.kill(slot)
            return Fatal(f"worker {slot.index} (pid {slot.pid}) was not READY within "
                                 f"{self.config.boot_timeout:g} s (--boot-timeout); stopping", EXIT_BOOT_ERROR)
        return None

    def kill(self, slot: WorkerSlot) -> None:
        """SIGKILL for a hung or silent worker; the next reap() sees it exit and restarts it."""
        proc = slot.process
        if proc is not None and proc.poll() is None:
            try:
                proc.kill()
            except OSError:
                pass

    def stop_all(self, grace: float = STOP_GRACE, term_grace: float = TERM_GRACE) -> None:
        """Waits for every worker to exit (the broker has sent W_STOP), then SIGTERM, then SIGKILL.

        Workers still booting cannot hear W_STOP, so they get SIGTERM at once.
        """
        self.stopping = True
        self._restart_at.clear()
        procs = set(self._procs)
        for slot in self.table:
            if slot.process is not None:
                procs.add(slot.process)
                if slot.state is WorkerState.STARTING or slot.identity is None:
                    _signal(slot.process, signal.SIGTERM)
        alive = _wait(procs, grace)
        for proc in alive:
            log.warning("worker pid %d did not exit %.1f s after W_STOP; sending SIGTERM", proc.pid, grace)
            _signal(proc, signal.SIGTERM)
        alive = _wait(alive, term_grace)
        for proc in alive:
            log.warning("worker pid %d ignored SIGTERM; sending SIGKILL", proc.pid)
            _signal(proc, signal.SIGKILL)
        for proc in alive:
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                log.error("worker pid %d survived SIGKILL", proc.pid)
        for slot in self.table:
            self.table.process_gone(slot)
        self._procs.clear()
        self._drop_zygote()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except OSError:
            pass


def _wait(procs: Iterable[subprocess.Popen], timeout: float) -> list[subprocess.Popen]:
    """The processes still running after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if p.poll() is None]
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = [p for p in alive if p.poll() is None]
    return alive
