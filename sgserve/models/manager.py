"""Model management: TF Serving's manager for every served model, minus the workers.

The ModelManager reads the model config file and the base paths, feeds what it finds to the version
state machine (``versions.VersionTable``), runs the loader queue (one version's segment at a time,
written by the long-lived loader service at the lowest CPU priority), holds segment reference
counts, answers where a request goes (``resolve``), pins and unpins, and reports status.

Getting a written version onto the workers (W_LOAD / W_UNLOAD, one worker out of rotation at a
time) is the broker's rollout coordinator (``sgserve.broker.rollout``); it tells the manager when
every worker has a version (``loaded_everywhere``), when one could not load it (``worker_failed``)
and when none maps it any more (``dropped``). The manager knows no worker and no socket.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from sgserve.config import ModelSpec, ServerConfig
from sgserve.errors import InvalidArgument, NotFound, Unavailable, names
from sgserve.models import shared_segment
from sgserve.models.loader_service import LoaderDied, LoaderService
from sgserve.models.refcounts import SegmentRefs
from sgserve.models.tfs_config import ModelConfig, ModelConfigError, parse_model_server_config, read_model_server_config
from sgserve.models.versions import (Action, CancelLoad, Key, ModelVersion, Release, ServedModel, StartLoad,
                                     VersionState, VersionTable)

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class LoadJob:
    """One version's segment being written by the loader service."""

    key: Key
    started: float
    base: list[str]  # segments of the version it shares unchanged tensors with (held while it runs)


