"""Helpers shared by the bench/*.py scripts (not a benchmark itself).

- machine_info(): nproc, CPU model, RAM, Python/TF versions, for every result JSON;
- Server: `sgserve start ...` through the real CLI, in its own process group, on a free loopback
  port; ready when Client.ping() answers and every worker is READY; always stopped (SIGTERM, then
  SIGKILL of the group) and /dev/shm checked for leftovers;
- tree_memory(): USS/PSS of a process tree, split into "the segment mapping" and "the rest";
- percentiles, JSON/PNG output, a progress logger on stderr.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Iterator

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
CACHE_DIR = os.path.join(BENCH_DIR, ".cache")
SHM = "/dev/shm"
MiB = 1024 * 1024
GiB = 1024 * MiB

if REPO not in sys.path:  # run from anywhere without installing
    sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_T0 = time.monotonic()


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.monotonic() - _T0:7.1f}s] {msg}\n")
    sys.stderr.flush()


def sigterm_as_exit() -> None:
    """SIGTERM to a bench script runs its finally blocks (so servers get stopped) like Ctrl-C."""
    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------------------------------- machine
def _pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version  # noqa: PLC0415
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def machine_info() -> dict[str, Any]:
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = None
    try:
        import psutil  # noqa: PLC0415
        mem_total = psutil.virtual_memory().total
    except Exception:  # noqa: BLE001
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_bytes": mem_total,
        "ram_gib": round(mem_total / GiB, 1) if mem_total else None,
        "python": platform.python_version(),
        "tensorflow": _pkg_version("tensorflow-cpu") or _pkg_version("tensorflow"),
        "pyzmq": _pkg_version("pyzmq"),
        "numpy": _pkg_version("numpy"),
        "sgserve": _pkg_version("sgserve"),
        "kernel": platform.release(),
        "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ------------------------------------------------------------------------------------------ output
def write_json(name: str, data: dict[str, Any]) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    log(f"wrote {os.path.relpath(path)}")
    return path


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (the caller skips its PNG with a note)."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
        return plt
    except Exception:  # noqa: BLE001
        log("matplotlib is not installed: skipping the PNG (pip install matplotlib to get it)")
        return None


def png_path(name: str) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    return os.path.join(RESULTS_DIR, f"{name}.png")


def save_figure(fig, name: str, benchmark: str, machine: dict) -> str:
    """Titles a benchmark's figure with the machine it ran on and writes it next to the JSON."""
    fig.suptitle(f"{benchmark}: {machine['nproc']} cores {machine['cpu_model']}, TF {machine['tensorflow']}",
                 fontsize=9)
    fig.tight_layout()
    path = png_path(name)
    fig.savefig(path, dpi=110)
    log(f"wrote {os.path.relpath(path)}")
    return path


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (same definition as sgserve.bench.results.percentile)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    if not n:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# ------------------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sgserve_segments() -> set[str]:
    try:
        return {n for n in os.listdir(SHM) if n.startswith("sgserve_")}
    except FileNotFoundError:
        return set()


class ServerError(RuntimeError):
    pass


