"""Getting model versions onto the workers and off them again: the rollout coordinator.

The model manager decides which versions exist and what state each is in; this module moves them
between workers. It sends W_LOAD for a version whose segment is written, one worker at a time out of
rotation (a rolling update: serving never shares a core with loading), tells the manager once every
READY worker has it (the manager then makes it AVAILABLE and traffic switches in one step), sends
W_UNLOAD for versions that are drained, and gives up on a worker that does not answer a load or an
unload within --boot-timeout. Which versions each worker has, or is loading, lives on its WorkerSlot
and changes only through WorkerTable's methods.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import msgpack

from sgserve.broker.worker_table import WorkerSlot, WorkerState, WorkerTable
from sgserve.config import ModelSpec, ServerConfig
from sgserve.models.manager import ModelManager
from sgserve.models.versions import Key, VersionState
from sgserve.protocol import W_LOAD, W_UNLOAD

log = logging.getLogger(__name__)

SendToWorker = Callable[[bytes, list[Any]], bool]  # identity, frames -> False when it is gone
RequestsFor = Callable[[str, int], int]  # model, version -> queued and in-flight requests


class Rollout:
    """See the module docstring. ``send`` delivers backend frames to a worker identity;
    ``requests_for`` counts the broker's queued and in-flight requests for a version."""

    def __init__(self, config: ServerConfig, table: WorkerTable, manager: ModelManager, *,
                 send: SendToWorker, requests_for: RequestsFor) -> None:
        self.config = config
        self.table = table
        self.manager = manager
        self._send = send
        self._requests_for = requests_for

    # -- what the broker tells it --------------------------------------------------------------
    def specs_for_spawn(self, index: int) -> list[ModelSpec]:
        """What a worker started now loads at boot: every version that is or is about to be served."""
        specs = [spec for _mv, spec in self.manager.for_workers()]
        slot = self.table.get(index)
        if slot is not None:
            self.table.spawning_with(slot, ((s.name, s.version) for s in specs))
        return specs

    def on_worker_ready(self, slot: WorkerSlot, info: dict[str, Any] | None = None) -> None:
        """The table already counts what it booted with as loaded; note how it warmed them."""
        for name, version, warmed in (info or {}).get("warmup") or []:
            self.manager.note_warmup(name, version, warmed)
        self.advance(time.monotonic())

    def on_worker_gone(self, slot: WorkerSlot) -> None:
        """A worker died or was killed (the table has forgotten what it held): carry on without it."""
        self.advance(time.monotonic())

    def on_loaded(self, slot: WorkerSlot, info: dict[str, Any]) -> None:
        key = (info.get("model"), info.get("version"))
        if slot.loading_version != key:
            return
        ok = bool(info.get("ok"))
        self.table.finish_loading(slot, ok)
        now = time.monotonic()
        if ok:
            self.manager.note_warmup(key[0], key[1], info.get("warmup"))
            log.info("worker %d loaded %s version %d in %.2f s", slot.index, key[0], key[1], info.get("seconds", 0))
        elif self.manager.state(key) is VersionState.LOADING:
            self.manager.worker_failed(key, f"worker {slot.index} could not load it: {info.get('error')}", now)
        self.advance(now)

    def on_unloaded(self, slot: WorkerSlot, info: dict[str, Any]) -> None:
        self.table.finish_unloading(slot, (info.get("model"), info.get("version")))
        self.advance(time.monotonic())

    def tick(self, now: float) -> None:
        """The periodic step: the manager's polls, then moving versions."""
        self.manager.tick(now)
        self.advance(now)

    def advance(self, now: float) -> None:
        self._check_timeouts(now)
        self.manager.advance_loader(now)
        self._back_in_rotation()
        self._load_on_workers(now)
        self._finish_loads(now)
        self._unload_drained(now)

    def holders(self, key: Key) -> list[int]:
        """Indices of the workers that have ``key`` loaded (for status)."""
        return [s.index for s in self.table if key in s.versions]

    # -- loading -------------------------------------------------------------------------------
    def _load_on_workers(self, now: float) -> None:
        """Sends W_LOAD to READY workers that lack a version they should have.

        A worker lacking an AVAILABLE version (it restarted) leaves the rotation until it has it.
        For a version still LOADING, one worker at a time leaves the rotation to load it, unless
        it is the only worker that could serve meanwhile.
        """
        for slot in self.table:
            if (slot.state is not WorkerState.READY or slot.identity is None or slot.loading_version is not None
                    or slot.unloading_version is not None):
                continue
            for mv, spec in self.manager.for_workers():
                key = (spec.name, spec.version)
                if key in slot.versions:
                    continue
                if mv.state is VersionState.AVAILABLE:
                    self._send_load(slot, spec, now, out_of_rotation=True)
                elif not self._anyone_loading(key) and self._rolling_ok():
                    self._send_load(slot, spec, now, out_of_rotation=self._others_serving(slot))
                else:
                    continue
                if slot.loading_version is not None:
                    break

    def _send_load(self, slot: WorkerSlot, spec: ModelSpec, now: float, out_of_rotation: bool) -> None:
        if not self._send(slot.identity, [W_LOAD, msgpack.packb(spec.to_dict(), use_bin_type=True)]):
            return
        self.table.start_loading(slot, (spec.name, spec.version), now, out_of_rotation)
        log.info("worker %d: loading %s version %d%s", slot.index, spec.name, spec.version,
                 " (out of rotation meanwhile)" if out_of_rotation else "")

    def _finish_loads(self, now: float) -> None:
        """LOADING versions that every READY worker has: the manager makes them AVAILABLE (the switch)."""
        ready = [s for s in self.table if s.state is WorkerState.READY]
        if not ready:
            return
        done = [(spec.name, spec.version) for mv, spec in self.manager.for_workers()
                if mv.state is VersionState.LOADING and all((spec.name, spec.version) in s.versions for s in ready)]
        if done:
            self.manager.loaded_everywhere(done, len(ready), now)

    def _check_timeouts(self, now: float) -> None:
        """A worker that does not finish a load within --boot-timeout fails the version (it would
        otherwise stay out of rotation for ever); one that does not confirm an unload counts as done."""
        timeout = self.config.boot_timeout
        for slot in self.table:
            key = slot.unloading_version
            if key is not None and now - slot.change_sent_at > timeout:
                log.warning("worker %d did not confirm unloading %s version %d within %g s; "
                            "counting it as unloaded", slot.index, key[0], key[1], timeout)
                self.table.finish_unloading(slot, key)
            key = slot.loading_version
            if key is not None and now - slot.change_sent_at > timeout:
                self.table.finish_loading(slot, loaded=False)
                if self.manager.state(key) is VersionState.LOADING:
                    self.manager.worker_failed(key, f"worker {slot.index} did not finish loading it within "
                                                    f"{timeout:g} s (--boot-timeout)", now)

    def _back_in_rotation(self) -> None:
        """A worker loading a version that is no longer wanted serves again meanwhile."""
        for slot in self.table:
            key = slot.loading_version
            if (key is not None and slot.loading
                    and self.manager.state(key) not in (VersionState.LOADING, VersionState.AVAILABLE)):
                self.table.set_loading(slot, False)

    def _rolling_ok(self) -> bool:
        """One worker at a time loads or unloads a version (the others keep serving)."""
        return not any(s.loading_version is not None or s.unloading_version is not None for s in self.table)

    def _anyone_loading(self, key: Key) -> bool:
        return any(s.loading_version == key for s in self.table)

    def _others_serving(self, slot: WorkerSlot) -> bool:
        return any(s is not slot and s.state is WorkerState.READY and not s.loading for s in self.table)

    # -- unloading -----------------------------------------------------------------------------
    def _unload_drained(self, now: float) -> None:
        """FAILED versions, and UNLOADING ones with no request left, leave the workers; then their
        segments go."""
        for key in self.manager.to_drop():
            if self.manager.state(key) is VersionState.UNLOADING and self._requests_for(*key) != 0:
                continue
            if self._drop_from_workers(key, now):
                self.manager.dropped(key)
        self.manager.forget_removed()

    def _drop_from_workers(self, key: Key, now: float) -> bool:
        """Sends W_UNLOAD where the version is loaded; True once no worker (or booting one) has it."""
        if any(key in s.booting or s.loading_version == key for s in self.table):
            return False  # a worker may still map it: wait for its READY / LOADED
        for slot in [s for s in self.table if key in s.versions]:
            if slot.identity is None or slot.state is WorkerState.DEAD:
                self.table.forget_version(slot, key)
                continue
            if slot.unloading_version is not None or slot.loading_version is not None or not self._rolling_ok():
                continue  # one worker at a time leaves the rotation to drop it
            if not self._send(slot.identity, [W_UNLOAD, msgpack.packb({"model": key[0], "version": key[1]})]):
                self.table.forget_version(slot, key)
                continue
            self.table.start_unloading(slot, key, now, out_of_rotation=self._others_serving(slot))
        return not any(key in s.versions for s in self.table)


__all__ = ["Rollout"]