class ModelManager:
    """See the module docstring.

    ``models`` are the configured models, ``initial`` the versions loaded before serving started
    (AVAILABLE at once), ``loader`` the loader service that loaded them (reused for every update;
    one is started on demand when none is given) and ``loader_cores`` the cores no worker uses,
    where updates load.
    """

    def __init__(self, config: ServerConfig, *, server_id: str = "", models: Sequence[ModelConfig] = (),
                 initial: Sequence[ModelSpec] = (), config_text: str | None = None,
                 loader: LoaderService | None = None, loader_cores: Sequence[int] = ()) -> None:
        self.config = config
        self.server_id = server_id
        self.versions = VersionTable(config.version_transition, config.max_num_load_retries,
                                     config.load_retry_interval)
        self.config_error: str | None = None
        self._scanned = False  # the base paths were read once (all --file-system-poll-wait-seconds 0 asks)
        self.refs = SegmentRefs()
        self.loader_cores = list(loader_cores)
        self._config_text = config_text
        self._pending: collections.deque[Key] = collections.deque()  # versions waiting for the loader
        self._job: LoadJob | None = None
        self._service = loader
        self._next_fs_poll = 0.0
        self._next_config_poll = (time.monotonic() + config.model_config_file_poll_wait_seconds
                                  if config.model_config_file_poll_wait_seconds > 0 else float("inf"))
        now, wall = time.monotonic(), time.time()
        for mc in models:
            self.versions.configure(mc)
        for spec in initial:
            self.versions.add_loaded(spec, now, wall)
            self.refs.hold(spec.all_segments())
        for name in list(self.models):
            self._scan(name)
            self.versions.refresh_default(name)  # the first tick reconciles

    @property
    def models(self) -> dict[str, ServedModel]:
        return self.versions.models

    def is_served(self, name: str) -> bool:
        sm = self.versions.models.get(name)
        return sm is not None and not sm.removed

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
            return self._resolve_label(sm, version, label)
        if version is None:
            if sm.default is None:
                raise Unavailable(f"model '{model}' has no available version yet ({VersionTable.states(sm)})")
            return sm.available[sm.default]
        if not isinstance(version, int) or isinstance(version, bool):
            raise InvalidArgument(f"'version' must be an integer, got {version!r}")
        spec = sm.available.get(version)
        if spec is None:
            known = sm.versions.get(version)
            state = f" available version {version} (it is {VersionTable.state_of(sm, version)})" if known else \
                f" version {version}"
            raise NotFound(f"model '{model}' has no{state}; available versions: {names(sm.available)}")
        return spec

    def _resolve_label(self, sm: ServedModel, version: Any, label: Any) -> ModelSpec:
        if version is not None:
            raise InvalidArgument("give 'version' or 'version_label', not both")
        if not isinstance(label, str):
            raise InvalidArgument(f"'version_label' must be a string, got {label!r}")
        version = sm.config.version_labels.get(label)
        if version is None:
            raise NotFound(f"model '{sm.name}' has no version label '{label}'; labels: "
                           f"{_labels(sm.config.version_labels)}")
        spec = sm.available.get(version)
        if spec is None:
            raise NotFound(f"model '{sm.name}' version label '{label}' points at version {version}, which is "
                           f"not available ({VersionTable.state_of(sm, version)}); available versions: "
                           f"{names(sm.available)}")
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
        self._scan(sm.name)
        if version not in set(sm.on_disk) | set(sm.available):
            raise NotFound(f"model '{model}' has no version {version} on disk under {sm.config.base_path}; "
                           f"versions there: {', '.join(map(str, sm.on_disk)) or '(none)'}")
        log.info("model '%s': pinned to version %d", model, version)
        self._apply(self.versions.pin(sm.name, version, time.monotonic()))
        return self._pin_reply(sm)

    def unpin(self, model: str) -> dict[str, Any]:
        sm = self._model(model)
        if sm.pinned is not None:
            log.info("model '%s': unpinned from version %d; back to its policy (%s)", model, sm.pinned,
                     sm.config.version_policy.describe())
        self._apply(self.versions.pin(sm.name, None, time.monotonic()))
        return self._pin_reply(sm)

    @staticmethod
    def _pin_reply(sm: ServedModel) -> dict[str, Any]:
        state = VersionTable.state_of(sm, sm.pinned) if sm.pinned is not None else None
        return {"model": sm.name, "pinned": sm.pinned, "pinned_state": state, "serving_version": sm.default}

    # -- what the rollout coordinator asks and tells -------------------------------------------
    def for_workers(self) -> Iterator[tuple[ModelVersion, ModelSpec]]:
        """Versions workers should map (AVAILABLE, or LOADING with the segment written)."""
        return self.versions.for_workers()

    def state(self, key: Key) -> VersionState | None:
        return self.versions.state(key)

    def to_drop(self) -> list[Key]:
        """Versions whose segments should leave the workers: FAILED ones, and UNLOADING ones once drained."""
        return self.versions.with_segments(VersionState.FAILED, VersionState.UNLOADING)

    def loaded_everywhere(self, keys: Iterable[Key], workers: int, now: float) -> None:
        self._apply(self.versions.loaded_everywhere(keys, workers, now, time.time()))

    def worker_failed(self, key: Key, msg: str, now: float) -> None:
        """A worker could not load a LOADING version (or timed out): it fails."""
        self._apply(self.versions.fail(key, msg, now))

    def dropped(self, key: Key) -> None:
        """No worker maps ``key`` any more: its segments are released."""
        self._apply(self.versions.dropped(key))

    def note_warmup(self, name: Any, version: Any, warmed: Any) -> None:
        self.versions.note_warmup(name, version, warmed)

    def split_verdict(self, name: str, version: int, signature: str) -> tuple[bool, str | None]:
        """(known, why not): whether the version's signature answered the same split and unsplit when
        a worker loaded it (worker/split_check.py). Not known until a worker has said."""
        sm = self.versions.models.get(name)
        mv = sm.versions.get(version) if sm is not None else None
        if mv is None or mv.warmup is None:
            return False, None
        verdicts = mv.warmup.get("split")
        if not isinstance(verdicts, dict):
            return True, "not checked at load"
        return True, verdicts.get(signature, "not checked at load")

    def forget_removed(self) -> None:
        self.versions.forget_removed()

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, StartLoad):
                self._pending.append(action.key)
            elif isinstance(action, CancelLoad):
                if self._job is not None and self._job.key == action.key:
                    self._loader().kill()  # the next poll sees it die and cleans up
            elif isinstance(action, Release):
                self.refs.release(action.segments)

    # -- the periodic step ---------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Re-reads the config file and the base paths when their poll intervals are due."""
        if now >= self._next_config_poll:
            self._next_config_poll = now + self.config.model_config_file_poll_wait_seconds
            self.reload_config()
        if now >= self._next_fs_poll:
            wait = self.config.file_system_poll_wait_seconds
            self._next_fs_poll = now + max(wait, 0.05)
            scan = wait > 0 or not self._scanned  # TF Serving's 0: the base paths are read once
            self._scanned = True
            for name, sm in list(self.models.items()):
                if not sm.removed:
                    if scan:
                        self._scan(name)
                    self._apply(self.versions.reconcile(name, now))

    def advance_loader(self, now: float) -> None:
        """Collects the loader's answer, if any, and starts the next queued load."""
        self._poll_job(now)
        self._start_next_load(now)

    def _scan(self, name: str) -> None:
        """Reads the versions on disk (integer directory names), as TF Serving's storage path source."""
        base = self.models[name].config.base_path
        try:
            found = [int(e) for e in os.listdir(base) if e.isdigit() and os.path.isdir(os.path.join(base, e))]
        except OSError as exc:
            self.versions.disk_unreadable(name, f"base path {base} cannot be read: {exc.strerror}")
            return
        self.versions.disk_scanned(name, found)

    # -- the loader queue ----------------------------------------------------------------------
    def _start_next_load(self, now: float) -> None:
        if self._job is not None:
            return
        for _ in range(len(self._pending)):
            key = self._pending.popleft()
            ready = self.versions.ready_to_load(key, now)
            if ready is None:
                continue  # cancelled or already past this phase
            if not ready:
                self._pending.append(key)
                continue
            self._submit(key, now)
            return

    def _loader(self) -> LoaderService:
        if self._service is None:
            self._service = LoaderService(self.server_id, self.config.segment_dir)
        return self._service

    def _submit(self, key: Key, now: float) -> None:
        sm = self.models[key[0]]
        base = self._incremental_base(sm, key[1])
        try:
            self._loader().submit({"name": key[0], "base_path": sm.config.base_path, "version": key[1],
                                   "base_segment": base.segment if base is not None else None,
                                   "background": True, "cores": self.loader_cores,
                                   "load_bandwidth": self.config.load_bandwidth})
        except OSError as exc:
            self._apply(self.versions.load_failed(key, f"cannot start the loader: {exc}", now))
            return
        held = base.all_segments() if base is not None else []
        self.refs.hold(held)
        self._job = LoadJob(key, now, held)
        log.info("model '%s': loading version %d%s", key[0], key[1],
                 f" (sharing unchanged tensors with version {base.version})" if base is not None else "")

    def _incremental_base(self, sm: ServedModel, version: int) -> ModelSpec | None:
        if not self.config.incremental_updates or not sm.available:
            return None
        candidates = list(sm.available.values())
        older = [s for s in candidates if s.version < version]
        return max(older or candidates, key=lambda s: s.version)

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
        self.refs.release(job.base)
        spec = ModelSpec.from_dict(answer["spec"]) if answer.get("ok") else None
        if answer.get("died"):
            self._remove_orphans(job.key)
        if spec is None:
            self._apply(self.versions.load_failed(job.key, str(answer.get("error")), now))
        elif not self.versions.segment_written(job.key, spec):  # cancelled while it loaded
            self.refs.unlink_if_free(spec.all_segments())
        else:
            self.refs.hold(spec.all_segments())
            own = spec.own_bytes if spec.own_bytes >= 0 else spec.segment_bytes
            log.info("model '%s' version %d: segment written (%.1f MiB new, %.1f MiB shared) in %.2f s; "
                     "workers load it next", job.key[0], job.key[1], own / 2**20,
                     (spec.segment_bytes - own) / 2**20, spec.load_seconds)

    def _remove_orphans(self, key: Key) -> None:
        """Segments a killed loader was writing for ``key`` (no version refers to them)."""
        probe = shared_segment.segment_name(self.server_id, key[0], key[1], self.config.segment_dir)
        prefix = probe[:probe.rindex("_") + 1]
        self.refs.unlink_if_free(seg for seg in shared_segment.list_segments(self.config.segment_dir)
                                 if seg.startswith(prefix))

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

    def apply_config_text(self, text: str, source: str) -> list[str]:
        """A ModelServerConfig sent over the wire (TF Serving's HandleReloadConfigRequest), applied as a
        reloaded --model-config-file is; the file, when there is one, wins again once it changes.
        Returns the configured model names; ModelConfigError leaves the running config as it is."""
        configs = parse_model_server_config(text, source)
        self.check_labels(configs)
        self.config_error = None
        self.apply_config(configs)
        log.info("model config from %s applied: %s", source, ", ".join(c.name for c in configs) or "(no models)")
        return [c.name for c in configs]

    def _config_rejected(self, msg: str) -> bool:
        if self.config_error != msg:
            log.error("model config not applied, the running one stays: %s", msg)
        self.config_error = msg
        return False

    def check_labels(self, configs: Iterable[ModelConfig]) -> None:
        """TF Serving's rule: a label may only point at a version that is AVAILABLE; with
        --allow-version-labels-for-unavailable-models, a new label may point anywhere (it answers once its
        version is available), but an existing one moves only onto an available version."""
        allow = self.config.allow_version_labels_for_unavailable_models
        for mc in configs:
            sm = self.models.get(mc.name)
            current = sm.config.version_labels if sm is not None and not sm.removed else {}
            for label, version in sorted(mc.labels_to_check(current, allow).items()):
                never = mc.never_served(label, version)
                if never is not None:
                    raise never
                if sm is None or version not in sm.available:
                    state = VersionTable.state_of(sm, version) if sm else "the model is not loaded yet"
                    raise ModelConfigError(
                        f"model '{mc.name}': version label '{label}' points at version {version}, which is "
                        f"not available ({state}); labels may only point at available versions")

    def apply_config(self, configs: Sequence[ModelConfig]) -> None:
        now = time.monotonic()
        wanted = {c.name for c in configs}
        for name, sm in list(self.models.items()):
            if name not in wanted and not sm.removed:
                log.info("model '%s' removed from the config; unloading it", name)
                self._apply(self.versions.remove(name, now))
        for mc in configs:
            known = self.models.get(mc.name)
            if known is None or known.removed:
                log.info("model '%s' added (%s, %s)", mc.name, mc.base_path, mc.version_policy.describe())
            self.versions.configure(mc)
            self._scan(mc.name)
            self._apply(self.versions.reconcile(mc.name, now))

    # -- status ---------------------------------------------------------------------------------
    def status(self, workers_of: Callable[[Key], list[int]] = lambda _key: []) -> list[dict[str, Any]]:
        """Every model and version; ``workers_of`` says which workers have a version loaded."""
        out = []
        for name in sorted(self.models):
            sm = self.models[name]
            labels_of: dict[int, list[str]] = collections.defaultdict(list)
            for label, v in sm.config.version_labels.items():
                labels_of[v].append(label)
            versions = [dict(_version_row(sm.versions[v], v == sm.default), labels=sorted(labels_of.get(v, [])),
                             workers=sorted(workers_of((name, v))))
                        for v in sorted(sm.versions, reverse=True)]
            out.append({"name": name, "base_path": sm.config.base_path,
                        "policy": sm.config.version_policy.describe(), "labels": dict(sm.config.version_labels),
                        "pinned": sm.pinned, "serving_version": sm.default, "error": sm.error,
                        "removed": sm.removed, "versions": versions})
        return out

    def flat_status(self, workers_of: Callable[[Key], list[int]] = lambda _key: []) -> list[dict[str, Any]]:
        """One row per version (the original `models` list of the status reply)."""
        rows = []
        for m in self.status(workers_of):
            for v in sorted(m["versions"], key=lambda r: r["version"]):
                rows.append({"name": m["name"], **v, "segment": v["segments"][0] if v["segments"] else None})
        return rows

    def loader_status(self) -> dict[str, Any]:
        """The loader service: pid and state (stopped, starting, ready, loading)."""
        service = self._service
        if service is None:
            return {"pid": None, "state": "stopped"}
        state = service.state()
        return {"pid": service.proc.pid if service.proc is not None else None, "state": state}

    def close(self) -> None:
        self.refs.close()
        if self._service is not None:
            self._service.close()
        self._job = None

    # -- helpers ---------------------------------------------------------------------------------
    def _model(self, model: Any) -> ServedModel:
        if not isinstance(model, str) or not model:
            raise InvalidArgument("request needs 'model'")
        sm = self.models.get(model)
        if sm is None or sm.removed:
            raise NotFound(f"model '{model}' is not served here; available models: {self._model_names()}")
        return sm

    def _model_names(self) -> str:
        return names(n for n, sm in self.models.items() if not sm.removed)


