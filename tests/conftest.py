"""Shared fixtures: small real SavedModels, and real servers started through the real CLI.

Every server runs in its own process group; teardown kills the group and checks that nothing the
server made is left in /dev/shm.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import psutil
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SHM = "/dev/shm"
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.02) -> T:
    """Polls ``predicate`` until it returns a truthy value, and returns that value. Tests wait for
    the event they need instead of sleeping for a time that is enough only on an idle machine.

    Fails with ``what`` and the predicate's last value (or the exception it last raised) when
    ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except Exception as exc:  # noqa: BLE001 - e.g. a server that is not up yet: try again
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


def import_required(name: str) -> Any:
    """Imports a module the tests need; fails (never skips) with what to do when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"the tests need {name}, which cannot be imported ({exc}); install sgserve with "
                          f"scripts/setup.sh (it installs the [cpu,test] and [serving-apis] extras)") from exc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sgserve_segments() -> set[str]:
    return {n for n in os.listdir(SHM) if n.startswith("sgserve_")}


class ServerProcess:
    """`sgserve start ...` in its own process group, on a free loopback port."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cache_dir: str | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.args = ["--endpoint", self.endpoint] + args
        e = dict(os.environ)
        if cache_dir:
            e["SGSERVE_CACHE_DIR"] = cache_dir
        e.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "sgserve.cli", "start"] + self.args,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, env=e)
        self.output = ""

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        from sgserve.client import Client

        deadline = time.monotonic() + timeout
        with Client(self.endpoint, timeout=1.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    out, err = self.proc.communicate()
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{err[-3000:]}")
                try:
                    st = c.status()
                    if st["workers"] and all(w["state"] == "READY" for w in st["workers"]):
                        return self
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                time.sleep(0.3)
        raise TimeoutError(f"server on {self.endpoint} not ready in {timeout} s")

    def client(self, timeout: float = 30.0):
        from sgserve.client import Client

        return Client(self.endpoint, timeout=timeout)

    def worker_pids(self) -> list[int]:
        with self.client(5.0) as c:
            return [w["pid"] for w in c.status()["workers"]]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            out, err = self.proc.communicate(timeout=10)
            self.output = (out or "") + (err or "")
        except (subprocess.TimeoutExpired, ValueError):
            pass


def group_alive(pgid: int, wait: float = 5.0) -> list[int]:
    """Live (non-zombie) processes of a process group, after giving them ``wait`` s to exit."""
    deadline = time.monotonic() + wait
    while True:
        alive = [p.pid for p in psutil.process_iter(["pid", "status"])
                 if _pgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("sgserve-cache"))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> str:
    """Small real SavedModels in TF Serving layout, built once per test session."""
    from tests import model_builders

    d = str(tmp_path_factory.mktemp("models"))
    model_builders.build_all(d)
    return d


@pytest.fixture
def start_server(cache_dir) -> Iterator:
    servers: list[ServerProcess] = []
    before = sgserve_segments()

    def start(args: list[str], ready: bool = True, **kw) -> ServerProcess:
        s = ServerProcess(args, cache_dir=cache_dir, **kw)
        servers.append(s)
        return s.wait_ready() if ready else s

    yield start
    for s in servers:
        s.stop()
        assert not group_alive(s.proc.pid), f"processes left in the server's group: {group_alive(s.proc.pid)}"
    mine = tuple(f"sgserve_{s.proc.pid}_" for s in servers)
    left = {n for n in sgserve_segments() - before if n.startswith(mine)}
    assert not left, f"shared memory left behind: {left}"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """One demo-model server (2 workers x 1 core) shared by a test module."""
    cache = str(tmp_path_factory.getbasetemp() / "sgserve-cache-demo")
    s = ServerProcess(["--workers", "2", "--cpus-per-worker", "1", "--max-request-bytes", str(4 * 1024 * 1024)],
                      cache_dir=cache)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()
    assert not group_alive(s.proc.pid)


def demo_inputs(n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"user_id": rng.integers(0, 10**6, n).astype(np.int64),
            "item_id": rng.integers(0, 10**6, n).astype(np.int64)}
