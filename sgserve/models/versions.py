"""Which versions of each model exist and what state each is in: TF Serving's version lifecycle as a
pure state machine.

A version moves LOADING -> AVAILABLE -> UNLOADING -> END, or to FAILED (with the error). The table
takes events (the disk was scanned, a segment was written, every worker has a version, a load failed,
workers dropped a version, a pin) and returns actions for its owner to carry out (queue a load for
the loader, cancel the loader's job, release a version's segments). It opens no socket, starts no
process and reads no clock: time comes in with each event, so tests feed it events and read the
states and actions that come out.

Availability-preserving (the default, as TF Serving): a superseded version unloads only after a
wanted version is AVAILABLE and none is still loading, so a corrupt new version leaves the old one
serving. Resource-preserving: unload first, then load. A version whose directory disappears from
disk unloads at once (after draining), whatever the policy.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Any, Iterable, Iterator, Union

from sgserve.config import ModelSpec
from sgserve.models.tfs_config import ModelConfig

log = logging.getLogger(__name__)

Key = tuple[str, int]

AVAILABILITY_PRESERVING = "availability-preserving"
RESOURCE_PRESERVING = "resource-preserving"


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
    available_since: float | None = None  # wall clock (time.time())


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

    @property
    def name(self) -> str:
        return self.config.name


@dataclasses.dataclass(frozen=True)
class StartLoad:
    """Queue the version for the loader (it may start at the version's ``retry_at``)."""

    key: Key


@dataclasses.dataclass(frozen=True)
class CancelLoad:
    """The loader may be writing a version that is no longer wanted: stop it."""

    key: Key


@dataclasses.dataclass(frozen=True)
class Release:
    """No worker maps the version any more: drop its references to these segments."""

    key: Key
    segments: tuple[str, ...]


Action = Union[StartLoad, CancelLoad, Release]


class VersionTable:
    """Every served model's versions; the only writer of ModelVersion and ServedModel state."""

    def __init__(self, transition: str = AVAILABILITY_PRESERVING, max_retries: int = 5,
                 retry_interval: float = 60.0) -> None:
        if transition not in (AVAILABILITY_PRESERVING, RESOURCE_PRESERVING):
            raise ValueError(f"version transition must be {AVAILABILITY_PRESERVING} or {RESOURCE_PRESERVING}, "
                             f"got {transition!r}")
        self.transition = transition
        self.max_retries = max_retries
        self.retry_interval = retry_interval
        self.models: dict[str, ServedModel] = {}

    # -- reading -----------------------------------------------------------------------------
    def get(self, key: Key) -> ModelVersion | None:
        sm = self.models.get(key[0])
        return sm.versions.get(key[1]) if sm is not None else None

    def state(self, key: Key) -> VersionState | None:
        mv = self.get(key)
        return mv.state if mv is not None else None

    def for_workers(self) -> Iterator[tuple[ModelVersion, ModelSpec]]:
        """Versions workers should map: AVAILABLE ones and LOADING ones whose segment is written."""
        for sm in self.models.values():
            for mv in sm.versions.values():
                if mv.spec is not None and mv.state in (VersionState.AVAILABLE, VersionState.LOADING):
                    yield mv, mv.spec

    def with_segments(self, *states: VersionState) -> list[Key]:
        """Versions in one of ``states`` that still hold segments."""
        return [(sm.name, mv.version) for sm in self.models.values() for mv in sm.versions.values()
                if mv.spec is not None and mv.state in states]

    def ready_to_load(self, key: Key, now: float) -> bool | None:
        """Whether the loader may start on ``key`` now; None when it no longer needs loading."""
        sm = self.models.get(key[0])
        mv = sm.versions.get(key[1]) if sm is not None else None
        if mv is None or mv.state is not VersionState.LOADING or mv.spec is not None:
            return None
        return now >= mv.retry_at and not self._must_wait_for_unload(sm)

    @staticmethod
    def state_of(sm: ServedModel, version: int) -> str:
        mv = sm.versions.get(version)
        if mv is None:
            return "not loaded" + (" and not on disk" if version not in sm.on_disk else "")
        return mv.state.value + (f": {mv.error}" if mv.error and mv.state is VersionState.FAILED else "")

    @staticmethod
    def states(sm: ServedModel) -> str:
        if not sm.versions:
            return "no versions found under " + sm.config.base_path
        return ", ".join(f"version {v} {mv.state.value}" for v, mv in sorted(sm.versions.items()))

    # -- events: configuration -------------------------------------------------------------------
    def configure(self, config: ModelConfig) -> ServedModel:
        """Adds a model or updates its config; a model re-added while it still unloads starts over."""
        sm = self.models.get(config.name)
        if sm is None or sm.removed:
            sm = self.models[config.name] = ServedModel(config=config)
        else:
            sm.config = config
        return sm

    def remove(self, name: str, now: float) -> list[Action]:
        sm = self.models[name]
        sm.removed = True
        return self.reconcile(name, now)

    def add_loaded(self, spec: ModelSpec, now: float, wall: float) -> None:
        """A version loaded before serving started: AVAILABLE at once (its model must be configured)."""
        sm = self.models.get(spec.name)
        if sm is None:
            raise ValueError(f"model '{spec.name}' has no config")
        sm.versions[spec.version] = ModelVersion(spec.version, VersionState.AVAILABLE, spec,
                                                 load_seconds=spec.load_seconds, available_since=wall,
                                                 requested_at=now)
        sm.available[spec.version] = spec

    def disk_scanned(self, name: str, on_disk: list[int]) -> None:
        sm = self.models[name]
        if not on_disk and sm.on_disk:
            log.warning("model '%s': no version directories under %s", name, sm.config.base_path)
        sm.on_disk = sorted(on_disk)
        if sm.error and sm.error.startswith("base path"):
            sm.error = None

    def disk_unreadable(self, name: str, msg: str) -> None:
        """Keeps what is loaded: a base path on a flaky mount is not a reason to go dark."""
        sm = self.models[name]
        if sm.error != msg:
            log.error("model '%s': %s", name, msg)
        sm.error = msg

    def pin(self, name: str, version: int | None, now: float) -> list[Action]:
        self.models[name].pinned = version
        return self.reconcile(name, now)

    # -- events: loading ---------------------------------------------------------------------
    def segment_written(self, key: Key, spec: ModelSpec) -> bool:
        """The loader wrote ``key``'s segment; False when the version is no longer wanted."""
        mv = self.get(key)
        if mv is None or mv.state is not VersionState.LOADING:
            return False
        mv.spec = spec
        return True

    def load_failed(self, key: Key, msg: str, now: float) -> list[Action]:
        """The loader could not write the version: retry it (--max-num-load-retries), then fail it."""
        mv = self.get(key)
        if mv is None or mv.state is not VersionState.LOADING:
            return []
        mv.attempts += 1
        if mv.attempts <= self.max_retries:
            mv.error = (f"load attempt {mv.attempts} failed: {msg}; retrying in {self.retry_interval:g} s "
                        f"(--max-num-load-retries {self.max_retries})")
            mv.retry_at = now + self.retry_interval
            log.warning("model '%s' version %d: %s", key[0], key[1], mv.error)
            return [StartLoad(key)]
        return self.fail(key, msg if mv.attempts == 1 else f"{msg} (after {mv.attempts} attempts)", now)

    def fail(self, key: Key, msg: str, now: float) -> list[Action]:
        """A LOADING version cannot be served; its segments go once no worker maps it."""
        mv = self.get(key)
        if mv is None or mv.state is not VersionState.LOADING:
            return []
        log.error("model '%s' version %d FAILED: %s", key[0], key[1], msg)
        mv.state = VersionState.FAILED
        mv.error = msg
        return self.reconcile(key[0], now)

    def loaded_everywhere(self, keys: Iterable[Key], workers: int, now: float, wall: float) -> list[Action]:
        """Every READY worker has these versions: LOADING ones become AVAILABLE (the switch)."""
        changed: dict[str, None] = {}
        for key in keys:
            mv = self.get(key)
            if mv is None or mv.state is not VersionState.LOADING or mv.spec is None:
                continue
            mv.state = VersionState.AVAILABLE
            mv.error = None
            mv.load_seconds = round(now - mv.requested_at, 3)
            mv.available_since = wall
            self.models[key[0]].available[key[1]] = mv.spec
            changed[key[0]] = None
            log.info("model '%s' version %d AVAILABLE on %d worker(s), %.2f s after it was found",
                     key[0], key[1], workers, mv.load_seconds)
        actions: list[Action] = []
        for name in changed:
            actions += self.reconcile(name, now)  # superseded versions may go now
        return actions

    def note_warmup(self, name: Any, version: Any, warmed: Any) -> None:
        sm = self.models.get(name) if isinstance(name, str) else None
        mv = sm.versions.get(version) if sm is not None else None
        if mv is not None and mv.warmup is None and isinstance(warmed, dict):
            mv.warmup = warmed

    # -- events: unloading -------------------------------------------------------------------
    def dropped(self, key: Key) -> list[Action]:
        """No worker maps the version any more: its segments go (unless a later version shares them)."""
        mv = self.get(key)
        if mv is None or mv.spec is None:
            return []
        segments = tuple(mv.spec.all_segments())
        mv.spec = None
        if mv.state is VersionState.UNLOADING:
            mv.state = VersionState.END
            log.info("model '%s' version %d END (unloaded, segments released)", key[0], key[1])
        return [Release(key, segments)]

    def forget_removed(self) -> list[str]:
        """Models dropped from the config whose versions have all ended; they are forgotten."""
        gone = [name for name, sm in self.models.items() if sm.removed and all(
            mv.state in (VersionState.END, VersionState.FAILED) for mv in sm.versions.values())]
        for name in gone:
            del self.models[name]
            log.info("model '%s' removed", name)
        return gone

    # -- the desired state -------------------------------------------------------------------
    def reconcile(self, name: str, now: float) -> list[Action]:
        """Starts loads for wanted versions and unloads for unwanted ones."""
        sm = self.models[name]
        aspired = set() if sm.removed else set(sm.config.version_policy.select(sm.on_disk))
        if sm.pinned is not None and sm.pinned in sm.on_disk:
            aspired.add(sm.pinned)
        sm.aspired = aspired
        actions: list[Action] = []
        for v in sorted(aspired):
            mv = sm.versions.get(v)
            if mv is None or mv.state is VersionState.END:
                sm.versions[v] = ModelVersion(v, requested_at=now)
                actions.append(StartLoad((name, v)))
                log.info("model '%s': version %d found; loading it", name, v)
        on_disk = set(sm.on_disk)
        for v, mv in list(sm.versions.items()):
            if v in aspired:
                continue
            gone = v not in on_disk
            if mv.state is VersionState.FAILED and gone:
                del sm.versions[v]  # gone from disk: forget the failure (a new copy may come)
            elif mv.state in (VersionState.LOADING, VersionState.AVAILABLE):
                if sm.removed or (gone and not self._bridging(sm, mv)) or (not gone and self._may_unload(sm)):
                    why = ("its model was removed from the config" if sm.removed else
                           "its directory was removed" if gone else "superseded")
                    actions += self._begin_unload(sm, mv, why)
        self._refresh_default(sm)
        return actions

    def _begin_unload(self, sm: ServedModel, mv: ModelVersion, why: str) -> list[Action]:
        log.info("model '%s' version %d UNLOADING (%s)", sm.name, mv.version, why)
        if mv.state is VersionState.LOADING and mv.spec is None:
            mv.state = VersionState.END  # never written (or the loader is cancelled)
            return [CancelLoad((sm.name, mv.version))]
        mv.state = VersionState.UNLOADING
        sm.available.pop(mv.version, None)
        return []

    def _may_unload(self, sm: ServedModel) -> bool:
        """Whether superseded versions may go now: resource-preserving always; availability-preserving
        once a wanted version serves and none is still loading."""
        if self.transition == RESOURCE_PRESERVING:
            return True
        wanted = [sm.versions[v] for v in sm.aspired if v in sm.versions]
        return (any(mv.state is VersionState.AVAILABLE for mv in wanted)
                and not any(mv.state is VersionState.LOADING for mv in wanted))

    def _bridging(self, sm: ServedModel, mv: ModelVersion) -> bool:
        """Availability-preserving: a version whose directory vanished keeps serving (its bytes are in
        shared memory) while the version replacing it loads, so requests see no gap."""
        if self.transition == RESOURCE_PRESERVING or mv.state is not VersionState.AVAILABLE:
            return False
        wanted = [sm.versions[v] for v in sm.aspired if v in sm.versions]
        return (not any(w.state is VersionState.AVAILABLE for w in wanted)
                and any(w.state is VersionState.LOADING for w in wanted))

    def _must_wait_for_unload(self, sm: ServedModel) -> bool:
        """Resource-preserving: no load while an unwanted version of the model still holds memory."""
        if self.transition != RESOURCE_PRESERVING:
            return False
        return any(mv.state in (VersionState.AVAILABLE, VersionState.UNLOADING)
                   for v, mv in sm.versions.items() if v not in sm.aspired)

    def refresh_default(self, name: str) -> None:
        self._refresh_default(self.models[name])

    @staticmethod
    def _refresh_default(sm: ServedModel) -> None:
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


__all__ = ["Action", "CancelLoad", "Key", "ModelVersion", "Release", "ServedModel", "StartLoad",
           "VersionState", "VersionTable"]
