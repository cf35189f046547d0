"""Model lifecycle in the broker: which versions exist, load, swap, drain, unload; TF Serving's manager.

One ModelManager owns every model's version table; nothing else changes it. The broker feeds it
ticks, worker events and pin/unpin requests, and asks it where a request goes (``resolve``).

A version moves LOADING -> AVAILABLE -> UNLOADING -> END, or to FAILED (with the error). Loading has
two phases: the loader process writes the version's segment (in the background, at the lowest CPU
priority), then every worker maps and warms it. With more than one worker, one worker at a time
leaves the rotation while it loads (a rolling update), so serving never shares a core with loading.
Once every READY worker has it, the version is AVAILABLE and traffic switches in one step (the next
``resolve``). A version that is no longer wanted is UNLOADING: it takes no new requests, its queued
and in-flight ones finish, then workers drop it and its segments are unlinked (END).

Availability-preserving (the default, as TF Serving): a superseded version unloads only after a
wanted version is AVAILABLE and none is still loading, so a corrupt new version leaves the old one
serving. Resource-preserving: unload first, then load. A version whose directory disappears from
disk unloads at once (after draining), whatever the policy.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import enum
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

from sgserve.models import shared_segment
from sgserve.models.loader_service import LoaderDied, LoaderService
from sgserve.broker.worker_table import WorkerSlot, WorkerState, WorkerTable
from sgserve.config import ModelSpec, ServerConfig
from sgserve.errors import InvalidArgument, NotFound, Unavailable
from sgserve.models.tfs_config import ModelConfig, ModelConfigError, parse_model_server_config, read_model_server_config

log = logging.getLogger(__name__)

Key = tuple[str, int]


class VersionState(str, enum.Enum):
    """TF Serving's ModelVersionStatus states, plus FAILED (TF Serving reports END with an error)."""

    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    END = "END"
    FAILED = "FAILED"


@dataclasses.dataclass(eq=False)
class ModelVersion:
    version: int
    state: VersionState = VersionState.LOADING
    spec: ModelSpec | None = None  # once its segment is written
    error: str | None = None
    attempts: int = 0  # failed loads so far
    retry_at: float = 0.0  # monotonic: when the next load may start
    requested_at: float = 0.0  # monotonic: when the load was first wanted
    load_seconds: float | None = None  # from the start of its load to AVAILABLE
    warmup: dict[str, Any] | None = None  # what the first worker to load it warmed it with
    available_since: float | None = None  # time.time()


@dataclasses.dataclass(eq=False)
class ServedModel:
    config: ModelConfig
    versions: dict[int, ModelVersion] = dataclasses.field(default_factory=dict)
    available: dict[int, ModelSpec] = dataclasses.field(default_factory=dict)  # the routable versions
    default: int | None = None  # where a request naming no version goes
    pinned: int | None = None  # `sgserve rollback`: serve this one until unpinned
    on_disk: list[int] = dataclasses.field(default_factory=list)
    aspired: set[int] = dataclasses.field(default_factory=set)
    error: str | None = None  # the last problem with its base path
    removed: bool = False  # dropped from the config: unloading everything
    static: bool = False  # given as specs (tests): no base path to watch

    @property
    def name(self) -> str:
        return self.config.name


@dataclasses.dataclass(eq=False)
class LoadJob:
    """One version's segment being written by the loader service."""

    key: Key
    started: float
    base: list[str]  # segments of the version it shares unchanged tensors with (held while it runs)