class Server:
    """`python -m sgserve.cli start --endpoint tcp://127.0.0.1:PORT ARGS...` in its own process group."""

    def __init__(self, args: list[str], label: str = "sgserve") -> None:
        self.args = list(args)
        self.label = label
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        os.makedirs(os.path.join(CACHE_DIR, "logs"), exist_ok=True)
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in label)
        self.log_file = open(os.path.join(CACHE_DIR, "logs", f"{safe}-{self.port}.log"), "w")
        self.problems: list[str] = []
        self.segments_before = sgserve_segments()
        self.leftovers: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_file.name, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def start(self, timeout: float = 600.0) -> "Server":
        cmd = [sys.executable, "-m", "sgserve.cli", "start", "--endpoint", self.endpoint] + self.args
        log(f"{self.label}: starting: {' '.join(cmd[1:])}")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env, cwd=REPO)
        self.wait_ready(timeout)
        return self

    def client(self, timeout: float = 60.0):
        from sgserve.client import Client  # noqa: PLC0415
        return Client(self.endpoint, timeout=timeout)

    def wait_ready(self, timeout: float) -> None:
        from sgserve.client import Client  # noqa: PLC0415

        t0 = time.monotonic()
        deadline = t0 + timeout
        pinged = False
        last_exc: Exception | None = None
        last_note = t0
        c = Client(self.endpoint, timeout=1.0)
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise ServerError(f"{self.label}: server exited with code {self.proc.returncode} before it was "
                                      f"ready; its output:\n{self.log_tail()}")
                try:
                    if c.ping(timeout=1.0):
                        pinged = True
                        st = c.status()
                        ws = st.get("workers", [])
                        if ws and all(str(w.get("state", "")).upper() == "READY" for w in ws):
                            log(f"{self.label}: ready in {time.monotonic() - t0:.1f} s "
                                f"(worker pids {[w.get('pid') for w in ws]})")
                            return
                except Exception as exc:  # noqa: BLE001 - not up yet
                    last_exc = exc
                if time.monotonic() - last_note > 15:
                    last_note = time.monotonic()
                    log(f"{self.label}: still starting ({time.monotonic() - t0:.0f} s, "
                        f"{'ping ok, workers booting' if pinged else 'no ping yet'})")
                time.sleep(0.3)
        finally:
            c.close()
        raise ServerError(f"{self.label}: not ready after {timeout:.0f} s (ping {'ok' if pinged else 'failed'}; "
                          f"last error {last_exc!r}); server output:\n{self.log_tail()}")

    def status(self) -> dict[str, Any]:
        with contextlib.closing(self.client(10.0)) as c:
            return c.status()

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM to the server, then SIGKILL of its process group; checks /dev/shm for its segments.

        SIGTERM goes to the server process only (it stops its own workers), not to the whole group:
        a group-wide SIGTERM races with the broker's supervisor, which may restart a worker it sees
        die before it has begun stopping (seen with the server as of this writing).
        """
        if self.proc is None:
            return None
        rc = self.proc.poll()
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        if rc is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                rc = self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"{self.label}: did not stop within {grace:.0f} s of SIGTERM; SIGKILL to its process group")
                rc = None
        # Whatever is left in the group (workers that outlived the broker, say) goes too.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if rc is None:
            rc = self.proc.wait(10)
        self._wait_group_gone(pgid)
        mine = f"sgserve_{self.proc.pid}_"
        left = sorted(n for n in sgserve_segments() - self.segments_before if n.startswith(mine))
        if left:
            self.leftovers = left
            log(f"{self.label}: BUG: segments left in /dev/shm after stop: {left}; removing them")
            for n in left:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(SHM, n))
        log(f"{self.label}: stopped (exit code {rc})")
        self.log_file.close()
        # Keep the server's own warnings (worker restarts, ...) for the results; the log stays in
        # bench/.cache/logs/ for a closer look.
        for line in self.log_tail(1 << 20).splitlines():
            if any(w in line for w in (" WARNING ", " ERROR ", "Traceback", "sgserve: error")) or \
                    line.startswith("WARNING:sgserve") or line.startswith("ERROR:"):
                self.problems.append(line.strip()[:400])
        if self.problems:
            log(f"{self.label}: the server logged {len(self.problems)} warning/error line(s), e.g.: "
                f"{self.problems[0][:300]} (full log: {os.path.relpath(self.log_file.name)})")
        return rc

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
        import psutil  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = []
            for p in psutil.process_iter(["pid"]):
                try:
                    if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(p.pid)
                except (ProcessLookupError, psutil.Error):
                    pass
            if not alive:
                return
            time.sleep(0.1)
        log(f"WARNING: processes of group {pgid} still alive: {alive}")


@contextlib.contextmanager
def server(args: list[str], label: str = "sgserve", timeout: float = 600.0) -> Iterator[Server]:
    s = Server(args, label)
    try:
        s.start(timeout)
        yield s
    finally:
        s.stop()


@contextlib.contextmanager
def child_group(cmd: list[str], **kw) -> Iterator[subprocess.Popen]:
    """A helper process in its own process group, killed (TERM, then KILL) on exit."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    try:
        yield proc
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(5)


