"""The broker: one process, two ROUTER sockets, the routing core, a supervisor and the model manager.

Clients talk to the frontend; workers connect DEALERs to the backend and announce READY. The
request path lives in core.RoutingCore (frames in, frames out, no sockets); this module is the
socket loop around it, in the shape of the ZeroMQ guide's load-balancing broker with Paranoid
Pirate heartbeats:

    poll -> route (the core) -> purge expired (the core's tick) -> send heartbeats -> supervise

It also answers what is not routing: status, metadata, pin/unpin and shutdown requests, worker
READY / LOADED / UNLOADED messages, and stopping.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import msgpack
import psutil
import zmq

from sgserve.auth import FrontendSecurity
from sgserve.broker.core import RoutingCore
from sgserve.broker.fair_queue import gateway_identity_prefix
from sgserve.models.manager import ModelManager
from sgserve.broker.policies import DispatchPolicy, load_policy
from sgserve.broker.rollout import Rollout
from sgserve.broker.supervisor import STOP_GRACE, Fatal, Supervisor, assign_cores
from sgserve.broker.watchdog import Watchdog
from sgserve.broker.worker_table import WorkerSlot, WorkerState, WorkerTable
from sgserve.config import ServerConfig
from sgserve.process import EXIT_CONFIG_ERROR
from sgserve.errors import InvalidArgument
from sgserve.frontdoor.launcher import FrontDoor
from sgserve.models.tfs_config import ModelConfigError
from sgserve.protocol import (METADATA, METRICS, PIN, PING, RELOAD_CONFIG, SHUTDOWN, STATUS, UNPIN, W_HEARTBEAT,
                              W_LOADED, W_READY, W_STOP, W_UNLOADED, recv_frames, send_frames)

log = logging.getLogger(__name__)

BATCH = 256  # messages read from one socket per poll wake-up, so neither side starves the other
DROP_LOG_INTERVAL = 5.0  # seconds between warnings about replies dropped for clients that do not read
FINAL_LINGER_MS = 200  # frontend linger at close: long enough to flush the last 503s, bounded
_NOBLOCK = int(zmq.NOBLOCK)
_READY, _LOADED, _UNLOADED = W_READY[0], W_LOADED[0], W_UNLOADED[0]


class BindError(OSError):
    """The frontend or backend endpoint cannot be bound (port in use, bad address)."""


class Broker:
    """Routes client requests to worker processes; see the module docstring.

    Both sockets are bound in ``__init__``, so a port in use raises BindError before any worker
    is spawned. ``run()`` blocks until a stop and always leaves no worker process behind.
    """

    def __init__(self, config: ServerConfig, manager: ModelManager, *,
                 server_id: str, backend_endpoint: str, worker_command: list[str] | None = None,
                 on_ready: Callable[[], None] | None = None,
                 cores: Sequence[Sequence[int]] | None = None,
                 policy: DispatchPolicy | None = None, front_door: FrontDoor | None = None) -> None:
        """``manager`` owns the model versions; the broker closes it when ``run()`` returns.
        ``front_door``: the gRPC/REST gateway processes, started once every worker is READY (so the
        ports open when the server can serve, as TF Serving's do), supervised and stopped here."""
        self.config = config
        self.server_id = server_id
        self.on_ready = on_ready
        self.fatal_error: str | None = None
        self.policy: DispatchPolicy = policy if policy is not None else load_policy(config.policy)
        self.table = WorkerTable(config.workers, config.worker_pipeline)
        self.manager = manager
        self.front_door = front_door
        if cores is None:
            cores = assign_cores(config.workers, config.cpus_per_worker,
                                 allow_oversubscribe=config.allow_oversubscribe)
        if len(cores) != config.workers:
            raise ValueError(f"{len(cores)} core sets given for {config.workers} workers")
        for index, worker_cores in enumerate(cores):
            self.table.add(index, list(worker_cores))
        bind = getattr(self.policy, "bind", None)
        if callable(bind):
            bind(self.table)

        self._ctx = zmq.Context()
        self.frontend: zmq.Socket | None = None
        self.backend: zmq.Socket | None = None
        self.security: FrontendSecurity | None = None
        try:
            self.security = FrontendSecurity(config, self._ctx)  # CURVE and the admin rule (sgserve/auth.py)
            self.frontend = self._bind(config.endpoint, "frontend (--endpoint)", self._setup_frontend)
            self.backend = self._bind(backend_endpoint, "backend")
            self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished worker raises, not drops
        except BaseException:
            self.close()
            raise
        self.endpoint: str = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        if front_door is not None:
            front_door.connect_to(self.endpoint)
            if self.security.curve:  # the gateways' own key, made now in the 0700 runtime directory
                key_dir = os.path.dirname(backend_endpoint[len("ipc://"):])
                self.security.trust_admin(front_door.use_curve(self.security.public, key_dir))
        self.backend_endpoint: str = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.core = RoutingCore(config, self.table, self.policy, resolve=self.manager.resolve,
                                to_client=self._send_client, to_worker=self._send_worker, admin=self._admin,
                                on_control=self._on_control, on_lost=self._on_lost,
                                split_verdict=self.manager.split_verdict, served=self.manager.is_served,
                                admin_rule=self.security.rule,
                                gateway_prefix=gateway_identity_prefix() if front_door is not None else None)
        self.rollout = Rollout(config, self.table, self.manager, send=self._send_worker,
                               requests_for=self.core.requests_for)
        self.supervisor = Supervisor(config, self.rollout.specs_for_spawn, self.table,
                                     backend_endpoint=self.backend_endpoint,
                                     server_id=server_id, command=worker_command)
        self._stop_requested = False
        self._stopping = False
        self._drain_until = math.inf
        self._exit_code = 0
        self._announced_ready = False
        self._ran = False
        self.dropped_replies = {"unread": 0, "gone": 0}  # replies to a client whose queue was full / gone
        self._next_drop_log = 0.0
        self._started_at = time.monotonic()
        self._next_heartbeat = 0.0
        self._tick = max(0.005, min(0.05, config.heartbeat_interval / 4))
        self._silence = config.heartbeat_interval * config.heartbeat_liveness
        self.watchdog = Watchdog(self.table, hang_timeout=config.hang_timeout,
                                 heartbeat_interval=config.heartbeat_interval, tick=self._tick)

    # -- public --------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Begins a graceful stop. Safe in a signal handler: it only sets a flag the loop reads."""
        self._stop_requested = True

    def run(self) -> int:
        """Serves until stopped; 0 on a clean stop, non-zero with ``fatal_error`` set otherwise."""
        if self._ran:
            raise RuntimeError("Broker.run() can only be called once")
        self._ran = True
        self._started_at = time.monotonic()
        try:
            failure = self.supervisor.start_all()
            if failure is not None:
                self._fatal(failure)
            self._loop()
        except Exception as exc:  # noqa: BLE001 - the broker must stop cleanly on its own bugs too
            log.exception("broker loop failed")
            self._fatal(Fatal(f"internal error in the broker: {type(exc).__name__}: {exc}", 1))
        finally:
            self._shutdown()
            self.manager.close()
        return self._exit_code

    def close(self) -> None:
        """Closes the sockets; for a Broker whose run() was never called (run() closes itself)."""
        for name, linger in (("frontend", FINAL_LINGER_MS), ("backend", 0)):
            sock = getattr(self, name)
            if sock is not None:
                endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                sock.close(linger=linger)
                setattr(self, name, None)
                _remove_ipc_file(endpoint)
        if self.security is not None:
            self.security.close()  # its ZAP socket must go before the context terminates
        if not self._ctx.closed:
            self._ctx.term()

    def _setup_frontend(self, sock: zmq.Socket) -> None:
        """CURVE, and --client-hwm per client: replies held for one that does not read (then
        ROUTER_MANDATORY makes a full queue a counted EAGAIN, not a silent drop) and requests read
        ahead from it. Set before bind: the listener gives each connection the options it had then."""
        self.security.apply(sock)
        sock.setsockopt(zmq.SNDHWM, self.config.client_hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.client_hwm)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)

    def _bind(self, endpoint: str, what: str, setup: Callable[[zmq.Socket], None] | None = None) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        if setup is not None:
            setup(sock)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise BindError(exc.errno, f"cannot bind the {what} to {endpoint}: {exc.strerror}") from None
        return sock

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        frontend, backend = self.frontend, self.backend
        poller = zmq.Poller()
        poller.register(backend, zmq.POLLIN)
        poller.register(frontend, zmq.POLLIN)
        next_tick = 0.0
        while True:
            if self._stopping and (time.monotonic() >= self._drain_until or self.core.drained()):
                return
            timeout_ms = math.ceil(max(0.0, next_tick - time.monotonic()) * 1000.0)
            ready = dict(poller.poll(timeout_ms))
            # Signals land while we block in poll: act on a stop before anything else this pass, or
            # the supervisor would restart workers that a process-group SIGTERM just ended.
            if self._stop_requested and not self._stopping:
                self._begin_stop()
            if backend in ready:
                self._read(backend, self.core.from_worker)
            if frontend in ready:
                self._read(frontend, self.core.from_client)
            now = time.monotonic()
            if now >= next_tick:
                self._purge(now)
                self._send_heartbeats(now)
                self._supervise(now)
                if not self._stopping:
                    self.rollout.tick(now)
                next_tick = now + self._tick

    def _read(self, sock: zmq.Socket, handle: Callable[[list[zmq.Frame]], None]) -> None:
        for _ in range(BATCH):
            try:
                frames = recv_frames(sock, _NOBLOCK)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:  # noqa: BLE001 - one bad message must not stop the server
                log.exception("unexpected error handling a message; dropped")

    # -- what the core hands over ------------------------------------------------------------
    def _admin(self, rtype: str, header: dict[str, Any]) -> dict[str, Any]:
        """Reply fields of a request that is not a predict (the core sends them with code 200)."""
        if rtype == METADATA:
            return self._metadata(header)
        if rtype == STATUS:
            return self.status()
        if rtype == PING:
            return {"message": "pong"}
        if rtype == SHUTDOWN:
            log.info("shutdown requested by a client")
            self._stop_requested = True
            return {"message": "shutting down"}
        if rtype == PIN:
            return self.manager.pin(header.get("model"), header.get("version"))
        if rtype == UNPIN:
            return self.manager.unpin(header.get("model"))
        if rtype == METRICS:
            return {"stats": self.core.stats.snapshot(), "status": self.status()}
        if rtype == RELOAD_CONFIG:
            return self._reload_config(header)
        raise AssertionError(f"request type {rtype!r} reached the broker's admin handler")

    def _reload_config(self, header: dict[str, Any]) -> dict[str, Any]:
        text = header.get("config")
        if type(text) is not str:
            raise InvalidArgument("reload_config needs 'config': a ModelServerConfig in protobuf text format")
        try:
            models = self.manager.apply_config_text(text, "a reload_config request")
        except ModelConfigError as exc:
            raise InvalidArgument(f"model config not applied, the running one stays: {exc}") from None
        return {"models": models}

    def _metadata(self, header: dict[str, Any]) -> dict[str, Any]:
        spec = self.manager.resolve(header)
        return {"model": spec.name, "versions": self.manager.versions_of(spec.name), "version": spec.version,
                "signatures": spec.signatures}

    def status(self) -> dict[str, Any]:
        """What the status request returns (also handy in tests and logs)."""
        return {
            "server": {"pid": os.getpid(), "endpoint": self.endpoint, "policy": self.config.policy,
                       "uptime_s": round(time.monotonic() - self._started_at, 3), "server_id": self.server_id},
            "workers": [{"index": s.index, "pid": s.pid, "cores": s.cores, "state": s.state.value,
                         "inflight": len(s.inflight), "served": s.served, "restarts": s.restarts}
                        for s in self.table],
            "models": self.manager.flat_status(self.rollout.holders),
            "model_status": self.manager.status(self.rollout.holders),
            "config_error": self.manager.config_error,
            "loader": self.manager.loader_status(),
            "queued": len(self.core.queue),
            "queued_clients": self.core.queue.clients,
            "dropped_replies": dict(self.dropped_replies),
            "gateways": self.front_door.pids() if self.front_door is not None else [],
            "split": {"min_rows": self.config.split_min_rows, "requests": self.core.split_requests,
                      "parts": self.core.split_parts},
            "watchdog": self.watchdog.status(),
        }

    def _on_control(self, identity: bytes, command: int, rest: list[zmq.Frame], now: float) -> None:
        """Backend commands other than replies and heartbeats: READY, LOADED, UNLOADED."""
        if command == _READY:
            self._on_worker_ready(identity, rest, now)
        elif command in (_LOADED, _UNLOADED):
            slot = self.table.by_identity(identity)
            if slot is None or not rest:
                return
            self.table.seen(slot, now)
            try:
                info = msgpack.unpackb(rest[0].bytes, raw=False)
            except Exception:  # noqa: BLE001
                log.warning("dropping a malformed command %r from %r", command, identity)
                return
            if command == _LOADED:
                self.rollout.on_loaded(slot, info)
            else:
                self.rollout.on_unloaded(slot, info)
            if self.core.queue and self.table.free():
                self.core.pump()
        else:
            log.warning("dropping unknown backend command %r from %r", command, identity)

    def _on_lost(self, slot: WorkerSlot, why: str) -> None:
        """The core took a worker out of service (and failed over its requests): kill the process."""
        self.rollout.on_worker_gone(slot)
        self.supervisor.kill(slot)

    def _on_worker_ready(self, identity: bytes, rest: list[zmq.Frame], now: float) -> None:
        try:
            info = msgpack.unpackb(rest[0].bytes, raw=False) if rest else None
            index, pid = int(info["index"]), int(info["pid"])
        except Exception:  # noqa: BLE001 - a garbled READY is logged, not trusted
            log.warning("dropping a malformed READY from %r", identity)
            return
        slot = self.table.get(index)
        if slot is None or slot.state is not WorkerState.STARTING or not self._is_ours(slot, pid):
            if slot is not None and slot.identity == identity:
                return  # a repeated READY
            log.warning("READY from %r (index %s, pid %s) matches no booting worker; telling it to stop",
                        identity, index, pid)
            self._send_worker(identity, [W_STOP])
            return
        self.table.mark_ready(slot, identity, pid, now)
        self.rollout.on_worker_ready(slot, info)
        log.info("worker %d (pid %d) READY on cores %s after %.2f s", index, pid, info.get("cores", slot.cores),
                 now - slot.started_at)
        if not self._announced_ready and self.table.all_ready():
            self._announced_ready = True
            log.info("all %d workers READY; serving on %s", self.table.size, self.endpoint)
            if self.front_door is not None:
                self.front_door.start()
            if self.on_ready is not None:
                try:
                    self.on_ready()
                except Exception:  # noqa: BLE001 - a callback bug must not stop the server
                    log.exception("on_ready callback failed")
        if self.core.queue:
            self.core.pump()

    @staticmethod
    def _is_ours(slot: WorkerSlot, pid: int) -> bool:
        """True when ``pid`` is the slot's process or runs under it (a wrapper command)."""
        if slot.process is None:
            return False
        if pid == slot.process.pid:
            return True
        try:
            return any(p.pid == slot.process.pid for p in psutil.Process(pid).parents())
        except psutil.Error:
            return False

    # -- purge, heartbeats, supervision ----------------------------------------------------------
    def _purge(self, now: float) -> None:
        """Stopped or stuck workers (the watchdog, which also forgives the broker's own gaps first),
        then expired queued requests, silent workers and hung workers (the core's tick)."""
        for slot, why in self.watchdog.check(now):
            if slot.state is WorkerState.READY:
                self.core.worker_lost(slot, why)
        self.core.tick(now, self._silence, self.config.worker_timeout)

    def _send_heartbeats(self, now: float) -> None:
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.config.heartbeat_interval
        for slot in self.table:
            if slot.identity is not None and slot.state is WorkerState.READY:
                if not self._send_worker(slot.identity, [W_HEARTBEAT]):
                    self.core.worker_lost(slot, "disconnected from the broker")

    def _supervise(self, now: float) -> None:
        for slot, rc in self.supervisor.reap():
            failure = self.supervisor.on_exit(slot, rc, now)  # logs it; restarts unless stopping
            if slot.state is not WorkerState.DEAD:
                self.core.fail_over(self.table.mark_dead(slot), slot.index)
                self.rollout.on_worker_gone(slot)
            if failure is not None:
                self._fatal(failure)
                return
        if self._stopping:
            return
        if self.front_door is not None:
            reason = self.front_door.poll(now)
            if reason is not None:
                self._fatal(Fatal(reason, EXIT_CONFIG_ERROR))
                return
        failure = self.supervisor.boot_overdue(now) or self.supervisor.restart_due(now)
        if failure is not None:
            self._fatal(failure)

    # -- stopping ------------------------------------------------------------------------------
    def _begin_stop(self) -> None:
        self._stopping = self.core.stopping = True
        self.supervisor.stopping = True
        self._drain_until = min(self._drain_until, time.monotonic() + self.config.drain_timeout)
        log.info("stopping: draining %d in-flight and %d queued request(s), up to %g s",
                 self.table.inflight_count(), len(self.core.queue), self.config.drain_timeout)

    def _fatal(self, failure: Fatal) -> None:
        """Stops the server without draining; the first failure is the one reported."""
        if self.fatal_error is None:
            self.fatal_error = failure.message
            self._exit_code = failure.exit_code or 1
            log.error("fatal: %s", failure.message)
        self._stopping = self.core.stopping = True
        self.supervisor.stopping = True
        self._drain_until = -math.inf

    def _shutdown(self) -> None:
        """Answers whatever is left, stops every worker process, closes the sockets. Never raises."""
        try:
            if self.front_door is not None:
                self.front_door.stop()
        except Exception:  # noqa: BLE001
            log.exception("error while stopping the gateway processes")
        try:
            reason = "server is shutting down"
            if self.fatal_error is not None:
                reason += f": {self.fatal_error}"
            for slot in self.table:
                if slot.identity is not None and slot.state is WorkerState.READY:
                    self._send_worker(slot.identity, [W_STOP])
            self.core.fail_all(reason)
        except Exception:  # noqa: BLE001
            log.exception("error while answering pending requests at shutdown")
        finally:
            try:
                self.supervisor.stop_all(STOP_GRACE)
            finally:
                self.close()
        log.info("stopped%s", f" ({self.fatal_error})" if self.fatal_error else "")

    # -- sending -------------------------------------------------------------------------------
    def _send_client(self, frames: list[Any]) -> None:
        try:
            send_frames(self.frontend, frames, _NOBLOCK)
        except zmq.ZMQError as exc:  # nothing was queued: ZeroMQ refuses a multipart message at its first frame
            self._dropped_reply(exc.errno)

    def _dropped_reply(self, err: int) -> None:
        """A reply ZeroMQ would not take: the client holds --client-hwm unread replies (EAGAIN), or is
        gone (EHOSTUNREACH). Counted in status; the client's own timeout tells it."""
        unread = err == errno.EAGAIN
        self.dropped_replies["unread" if unread else "gone"] += 1
        now = time.monotonic()
        if unread and now >= self._next_drop_log:
            self._next_drop_log = now + DROP_LOG_INTERVAL
            log.warning("dropping replies to a client that does not read them (%d so far; --client-hwm %d)",
                        self.dropped_replies["unread"], self.config.client_hwm)

    def _send_worker(self, identity: bytes, frames: list[Any]) -> bool:
        try:
            send_frames(self.backend, [identity, *frames])
            return True
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            return False


def _remove_ipc_file(endpoint: str) -> None:
    """ZeroMQ leaves the socket file of a bound ipc:// endpoint behind; the binder removes it."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        try:
            os.unlink(endpoint[len("ipc://"):])
        except OSError:
            pass


__all__ = ["Broker", "BindError"]