def _version_row(mv: ModelVersion, serving: bool) -> dict[str, Any]:
    spec = mv.spec
    own = (spec.own_bytes if spec.own_bytes >= 0 else spec.segment_bytes) if spec else 0
    return {"version": mv.version, "state": mv.state.value, "error": mv.error, "labels": [], "serving": serving,
            "bytes": spec.segment_bytes if spec else 0, "own_bytes": own,
            "shared_bytes": (spec.segment_bytes - own) if spec else 0,
            "segments": spec.all_segments() if spec else [],
            # shm (RAM) or the segment dir; a version on the file tier may share tensors with one before it
            "tier": shared_segment.tier(spec.segment) if spec else None,
            "load_seconds": mv.load_seconds, "available_since": mv.available_since, "workers": [],
            # The worker reports both with its warmup; status shows them apart (split: signature -> why
            # it is served unsplit, None when the broker may split it; absent when splitting is off).
            "warmup": {k: v for k, v in mv.warmup.items() if k != "split"} if mv.warmup else mv.warmup,
            "split": mv.warmup.get("split") if mv.warmup else None}


def _labels(labels: dict[str, int]) -> str:
    return ", ".join(f"{k} -> {v}" for k, v in sorted(labels.items())) or "(none)"


__all__ = ["ModelManager", "ModelVersion", "ServedModel", "VersionState"]