# ------------------------------------------------------------------------------------------ memory
def process_memory(pid: int, segment_prefix: str | None = None) -> dict[str, Any]:
    """USS/PSS/RSS of one process, and how much of each is the sgserve segment mapping.

    USS counts a shared-memory page as private when this process is its only mapper, so the
    segment's part is reported separately (seg_*) and subtracted in *_excl_seg.
    """
    import psutil  # noqa: PLC0415

    p = psutil.Process(pid)
    full = p.memory_full_info()
    seg = {"rss": 0, "pss": 0, "private": 0, "shared": 0}
    if segment_prefix:
        for m in p.memory_maps(grouped=True):
            if os.path.basename(m.path).startswith(segment_prefix):
                seg["rss"] += m.rss
                seg["pss"] += m.pss
                seg["private"] += m.private_clean + m.private_dirty
                seg["shared"] += m.shared_clean + m.shared_dirty
    return {
        "pid": pid,
        "name": " ".join(p.cmdline()[:4])[:120],
        "rss": full.rss, "uss": full.uss, "pss": full.pss, "swap": full.swap,
        "seg_rss": seg["rss"], "seg_pss": seg["pss"], "seg_private": seg["private"],
        "uss_excl_seg": full.uss - seg["private"], "pss_excl_seg": full.pss - seg["pss"],
    }


def tree_pids(root: int) -> list[int]:
    import psutil  # noqa: PLC0415
    try:
        p = psutil.Process(root)
        return [root] + [c.pid for c in p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def drop_page_cache_note() -> str:
    return ("file page cache (checkpoint files) is not in any process's PSS/USS; it is reclaimable and "
            "is ignored here")


def unique_memory(pids: list[int], segment_prefix: str | None = None) -> dict[str, int]:
    """Physical memory of a set of processes with every page counted once, however many map it.

    Reads /proc/PID/pagemap (needs root, or CAP_SYS_ADMIN, to see page frame numbers) and takes the
    union of the present pages' frame numbers. Unlike PSS it does not depend on processes outside
    the set, and unlike USS it counts shared pages (TF's libraries, the segment) once instead of
    never. Returns {} when frame numbers are not visible.
    """
    import numpy as np  # noqa: PLC0415

    page = os.sysconf("SC_PAGE_SIZE")
    present_bit, pfn_mask = np.uint64(1 << 63), np.uint64((1 << 55) - 1)
    all_pfns, seg_pfns = [], []
    for pid in pids:
        try:
            maps = open(f"/proc/{pid}/maps").read().splitlines()
            fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        except OSError:
            continue
        try:
            for line in maps:
                parts = line.split(None, 5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo >= 0xFFFF800000000000:  # [vsyscall]
                    continue
                n = (hi - lo) // page
                try:
                    buf = os.pread(fd, n * 8, (lo // page) * 8)
                except OSError:
                    continue
                arr = np.frombuffer(buf, dtype=np.uint64)
                pfns = arr[(arr & present_bit) != 0] & pfn_mask
                if pfns.size and not pfns.any():
                    return {}  # frame numbers hidden (not root)
                all_pfns.append(pfns)
                path = parts[5].strip() if len(parts) > 5 else ""
                if segment_prefix and os.path.basename(path).startswith(segment_prefix):
                    seg_pfns.append(pfns)
        finally:
            os.close(fd)
    if not all_pfns:
        return {}
    total = np.unique(np.concatenate(all_pfns)).size * page
    seg = np.unique(np.concatenate(seg_pfns)).size * page if seg_pfns else 0
    return {"unique_bytes": int(total), "unique_segment_bytes": int(seg), "unique_excl_segment_bytes": int(total - seg)}


# ------------------------------------------------------------------------------ other load (noise)
def system_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, every process)."""
    import psutil  # noqa: PLC0415

    t = psutil.cpu_times()
    return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))


def cpu_of(pids: list[int]) -> float:
    import psutil  # noqa: PLC0415

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def wait_quiet(max_cores: float = 0.3, timeout: float = 15.0, sample: float = 1.0) -> float:
    """Waits (up to timeout) until processes not ours use at most max_cores; returns the last load.

    Other work shares this machine; a point measured while it runs is noise. Call it while the
    benchmark's own processes are idle.
    """
    deadline = time.monotonic() + timeout
    load = 0.0
    waited = False
    while True:
        b0, t0 = system_busy_seconds(), time.monotonic()
        time.sleep(sample)
        load = (system_busy_seconds() - b0) / (time.monotonic() - t0)
        if load <= max_cores or time.monotonic() >= deadline:
            if waited:
                log(f"other load {load:.2f} cores{' (gave up waiting)' if load > max_cores else ''}")
            return round(load, 2)
        if not waited:
            log(f"machine busy with other work ({load:.2f} cores); waiting up to {timeout:.0f} s")
            waited = True
