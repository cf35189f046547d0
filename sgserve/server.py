"""`sgserve start` as a function: check the cores, load the model once, run the broker, clean up.

The CLI maps its options onto a ServerConfig and calls run(config); tests call the same run through
the real CLI. Everything this server puts in /dev/shm carries its server id and is unlinked on every
exit path; what a killed server left behind is removed by the next start.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import shutil
from typing import TYPE_CHECKING, Any, Callable, Sequence

from sgserve.models import shared_segment
from sgserve.models.manager import ModelManager
from sgserve.models.versions import AVAILABILITY_PRESERVING, RESOURCE_PRESERVING
from sgserve.config import ModelSpec, ServerConfig
from sgserve.errors import ConfigError, NotFound
from sgserve.logs import announce
from sgserve.models.loader import find_versions
from sgserve.models.loader_service import LoaderDied, LoaderService
from sgserve.models.tfs_config import (ModelConfig, parse_model_server_config, parse_version_policy,
                                read_model_server_config)

if TYPE_CHECKING:
    from sgserve.frontdoor.launcher import FrontDoor

log = logging.getLogger(__name__)


def check_endpoint_free(endpoint: str) -> None:
    """Fails fast when a tcp endpoint's port is taken, before minutes of model loading."""
    if not endpoint.startswith("tcp://"):
        return
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if not port.isdigit() or host in ("*", ""):
        return
    _check_port_free(host.strip("[]"), int(port), endpoint)


def _check_port_free(host: str, port: int, what: str) -> None:
    import socket  # noqa: PLC0415

    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {what}: {exc.strerror} (is another server running there?)") from None


def front_door(config: ServerConfig) -> FrontDoor | None:
    """The gRPC/REST gateway processes --port and --rest-api-port ask for (None: neither); their
    ports and TF Serving's monitoring and SSL config files are checked now, before any load."""
    from sgserve.frontdoor.config_files import check_front_door_files  # noqa: PLC0415
    from sgserve.frontdoor.launcher import FrontDoor, gateway_specs  # noqa: PLC0415

    monitoring, ssl = check_front_door_files(config)
    for flag, port in (("--port", config.port), ("--rest-api-port", config.rest_api_port)):
        if port:
            _check_port_free("0.0.0.0", port, f"{flag} {port}")
    metrics_path = monitoring.path if monitoring is not None and monitoring.prometheus_enabled else None
    specs = gateway_specs(config, metrics_path, dataclasses.asdict(ssl) if ssl is not None else None)
    return FrontDoor(specs) if specs else None


def resolve_batching(config: ServerConfig) -> ServerConfig:
    """The config with --enable-batching resolved: the parsed parameters for the workers, and a
    worker_pipeline deep enough to form batches. Without batching the config is returned unchanged.

    A worker holds up to max_enqueued_batches waiting batches plus one running batch per batch
    thread, each of at most max_execution_batch_size rows (= max_batch_size without splitting).
    The broker counts requests, not rows, so single-row requests can fill exactly that; larger
    requests fill the batching queue first and get its 429. Unset num_batch_threads is resolved in
    the worker, after pinning, to its core count: cpus_per_worker.
    """
    from sgserve.models.batching_params import BatchingConfigError, BatchingParameters, load_batching_parameters  # noqa: PLC0415

    if not config.enable_batching:
        if config.batching_parameters_file:
            raise ConfigError(f"--batching-parameters-file {config.batching_parameters_file} needs --enable-batching "
                              f"(TF Serving would ignore the file silently)")
        return config
    try:
        params = (load_batching_parameters(config.batching_parameters_file) if config.batching_parameters_file
                  else BatchingParameters())
    except BatchingConfigError as exc:
        raise ConfigError(f"bad --batching-parameters-file: {exc}") from None
    threads = params.num_batch_threads or config.cpus_per_worker
    pipeline = params.batch_size_limit * (params.max_enqueued_batches + threads)
    return dataclasses.replace(config, batching_parameters=params.to_dict(),
                               worker_pipeline=max(config.worker_pipeline, min(config.max_batching_pipeline, pipeline)))