class ModelManager:
    """See the module docstring. ``send`` delivers backend frames to a worker identity (False when
    it is gone); ``requests_for`` counts the broker's queued and in-flight requests for a version."""

    def __init__(self, config: ServerConfig, table: WorkerTable, *, server_id: str = "",
                 models: Sequence[ModelConfig] = (), initial: Sequence[ModelSpec] = (),
                 config_text: str | None = None) -> None:
        self.config = config
        self.table = table
        self.server_id = server_id
        self.models: dict[str, ServedModel] = {}
        self.config_error: str | None = None
        self._config_text = config_text
        self._config_mtime = 0.0
        self.send: Callable[[bytes, list[Any]], bool] = lambda _identity, _frames: False
        self.requests_for: Callable[[str, int], int] = lambda _model, _version: 0
        self._seg_refs: collections.Counter[str] = collections.Counter()
        self._pending: collections.deque[Key] = collections.deque()  # versions waiting for the loader
        self._job: LoadJob | None = None
        self._service: LoaderService | None = None
        self._unlinker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sgserve-unlink")
        self._on_worker: dict[int, set[Key]] = {}  # versions each READY worker has loaded
        self._booting: dict[int, set[Key]] = {}  # versions each STARTING worker was spawned with
        self._loading_on: dict[int, Key] = {}  # the one version each worker is loading now
        self._unloading_on: dict[int, Key] = {}  # the one version each worker is dropping now
        self._loading_since: dict[int, float] = {}  # monotonic: when its load or unload was sent
        self._next_fs_poll = 0.0
        self._next_config_poll = (time.monotonic() + config.model_config_file_poll_wait_seconds
                                  if config.model_config_file_poll_wait_seconds > 0 else float("inf"))
        self._tmp = tempfile.mkdtemp(prefix=f"{shared_segment.SEGMENT_PREFIX}{server_id}_loads_")
        for mc in models:
            self.models[mc.name] = ServedModel(config=mc)
        for spec in initial:
            sm = self.models.get(spec.name)
            if sm is None:  # a spec without a config: serve it as it is, watch nothing
                sm = self.models[spec.name] = ServedModel(
                    config=ModelConfig(name=spec.name, base_path=spec.base_path), static=True)
            mv = sm.versions[spec.version] = ModelVersion(spec.version, VersionState.AVAILABLE, spec,
                                                          load_seconds=spec.load_seconds,
                                                          available_since=time.time())
            mv.requested_at = time.monotonic()
            self._ref(spec)
            sm.available[spec.version] = spec
        for sm in self.models.values():
            if not sm.static:
                self._scan(sm)
            self._refresh_default(sm)

    # -- where requests go (the hot path) --------------------------------------------------------
    def resolve(self, header: dict[str, Any]) -> ModelSpec:
        """The ModelSpec a request names; 404 for what does not exist, listing what does."""
        model = header.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidArgument(f"request needs 'model', the name of a served model "
                                  f"(available models: {self._model_names()})")
        sm = self.models.get(model)
        if sm is None or sm.removed:
            raise NotFound(f"model '{model}' is not served here; available models: {self._model_names()}")
        version = header.get("version")
        label = header.get("version_label")
        if label is not None:
            if version is not None:
                raise InvalidArgument("give 'version' or 'version_label', not both")
            if not isinstance(label, str):
                raise InvalidArgument(f"'version_label' must be a string, got {label!r}")
            version = sm.config.version_labels.get(label)
            if version is None:
                raise NotFound(f"model '{model}' has no version label '{label}'; labels: "
                               f"{_labels(sm.config.version_labels)}")
            spec = sm.available.get(version)
            if spec is None:
                raise NotFound(f"model '{model}' version label '{label}' points at version {version}, which is "
                               f"not available ({self._state_of(sm, version)}); available versions: "
                               f"{_names(sm.available)}")
            return spec
        if version is None:
            if sm.default is None:
                raise Unavailable(f"model '{model}' has no available version yet ({self._states(sm)})")
            return sm.available[sm.default]
        if not isinstance(version, int) or isinstance(version, bool):
            raise InvalidArgument(f"'version' must be an integer, got {version!r}")
        spec = sm.available.get(version)
        if spec is None:
            known = sm.versions.get(version)
            state = f" available version {version} (it is {self._state_of(sm, version)})" if known else \
                f" version {version}"
            raise NotFound(f"model '{model}' has no{state}; "
                           f"available versions: {_names(sm.available)}")
        return spec

    def versions_of(self, model: str) -> list[int]:
        sm = self.models.get(model)
        return sorted(sm.available) if sm else []

    # -- pin / unpin (rollback) ---------------------------------------------------------------------
    def pin(self, model: str, version: Any) -> dict[str, Any]:
        """Serves ``version`` for requests that name none, loading it first if needed."""
        sm = self._model(model)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise InvalidArgument(f"'version' must be a version number, got {version!r}")
        if not sm.static:
            self._scan(sm)
        known = set(sm.on_disk) | set(sm.available)
        if version not in known:
            raise NotFound(f"model '{model}' has no version {version} on disk under {sm.config.base_path}; "
                           f"versions there: {', '.join(map(str, sm.on_disk)) or '(none)'}")
        sm.pinned = version
        log.info("model '%s': pinned to version %d", model, version)
        self._reconcile(sm, time.monotonic())
        return self._pin_reply(sm)

    def unpin(self, model: str) -> dict[str, Any]:
        sm = self._model(model)
        was, sm.pinned = sm.pinned, None
        if was is not None:
            log.info("model '%s': unpinned from version %d; back to its policy (%s)", model, was,
                     sm.config.version_policy.describe())
        self._reconcile(sm, time.monotonic())
        return self._pin_reply(sm)

    def _pin_reply(self, sm: ServedModel) -> dict[str, Any]:
        state = self._state_of(sm, sm.pinned) if sm.pinned is not None else None
        return {"model": sm.name, "pinned": sm.pinned, "pinned_state": state, "serving_version": sm.default}

    # -- workers ----------------------------------------------------------------------------------
    def specs_for_spawn(self, index: int) -> list[ModelSpec]:
        """What a worker started now loads at boot: every version that is or is about to be served."""
        specs = [mv.spec for sm in self.models.values() for mv in sm.versions.values()
                 if mv.spec is not None and mv.state in (VersionState.AVAILABLE, VersionState.LOADING)]
        self._booting[index] = {(s.name, s.version) for s in specs}
        return specs

    def on_worker_ready(self, slot: WorkerSlot, info: dict[str, Any] | None = None) -> None:
        self._on_worker[slot.index] = self._booting.pop(slot.index, set())
        for name, version, warmed in (info or {}).get("warmup") or []:
            self._note_warmup(name, version, warmed)
        self._loading_on.pop(slot.index, None)
        self._unloading_on.pop(slot.index, None)
        self._advance(time.monotonic())

    def on_worker_gone(self, slot: WorkerSlot) -> None:
        """A worker died or was killed: whatever it held or was loading, it no longer has."""
        self._on_worker.pop(slot.index, None)
        self._booting.pop(slot.index, None)
        self._loading_on.pop(slot.index, None)
        self._unloading_on.pop(slot.index, None)
        self._advance(time.monotonic())

    def on_loaded(self, slot: WorkerSlot, info: dict[str, Any]) -> None:
        key = (info.get("model"), info.get("version"))
        if self._loading_on.get(slot.index) != key:
            return
        del self._loading_on[slot.index]
        self.table.set_loading(slot, False)
        sm = self.models.get(key[0])
        mv = sm.versions.get(key[1]) if sm else None
        if info.get("ok"):
            self._on_worker.setdefault(slot.index, set()).add(key)
            self._note_warmup(key[0], key[1], info.get("warmup"))
            log.info("worker %d loaded %s version %d in %.2f s", slot.index, key[0], key[1], info.get("seconds", 0))
        elif mv is not None and mv.state is VersionState.LOADING:
            self._fail(sm, mv, f"worker {slot.index} could not load it: {info.get('error')}", time.monotonic())
        self._advance(time.monotonic())

    def _note_warmup(self, name: Any, version: Any, warmed: Any) -> None:
        sm = self.models.get(name)
        mv = sm.versions.get(version) if sm else None
        if mv is not None and mv.warmup is None and isinstance(warmed, dict):
            mv.warmup = warmed

    def on_unloaded(self, slot: WorkerSlot, info: dict[str, Any]) -> None:
        key = (info.get("model"), info.get("version"))
        self._on_worker.get(slot.index, set()).discard(key)
        if self._unloading_on.get(slot.index) == key:
            del self._unloading_on[slot.index]
            self.table.set_loading(slot, False)
        self._advance(time.monotonic())

    # -- the periodic step ---------------------------------------------------------------------
    def prestart_loader(self) -> None:
        """Starts the loader service ahead of the first update, so that update does not pay for
        TensorFlow's import (a server with only fixed versions needs none)."""
        if any(not sm.static for sm in self.models.values()):
            self._loader().start()

    def tick(self, now: float) -> None:
        if now >= self._next_config_poll:
            self._next_config_poll = now + self.config.model_config_file_poll_wait_seconds
            self.reload_config()
        if now >= self._next_fs_poll:
            self._next_fs_poll = now + max(self.config.file_system_poll_wait_seconds, 0.05)
            for sm in list(self.models.values()):
                if not sm.static and not sm.removed:
                    self._scan(sm)
                    self._reconcile(sm, now)
        self._advance(now)

    def _advance(self, now: float) -> None:
        self._check_load_timeouts(now)
        self._poll_job(now)
        self._start_next_load(now)
        self._load_on_workers(now)
        self._finish_loads(now)
        self._unload_drained(now)

    # -- desired state -------------------------------------------------------------------------
    def _scan(self, sm: ServedModel) -> None:
        """Reads the versions on disk (integer directory names), as TF Serving's storage path source."""
        base = sm.config.base_path
        before = sm.on_disk
        try:
            sm.on_disk = sorted(int(e) for e in os.listdir(base) if e.isdigit() and os.path.isdir(os.path.join(base, e)))
            if sm.error and sm.error.startswith("base path"):
                sm.error = None
        except OSError as exc:
            # Keep serving what is loaded: a base path on a flaky mount is not a reason to go dark.
            msg = f"base path {base} cannot be read: {exc.strerror}"
            if sm.error != msg:
                log.error("model '%s': %s", sm.name, msg)
            sm.error = msg
            return
        if not sm.on_disk and before:
            log.warning("model '%s': no version directories under %s", sm.name, base)

    def _reconcile(self, sm: ServedModel, now: float) -> None:
        """Starts loads for wanted versions and unloads for unwanted ones."""
        if sm.static:
            self._refresh_default(sm)
            return
        aspired = set() if sm.removed else set(sm.config.version_policy.select(sm.on_disk))
        if sm.pinned is not None and sm.pinned in sm.on_disk:
            aspired.add(sm.pinned)
        sm.aspired = aspired
        on_disk = set(sm.on_disk)
        for v in sorted(aspired):
            mv = sm.versions.get(v)
            if mv is None or mv.state is VersionState.END:
                mv = sm.versions[v] = ModelVersion(v, requested_at=now)
                self._pending.append((sm.name, v))
                log.info("model '%s': version %d found; loading it", sm.name, v)
        for v, mv in list(sm.versions.items()):
            if v in aspired:
                continue
            if mv.state is VersionState.FAILED and v not in on_disk:
                del sm.versions[v]  # gone from disk: forget the failure (a new copy may come)
            elif mv.state is VersionState.END and v not in on_disk:
                pass  # kept for status
            elif mv.state in (VersionState.LOADING, VersionState.AVAILABLE):
                gone = v not in on_disk
                if sm.removed or (gone and not self._bridging(sm, mv)) or (not gone and self._may_unload(sm)):
                    why = ("its model was removed from the config" if sm.removed else
                           "its directory was removed" if v not in on_disk else "superseded")
                    self._begin_unload(sm, mv, why)
        self._refresh_default(sm)

    def _may_unload(self, sm: ServedModel) -> bool:
        """Whether superseded versions may go now: resource-preserving always; availability-preserving
        once a wanted version serves and none is still loading."""
        if self.config.version_transition == "resource-preserving":
            return True
        wanted = [sm.versions[v] for v in sm.aspired if v in sm.versions]
        return (any(mv.state is VersionState.AVAILABLE for mv in wanted)
                and not any(mv.state is VersionState.LOADING for mv in wanted))

    def _bridging(self, sm: ServedModel, mv: ModelVersion) -> bool:
        """Availability-preserving: a version whose directory vanished keeps serving (its bytes are in
        shared memory) while the version replacing it loads, so requests see no gap."""
        if self.config.version_transition == "resource-preserving" or mv.state is not VersionState.AVAILABLE:
            return False
        wanted = [sm.versions[v] for v in sm.aspired if v in sm.versions]
        return (not any(w.state is VersionState.AVAILABLE for w in wanted)
                and any(w.state is VersionState.LOADING for w in wanted))

    def _refresh_default(self, sm: ServedModel) -> None:
        """The version requests without one go to: the pin, else the newest wanted one, else the newest."""
        avail = sm.available
        if sm.pinned is not None and sm.pinned in avail:
            default = sm.pinned
        else:
            wanted = [v for v in avail if v in sm.aspired]
            default = max(wanted) if wanted else (max(avail) if avail else None)
        if default != sm.default:
            if sm.default is not None and default is not None:
                log.info("model '%s': requests without a version now go to version %d (was %d)",
                         sm.name, default, sm.default)
            sm.default = default

    # -- loading: the segment --------------------------------------------------------------------
    def _start_next_load(self, now: float) -> None:
        if self._job is not None:
            return
        for _ in range(len(self._pending)):
            key = self._pending.popleft()
            sm = self.models.get(key[0])
            mv = sm.versions.get(key[1]) if sm else None
            if mv is None or mv.state is not VersionState.LOADING or mv.spec is not None:
                continue  # cancelled or already past this phase
            if now < mv.retry_at or self._must_wait_for_unload(sm):
                self._pending.append(key)
                continue
            self._spawn_loader(sm, mv, now)
            return

    def _must_wait_for_unload(self, sm: ServedModel) -> bool:
        """Resource-preserving: no load while an unwanted version of the model still holds memory."""
        if self.config.version_transition != "resource-preserving":
            return False
        return any(mv.state in (VersionState.AVAILABLE, VersionState.UNLOADING)
                   for v, mv in sm.versions.items() if v not in sm.aspired)

    def _loader(self) -> LoaderService:
        if self._service is None:
            self._service = LoaderService(self.server_id, os.path.join(self._tmp, "loader.log"),
                                          self._spare_cores())
        return self._service

    def _spawn_loader(self, sm: ServedModel, mv: ModelVersion, now: float) -> None:
        base = self._incremental_base(sm, mv.version)
        try:
            self._loader().submit({"name": sm.name, "base_path": sm.config.base_path, "version": mv.version,
                                   "base_segment": base.segment if base is not None else None})
        except OSError as exc:
            self._load_failed(sm, mv, f"cannot start the loader: {exc}", now)
            return
        held = base.all_segments() if base is not None else []
        for seg in held:
            self._seg_refs[seg] += 1
        self._job = LoadJob((sm.name, mv.version), now, held)
        log.info("model '%s': loading version %d%s", sm.name, mv.version,
                 f" (sharing unchanged tensors with version {base.version})" if base is not None else "")

    def _incremental_base(self, sm: ServedModel, version: int) -> ModelSpec | None:
        if not self.config.incremental_updates:
            return None
        candidates = [spec for v, spec in sm.available.items()]
        if not candidates:
            return None
        older = [s for s in candidates if s.version < version]
        return max(older or candidates, key=lambda s: s.version)

    def _spare_cores(self) -> list[int]:
        """Cores no worker is pinned to: the loader runs there when the machine has any."""
        try:
            allowed = set(os.sched_getaffinity(0))
        except AttributeError:
            return []
        used = {c for slot in self.table for c in slot.cores}
        return sorted(allowed - used)

    def _poll_job(self, now: float) -> None:
        job = self._job
        if job is None:
            return
        try:
            answer = self._loader().poll()
        except LoaderDied as exc:
            answer = {"ok": False, "error": str(exc), "died": True}
        except ValueError as exc:  # not JSON: a bug; treat it as a failed load
            self._loader().kill()
            answer = {"ok": False, "error": f"unreadable loader answer: {exc}", "died": True}
        if answer is None:
            return
        self._job = None
        for seg in job.base:
            self._unref(seg)
        sm = self.models.get(job.key[0])
        mv = sm.versions.get(job.key[1]) if sm else None
        spec = ModelSpec.from_dict(answer["spec"]) if answer.get("ok") else None
        if answer.get("died"):
            self._remove_orphans(job.key)
        if mv is None or mv.state is not VersionState.LOADING:  # cancelled while it loaded
            for seg in spec.all_segments() if spec is not None else []:
                if self._seg_refs[seg] == 0:
                    shared_segment.unlink(seg)
            return
        if spec is None:
            self._load_failed(sm, mv, str(answer.get("error")).removeprefix("sgserve: "), now)
            return
        mv.spec = spec
        self._ref(spec)
        own = spec.own_bytes if spec.own_bytes >= 0 else spec.segment_bytes
        log.info("model '%s' version %d: segment written (%.1f MiB new, %.1f MiB shared) in %.2f s; "
                 "workers load it next", sm.name, mv.version, own / 2**20, (spec.segment_bytes - own) / 2**20,
                 spec.load_seconds)

    def _remove_orphans(self, key: Key) -> None:
        """Segments a killed loader was writing for ``key`` (no version refers to them)."""
        probe = shared_segment.segment_name(self.server_id, key[0], key[1])
        prefix = probe[:probe.rindex("_") + 1]
        for seg in shared_segment.list_segments():
            if seg.startswith(prefix) and self._seg_refs[seg] == 0:
                shared_segment.unlink(seg)

    def _load_failed(self, sm: ServedModel, mv: ModelVersion, msg: str, now: float) -> None:
        mv.attempts += 1
        if mv.attempts <= self.config.max_num_load_retries:
            mv.error = (f"load attempt {mv.attempts} failed: {msg}; retrying in "
                        f"{self.config.load_retry_interval:g} s (--max-num-load-retries "
                        f"{self.config.max_num_load_retries})")
            mv.retry_at = now + self.config.load_retry_interval
            self._pending.append((sm.name, mv.version))
            log.warning("model '%s' version %d: %s", sm.name, mv.version, mv.error)
        else:
            self._fail(sm, mv, msg if mv.attempts == 1 else f"{msg} (after {mv.attempts} attempts)", now)

    def _fail(self, sm: ServedModel, mv: ModelVersion, msg: str, now: float) -> None:
        log.error("model '%s' version %d FAILED: %s", sm.name, mv.version, msg)
        mv.state = VersionState.FAILED
        mv.error = msg
        for index, key in list(self._loading_on.items()):
            if key == (sm.name, mv.version):
                del self._loading_on[index]
                slot = self.table.get(index)
                if slot is not None:
                    self.table.set_loading(slot, False)
        self._reconcile(sm, now)  # its segments are released once no worker maps it (_unload_drained)

    # -- loading: the workers ------------------------------------------------------------------
    def _load_on_workers(self, now: float) -> None:
        """Sends W_LOAD to READY workers that lack a version they should have.

        A worker lacking an AVAILABLE version (it restarted) leaves the rotation until it has it.
        For a version still LOADING, one worker at a time leaves the rotation to load it, unless
        it is the only worker that could serve meanwhile.
        """
        for slot in self.table:
            if (slot.state is not WorkerState.READY or slot.identity is None or slot.index in self._loading_on
                    or slot.index in self._unloading_on):
                continue
            have = self._on_worker.setdefault(slot.index, set())
            for sm in self.models.values():
                for mv in sm.versions.values():
                    key = (sm.name, mv.version)
                    if mv.spec is None or key in have:
                        continue
                    if mv.state is VersionState.AVAILABLE:
                        self._send_load(slot, mv.spec, out_of_rotation=True)
                    elif mv.state is VersionState.LOADING and not any(
                            k == key for k in self._loading_on.values()) and self._rolling_ok(slot):
                        self._send_load(slot, mv.spec, out_of_rotation=self._others_serving(slot))
                    else:
                        continue
                    break
                if slot.index in self._loading_on:
                    break

    def _check_load_timeouts(self, now: float) -> None:
        """A worker that does not finish a load within --boot-timeout fails the version (it would
        otherwise stay out of rotation for ever)."""
        for index, key in list(self._unloading_on.items()):
            if now - self._loading_since.get(index, now) > self.config.boot_timeout:
                log.warning("worker %d did not confirm unloading %s version %d within %g s; "
                            "counting it as unloaded", index, key[0], key[1], self.config.boot_timeout)
                del self._unloading_on[index]
                self._on_worker.get(index, set()).discard(key)
                slot = self.table.get(index)
                if slot is not None:
                    self.table.set_loading(slot, False)
        for index, key in list(self._loading_on.items()):
            if now - self._loading_since.get(index, now) <= self.config.boot_timeout:
                continue
            del self._loading_on[index]
            slot = self.table.get(index)
            if slot is not None:
                self.table.set_loading(slot, False)
            sm = self.models.get(key[0])
            mv = sm.versions.get(key[1]) if sm else None
            if mv is not None and mv.state is VersionState.LOADING:
                self._fail(sm, mv, f"worker {index} did not finish loading it within "
                                   f"{self.config.boot_timeout:g} s (--boot-timeout)", now)

    def _rolling_ok(self, slot: WorkerSlot) -> bool:
        """One worker at a time loads or unloads a version (the others keep serving)."""
        return not self._loading_on and not self._unloading_on

    def _others_serving(self, slot: WorkerSlot) -> bool:
        return any(s is not slot and s.state is WorkerState.READY and not s.loading for s in self.table)

    def _send_load(self, slot: WorkerSlot, spec: ModelSpec, out_of_rotation: bool) -> None:
        import msgpack  # noqa: PLC0415

        from sgserve.protocol import W_LOAD  # noqa: PLC0415

        if not self.send(slot.identity, [W_LOAD, msgpack.packb(spec.to_dict(), use_bin_type=True)]):
            return
        self._loading_on[slot.index] = (spec.name, spec.version)
        self._loading_since[slot.index] = time.monotonic()
        if out_of_rotation:
            self.table.set_loading(slot, True)
        log.info("worker %d: loading %s version %d%s", slot.index, spec.name, spec.version,
                 " (out of rotation meanwhile)" if out_of_rotation else "")

    def _finish_loads(self, now: float) -> None:
        """LOADING versions that every READY worker has become AVAILABLE: the switch."""
        ready = [s.index for s in self.table if s.state is WorkerState.READY]
        if not ready:
            return
        for sm in self.models.values():
            changed = False
            for mv in sm.versions.values():
                if mv.state is not VersionState.LOADING or mv.spec is None:
                    continue
                key = (sm.name, mv.version)
                if all(key in self._on_worker.get(i, ()) for i in ready):
                    mv.state = VersionState.AVAILABLE
                    mv.error = None
                    mv.load_seconds = round(now - mv.requested_at, 3)
                    mv.available_since = time.time()
                    sm.available[mv.version] = mv.spec
                    changed = True
                    log.info("model '%s' version %d AVAILABLE on %d worker(s), %.2f s after it was found",
                             sm.name, mv.version, len(ready), mv.load_seconds)
            if changed:
                self._reconcile(sm, now)  # superseded versions may go now

    # -- unloading -----------------------------------------------------------------------------
    def _begin_unload(self, sm: ServedModel, mv: ModelVersion, why: str) -> None:
        log.info("model '%s' version %d UNLOADING (%s)", sm.name, mv.version, why)
        if mv.state is VersionState.LOADING and mv.spec is None:
            mv.state = VersionState.END  # never written (or the loader is cancelled below)
            job = self._job
            if job is not None and job.key == (sm.name, mv.version):
                self._loader().kill()  # the next poll sees it die and cleans up
            return
        mv.state = VersionState.UNLOADING
        sm.available.pop(mv.version, None)
        for index, key in list(self._loading_on.items()):
            if key == (sm.name, mv.version):
                slot = self.table.get(index)
                if slot is not None:
                    self.table.set_loading(slot, False)
        self._refresh_default(sm)

    def _unload_drained(self, now: float) -> None:
        for sm in list(self.models.values()):
            for mv in sm.versions.values():
                if mv.spec is None:
                    continue
                if (mv.state is VersionState.FAILED or (
                        mv.state is VersionState.UNLOADING and self.requests_for(sm.name, mv.version) == 0)):
                    if self._drop_from_workers(sm, mv):
                        self._release(sm, mv)
            if sm.removed and all(mv.state in (VersionState.END, VersionState.FAILED) for mv in sm.versions.values()):
                del self.models[sm.name]
                log.info("model '%s' removed", sm.name)

    def _drop_from_workers(self, sm: ServedModel, mv: ModelVersion) -> bool:
        """Sends W_UNLOAD where the version is loaded; True once no worker (or booting one) has it."""
        import msgpack  # noqa: PLC0415

        from sgserve.protocol import W_UNLOAD  # noqa: PLC0415

        key = (sm.name, mv.version)
        if any(key in keys for keys in self._booting.values()) or key in self._loading_on.values():
            return False  # a worker may still map it: wait for its READY / LOADED
        holders = [i for i, keys in self._on_worker.items() if key in keys]
        for index in holders:
            slot = self.table.get(index)
            if slot is None or slot.identity is None or slot.state is WorkerState.DEAD:
                self._on_worker[index].discard(key)
                continue
            if index in self._unloading_on or index in self._loading_on or not self._rolling_ok(slot):
                continue  # one worker at a time leaves the rotation to drop it
            frame = msgpack.packb({"model": sm.name, "version": mv.version})
            if not self.send(slot.identity, [W_UNLOAD, frame]):
                self._on_worker[index].discard(key)
                continue
            self._unloading_on[index] = key
            self._loading_since[index] = time.monotonic()
            if self._others_serving(slot):
                self.table.set_loading(slot, True)
        return not any(key in keys for keys in self._on_worker.values())

    def _release(self, sm: ServedModel, mv: ModelVersion) -> None:
        """No worker maps the version any more: its segments go (unless a later version shares them)."""
        if mv.spec is not None:
            for seg in mv.spec.all_segments():
                self._unref(seg)
        mv.spec = None
        if mv.state is VersionState.UNLOADING:
            mv.state = VersionState.END
            log.info("model '%s' version %d END (unloaded, segments released)", sm.name, mv.version)

    # -- segments ------------------------------------------------------------------------------
    def _ref(self, spec: ModelSpec) -> None:
        for seg in spec.all_segments():
            self._seg_refs[seg] += 1

    def _unref(self, seg: str) -> None:
        self._seg_refs[seg] -= 1
        if self._seg_refs[seg] <= 0:
            del self._seg_refs[seg]
            # Off the broker's loop: the kernel frees the pages during the unlink (about 25 ms for
            # 128 MiB, measured as a stall of every request in flight when done inline).
            self._unlinker.submit(shared_segment.unlink, seg)

    # -- config file ---------------------------------------------------------------------------
    def reload_config(self) -> bool:
        """Re-reads --model-config-file; a bad file is reported and the running config kept."""
        path = self.config.model_config_file
        if not path:
            return False
        try:
            text = read_model_server_config(path)
        except ModelConfigError as exc:
            return self._config_rejected(str(exc))
        if text == self._config_text:
            return False
        try:
            configs = parse_model_server_config(text, path)
            self.check_labels(configs)
        except ModelConfigError as exc:
            self._config_text = text  # report it once, not every poll
            return self._config_rejected(str(exc))
        self._config_text = text
        self.config_error = None
        self.apply_config(configs)
        log.info("model config %s reloaded: %s", path, ", ".join(c.name for c in configs) or "(no models)")
        return True

    def _config_rejected(self, msg: str) -> bool:
        if self.config_error != msg:
            log.error("model config not applied, the running one stays: %s", msg)
        self.config_error = msg
        return False

    def check_labels(self, configs: Iterable[ModelConfig]) -> None:
        """TF Serving's rule: a label may only point at a version that is AVAILABLE."""
        for mc in configs:
            sm = self.models.get(mc.name)
            for label, version in mc.version_labels.items():
                if sm is None or version not in sm.available:
                    state = self._state_of(sm, version) if sm else "the model is not loaded yet"
                    raise ModelConfigError(
                        f"model '{mc.name}': version label '{label}' points at version {version}, which is "
                        f"not available ({state}); labels may only point at available versions")

    def apply_config(self, configs: Sequence[ModelConfig]) -> None:
        now = time.monotonic()
        names = {c.name for c in configs}
        for sm in self.models.values():
            if sm.name not in names and not sm.removed and not sm.static:
                sm.removed = True
                log.info("model '%s' removed from the config; unloading it", sm.name)
                self._reconcile(sm, now)
        for mc in configs:
            sm = self.models.get(mc.name)
            if sm is None or sm.removed:
                if sm is not None:  # re-added while it still unloads: start over
                    del self.models[mc.name]
                sm = self.models[mc.name] = ServedModel(config=mc)
                log.info("model '%s' added (%s, %s)", mc.name, mc.base_path, mc.version_policy.describe())
            else:
                sm.config = mc
            sm.static = False
            self._scan(sm)
            self._reconcile(sm, now)

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(self.models):
            sm = self.models[name]
            labels_of: dict[int, list[str]] = collections.defaultdict(list)
            for label, v in sm.config.version_labels.items():
                labels_of[v].append(label)
            versions = []
            for v in sorted(sm.versions, reverse=True):
                mv = sm.versions[v]
                spec = mv.spec
                own = (spec.own_bytes if spec.own_bytes >= 0 else spec.segment_bytes) if spec else 0
                versions.append({
                    "version": v, "state": mv.state.value, "error": mv.error,
                    "labels": sorted(labels_of.get(v, [])), "serving": v == sm.default,
                    "bytes": spec.segment_bytes if spec else 0, "own_bytes": own,
                    "shared_bytes": (spec.segment_bytes - own) if spec else 0,
                    "segments": spec.all_segments() if spec else [],
                    "load_seconds": mv.load_seconds, "warmup": mv.warmup,
                    "available_since": mv.available_since,
                    "workers": sorted(i for i, keys in self._on_worker.items() if (name, v) in keys),
                })
            out.append({"name": name, "base_path": sm.config.base_path,
                        "policy": sm.config.version_policy.describe(), "labels": dict(sm.config.version_labels),
                        "pinned": sm.pinned, "serving_version": sm.default, "error": sm.error,
                        "removed": sm.removed, "versions": versions})
        return out

    def loader_status(self) -> dict[str, Any]:
        """The loader service: pid and state (stopped, starting, ready, loading)."""
        service = self._service
        if service is None:
            return {"pid": None, "state": "stopped"}
        state = service.state()
        return {"pid": service.proc.pid if service.proc is not None else None, "state": state}

    def flat_status(self) -> list[dict[str, Any]]:
        """One row per version (the original `models` list of the status reply)."""
        rows = []
        for m in self.status():
            for v in sorted(m["versions"], key=lambda r: r["version"]):
                rows.append({"name": m["name"], **v, "segment": v["segments"][0] if v["segments"] else None})
        return rows

    def close(self) -> None:
        self._unlinker.shutdown(wait=True)
        if self._service is not None:
            self._service.close()
        self._job = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------------
    def _model(self, model: Any) -> ServedModel:
        if not isinstance(model, str) or not model:
            raise InvalidArgument("request needs 'model'")
        sm = self.models.get(model)
        if sm is None or sm.removed:
            raise NotFound(f"model '{model}' is not served here; available models: {self._model_names()}")
        return sm

    def _model_names(self) -> str:
        return _names(n for n, sm in self.models.items() if not sm.removed)

    @staticmethod
    def _state_of(sm: ServedModel, version: int) -> str:
        mv = sm.versions.get(version)
        if mv is None:
            return "not loaded" + (" and not on disk" if version not in sm.on_disk and not sm.static else "")
        return mv.state.value + (f": {mv.error}" if mv.error and mv.state is VersionState.FAILED else "")

    @staticmethod
    def _states(sm: ServedModel) -> str:
        if not sm.versions:
            return "no versions found under " + sm.config.base_path
        return ", ".join(f"version {v} {mv.state.value}" for v, mv in sorted(sm.versions.items()))


def _names(items: Iterable[Any]) -> str:
    return ", ".join(sorted(str(k) for k in items)) or "(none)"


def _labels(labels: dict[str, int]) -> str:
    return ", ".join(f"{k} -> {v}" for k, v in sorted(labels.items())) or "(none)"


__all__ = ["ModelManager", "ModelVersion", "ServedModel", "VersionState"]
