"""`sgserve start` as a function: check the cores, load the model once, run the broker, clean up.

The CLI maps its options onto a ServerConfig and calls run(config); tests call the same run through
the real CLI. Everything this server puts in /dev/shm carries its server id and is unlinked on every
exit path; what a killed server left behind is removed by the next start.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import shutil
from typing import Callable

from sgserve import shared_segment
from sgserve.config import ModelSpec, ServerConfig

log = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2
EXIT_MODEL_ERROR = 2


class ConfigError(Exception):
    """A setting that cannot work on this machine; the message says what to change."""


def check_endpoint_free(endpoint: str) -> None:
    """Fails fast when a tcp endpoint's port is taken, before minutes of model loading."""
    import socket  # noqa: PLC0415

    if not endpoint.startswith("tcp://"):
        return
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if not port.isdigit() or host in ("*", ""):
        return
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, int(port)))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {endpoint}: {exc.strerror} (is another server running there?)") from None


def load_model(config: ServerConfig, sid: str) -> ModelSpec:
    """Runs the loader process; returns the loaded version's spec or raises ConfigError."""
    name = config.resolved_model_name()
    cmd = [sys.executable, "-m", "sgserve.loader", "--name", name, "--server-id", sid]
    if config.model_base_path:
        cmd += ["--base-path", os.path.abspath(config.model_base_path)]
    else:
        cmd += ["--demo-cache-dir", config.cache_dir]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = "", []
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:  # progress lines pass through; TF noise is dropped
            if line.startswith("[sgserve]") or line.startswith("sgserve:"):
                sys.stderr.write(line)
                sys.stderr.flush()
            err.append(line)
        out = proc.stdout.read()
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        msg = next((ln.strip() for ln in reversed(err) if ln.startswith("sgserve:")), None)
        raise ConfigError(msg or f"loader exited with code {rc}: {''.join(err[-5:]).strip()}")
    return ModelSpec.from_dict(json.loads(out.strip().splitlines()[-1]))


def remove_own_segments(sid: str) -> None:
    for name in shared_segment.list_segments():
        if name.startswith(f"/{shared_segment.SEGMENT_PREFIX}{sid}_"):
            shared_segment.unlink(name)


def run(config: ServerConfig, *, worker_command: list[str] | None = None,
        on_ready: Callable[[], None] | None = None) -> int:
    from sgserve.broker import Broker, assign_cores  # noqa: PLC0415
    from sgserve.broker.policies import load_policy  # noqa: PLC0415

    # Everything that can be wrong with the settings fails now, not after a long model load.
    try:
        cores = assign_cores(config.workers, config.cpus_per_worker,
                             allow_oversubscribe=config.allow_oversubscribe)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    policy = load_policy(config.policy)
    check_endpoint_free(config.endpoint)
    shared_segment.remove_stale_segments()
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
    try:
        spec = load_model(config, sid)
        mib = spec.segment_bytes / (1024 * 1024)
        log.info("loaded model '%s' version %d: %.1f MiB of variables in %s (%.2f s)",
                 spec.name, spec.version, mib, spec.segment, spec.load_seconds)

        def ready() -> None:
            print(f"sgserve: serving model '{spec.name}' version {spec.version} ({mib:.1f} MiB shared) "
                  f"with {config.workers} worker(s) x {config.cpus_per_worker} core(s) on {config.endpoint}",
                  file=sys.stderr, flush=True)
            if on_ready:
                on_ready()

        broker = Broker(config, [spec], server_id=sid, backend_endpoint=f"ipc://{runtime_dir}/backend",
                        worker_command=worker_command, on_ready=ready, cores=cores, policy=policy)
        rc = broker.run()
        if rc != 0 and getattr(broker, "fatal_error", None):
            print(f"sgserve: {broker.fatal_error}", file=sys.stderr, flush=True)
        return rc
    except KeyboardInterrupt:
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        remove_own_segments(sid)
        shutil.rmtree(runtime_dir, ignore_errors=True)