def model_configs(config: ServerConfig) -> tuple[list[ModelConfig], str | None]:
    """The models to serve: --model-config-file, else --model-base-path (or the demo) as one model."""
    if config.model_config_file:
        if config.model_base_path or config.model_name:
            raise ConfigError("give --model-config-file or --model-base-path/--model-name, not both")
        text = read_model_server_config(config.model_config_file)
        return parse_model_server_config(text, config.model_config_file), text
    policy = parse_version_policy(config.model_version_policy)
    base = (os.path.abspath(config.model_base_path) if config.model_base_path
            else os.path.join(config.cache_dir, "demo"))
    return [ModelConfig(name=config.resolved_model_name(), base_path=base, version_policy=policy)], None


def load_initial(config: ServerConfig, models: list[ModelConfig], loader: LoaderService) -> list[ModelSpec]:
    """Loads what each model's policy wants before serving starts (a failure here stops the start).

    Versions after the first of a model share their unchanged tensors with the one before.
    """
    specs: list[ModelSpec] = []
    for mc in models:
        if not config.model_base_path and not config.model_config_file:
            specs.append(load_model(loader, mc.name, {"name": mc.name, "demo_cache_dir": config.cache_dir}))
            continue
        try:
            on_disk = find_versions(mc.base_path)
        except NotFound as exc:
            raise ConfigError(f"cannot load model '{mc.name}': {exc.message}") from None
        if not on_disk:
            raise ConfigError(f"cannot load model '{mc.name}': model base path {mc.base_path} has no version "
                              f"directories (expected {mc.base_path}/<integer version>/saved_model.pb)")
        wanted = mc.version_policy.select(on_disk)
        if not wanted:
            raise ConfigError(
                f"cannot load model '{mc.name}': no version under {mc.base_path} matches its version policy "
                f"({mc.version_policy.describe()}); versions there: {', '.join(map(str, on_disk)) or '(none)'} "
                f"(expected {mc.base_path}/<integer version>/saved_model.pb)")
        previous = None
        for v in wanted:
            base = previous.segment if previous is not None and config.incremental_updates else None
            previous = load_model(loader, mc.name, {"name": mc.name, "base_path": mc.base_path, "version": v,
                                                    "base_segment": base})
            specs.append(previous)
    for spec in specs:
        log.info("loaded model '%s' version %d: %.1f MiB of variables in %s (%.2f s)",
                 spec.name, spec.version, spec.segment_bytes / 2**20, spec.segment, spec.load_seconds)
    return specs


def load_model(loader: LoaderService, name: str, job: dict[str, Any]) -> ModelSpec:
    """One version through the loader service; its spec, or ConfigError quoting the cause."""
    try:
        answer = loader.load(job)
    except LoaderDied as exc:
        raise ConfigError(f"cannot load model '{name}': {exc}") from None
    except ValueError as exc:  # not JSON: a bug in the loader
        raise ConfigError(f"cannot load model '{name}': unreadable loader answer: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot load model '{name}': cannot start the loader: {exc}") from None
    if not answer.get("ok"):
        raise ConfigError(f"cannot load model '{name}': {answer.get('error')}")
    return ModelSpec.from_dict(answer["spec"])


def spare_cores(cores: Sequence[Sequence[int]]) -> list[int]:
    """Cores no worker is pinned to: updates load there when the machine has any."""
    try:
        allowed = set(os.sched_getaffinity(0))
    except AttributeError:
        return []
    return sorted(allowed - {c for worker in cores for c in worker})


def remove_own_segments(sid: str, segment_dir: str | None = None) -> None:
    """Unlinks every segment this server made, in /dev/shm and in its segment dir."""
    own = f"{shared_segment.SEGMENT_PREFIX}{sid}_"
    for directory in dict.fromkeys([None, segment_dir]):
        for name in shared_segment.list_segments(directory):
            if os.path.basename(name).startswith(own):
                shared_segment.unlink(name)


