"""A test host of our own: a network namespace joined to this one by a veth pair (iproute2, as root).

A process run inside it reaches this machine from a non-loopback address that exists only for the
test (10.213.X.2 -> 10.213.X.1), so rules about "other hosts" are tested on real sockets without
sending anything to a network the test did not make.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]


class NetnsUnavailable(RuntimeError):
    """This process may not make network namespaces (not root, no CAP_NET_ADMIN, no iproute2)."""


@dataclass(frozen=True)
class TestHost:
    """A namespace ``name``; this side of the veth pair is ``host_address``, its side ``address``."""

    __test__ = False  # not a pytest test class

    name: str
    host_address: str
    address: str

    def popen(self, module: str, *args: str) -> subprocess.Popen:
        """``python -m module args`` inside the namespace, from the repository root (so `tests` imports)."""
        argv = ["ip", "netns", "exec", self.name, sys.executable, "-m", module, *args]
        return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def run_json(self, module: str, *args: str, timeout: float = 120.0) -> dict:
        """Runs ``module`` inside the namespace and returns the JSON object it printed last."""
        proc = self.popen(module, *args)
        return finish_json(proc, timeout)


def finish_json(proc: subprocess.Popen, timeout: float) -> dict:
    """Waits for ``proc`` (killing its group past ``timeout``) and parses its last stdout line."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} ran past {timeout} s; stderr:\n{err[-3000:]}") from None
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}; stderr:\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``ip ARGS``; with ``check``, NetnsUnavailable when refused for want of rights, else RuntimeError."""
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise NetnsUnavailable("iproute2's `ip` is not installed") from None
    if check and done.returncode != 0:
        said = f"`ip {' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}"
        if "not permitted" in done.stderr or "Permission denied" in done.stderr:
            raise NetnsUnavailable(f"{said} (needs root, or CAP_SYS_ADMIN and CAP_NET_ADMIN)")
        raise RuntimeError(said)
    return done


def _free_subnet() -> int:
    """The X of a 10.213.X.0/24 that no interface here uses, starting from one picked by our pid."""
    used = _ip("-4", "-o", "addr", "show").stdout
    start = os.getpid() % 254
    for i in range(254):
        x = (start + i) % 254 + 1
        if f" 10.213.{x}." not in used:
            return x
    raise RuntimeError("every 10.213.X.0/24 is in use on this machine")


@contextlib.contextmanager
def own_test_host() -> Iterator[TestHost]:
    """Makes the namespace, the veth pair and its addresses (lo and both ends up); removes them all
    on the way out, whatever happened. Raises NetnsUnavailable when this process may not make them."""
    pid = os.getpid()
    name, outer, inner = f"sgtest-{pid}", f"sgv{pid}h", f"sgv{pid}n"
    _ip("netns", "add", name)
    try:
        x = _free_subnet()
        host = TestHost(name, f"10.213.{x}.1", f"10.213.{x}.2")
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", name)
        _ip("addr", "add", f"{host.host_address}/24", "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("-n", name, "addr", "add", f"{host.address}/24", "dev", inner)
        _ip("-n", name, "link", "set", inner, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield host
    finally:
        _ip("netns", "del", name, check=False)  # takes the inner end, and so the pair, with it
        if _ip("link", "show", outer, check=False).returncode == 0:
            _ip("link", "del", outer, check=False)