def check_segment_dir(segment_dir: str) -> None:
    """--segment-dir must be a directory this user can create files in (the loader writes there)."""
    if shared_segment.is_shm_dir(segment_dir):
        return
    if not os.path.isdir(segment_dir):
        raise ConfigError(f"--segment-dir {segment_dir} is not a directory")
    if not os.access(segment_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--segment-dir {segment_dir} is not writable by this user")


@dataclasses.dataclass
class _Checked:
    """What run() needs, each part checked before anything is loaded."""

    config: ServerConfig
    cores: list[list[int]]
    policy: Any
    models: list[ModelConfig]
    config_text: str | None
    front_door: FrontDoor | None


def check(config: ServerConfig) -> _Checked:
    """Everything that can be wrong with the settings fails now, not after a long model load."""
    from sgserve.broker.policies import load_policy  # noqa: PLC0415
    from sgserve.broker.supervisor import assign_cores  # noqa: PLC0415

    config = resolve_batching(config)
    if config.batching_parameters is not None:
        log.info("batching in every worker: %s; up to %d requests per worker",
                 ", ".join(f"{k} {v}" for k, v in config.batching_parameters.items()), config.worker_pipeline)
    try:
        cores = assign_cores(config.workers, config.cpus_per_worker,
                             allow_oversubscribe=config.allow_oversubscribe)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    policy = load_policy(config.policy)
    if config.version_transition not in (AVAILABILITY_PRESERVING, RESOURCE_PRESERVING):
        raise ConfigError(f"--version-transition must be {AVAILABILITY_PRESERVING} or {RESOURCE_PRESERVING}, "
                          f"got {config.version_transition!r}")
    models, config_text = model_configs(config)
    check_segment_dir(config.segment_dir)
    config = dataclasses.replace(config, segment_dir=os.path.abspath(config.segment_dir))  # loader, cleanup
    check_endpoint_free(config.endpoint)
    return _Checked(config, cores, policy, models, config_text, front_door(config))


def announce_serving(config: ServerConfig, specs: list[ModelSpec]) -> None:
    served = ", ".join(f"'{s.name}' version {s.version}" for s in specs) or "no models"
    mib = sum(s.own_bytes if s.own_bytes >= 0 else s.segment_bytes for s in specs) / 2**20
    announce("serving %s (%.1f MiB shared) with %d worker(s) x %d core(s) on %s", served, mib,
             config.workers, config.cpus_per_worker, config.endpoint)


def run(config: ServerConfig, *, worker_command: list[str] | None = None,
        on_ready: Callable[[], None] | None = None) -> int:
    from sgserve.broker.broker import Broker  # noqa: PLC0415

    checked = check(config)
    config = checked.config
    shared_segment.remove_stale_segments((config.segment_dir,))
    sid = shared_segment.server_id()
    runtime_dir = shared_segment.runtime_dir(sid)
    os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
    broker = None

    def on_signal(signum, _frame):
        if broker is not None:
            broker.request_stop()
        else:
            raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    loader = LoaderService(sid, config.segment_dir)  # loads the first versions now, and every update later
    manager = None
    try:
        specs = load_initial(config, checked.models, loader)
        manager = ModelManager(config, server_id=sid, models=checked.models, initial=specs,
                               config_text=checked.config_text, loader=loader, loader_cores=spare_cores(checked.cores))
        manager.check_labels(checked.models)  # a ModelConfigError is a ConfigError: exit 2

        def ready() -> None:
            announce_serving(config, specs)
            if on_ready:
                on_ready()

        broker = Broker(config, manager, server_id=sid, backend_endpoint=f"ipc://{runtime_dir}/backend",
                        worker_command=worker_command, on_ready=ready, cores=checked.cores, policy=checked.policy,
                        front_door=checked.front_door)
        rc = broker.run()
        if rc != 0 and getattr(broker, "fatal_error", None):
            log.error("%s", broker.fatal_error)
        return rc
    except KeyboardInterrupt:
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if manager is not None:
            manager.close()  # the broker closed it already when it ran; closing twice is harmless
        loader.close()
        remove_own_segments(sid, config.segment_dir)
        shutil.rmtree(runtime_dir, ignore_errors=True)
