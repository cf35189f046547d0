"""What the machine does while a version is swapped in, for bench/bench_lifecycle.py's swap part.

A thread samples, every ``every`` seconds: CPU time, minor and major page faults and context switches
of each process of the server tree (by role: broker, worker, loader), the machine's /proc/stat
split (user, system, idle, iowait, steal), /proc/vmstat (page faults, dirty and writeback pages,
page allocations) and the pressure-stall totals (/proc/pressure). ``deltas(t0, t1)`` turns the
samples into rates over a window, so a swap's phases can be set against a steady window of the
same run. Nothing here needs perf (not available on every machine).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_VMSTAT = ("pgfault", "pgmajfault", "nr_dirty", "nr_writeback", "pgalloc_normal", "pgfree", "thp_fault_alloc",
           "pgpgout")
_GAUGES = ("nr_dirty", "nr_writeback")  # levels, not counters
_TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return kids


def _role(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if "sgserve.models.loader" in cmd:
        return "loader"
    if "sgserve.worker" in cmd or "zygote" in cmd:
        return "worker"
    return "broker"


def _proc_counters(pid: int) -> dict[str, float] | None:
    """cpu seconds (all, and in the kernel), minflt, majflt, voluntary and involuntary context switches of one process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out = {"cpu_s": (int(fields[11]) + int(fields[12])) / _TICK,
               "sys_s": int(fields[12]) / _TICK, "minflt": float(fields[7]),
               "majflt": float(fields[9])}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    out["vcsw"] = float(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    out["ivcsw"] = float(line.split()[1])
        return out
    except (OSError, IndexError, ValueError):
        return None


def _system() -> dict[str, float]:
    out: dict[str, float] = {}
    with open("/proc/stat") as f:
        vals = f.readline().split()[1:1 + len(_STAT_FIELDS)]
    out.update({f"cpu_{k}_s": int(v) / _TICK for k, v in zip(_STAT_FIELDS, vals)})
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k in _VMSTAT:
                out[k] = float(v)
    for res in ("cpu", "memory", "io"):
        try:
            with open(f"/proc/pressure/{res}") as f:
                for line in f:
                    kind, *kv = line.split()
                    out[f"psi_{res}_{kind}_us"] = float(dict(x.split("=") for x in kv)["total"])
        except OSError:
            pass
    return out


class SwapProbe:
    """Samples the server tree and the machine from a thread (see the module docstring)."""

    def __init__(self, server_pid: int, every: float = 0.05) -> None:
        self.pid, self.every = server_pid, every
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="swap-probe")

    def __enter__(self) -> "SwapProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def _tree(self) -> list[int]:
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += _children(p)
        return out

    def sample(self) -> dict[str, float]:
        row = _system()
        for pid in self._tree() + [os.getpid()]:
            role = "client" if pid == os.getpid() else self._roles.get(pid) or self._roles.setdefault(pid, _role(pid))
            c = _proc_counters(pid)
            if c is None:
                continue
            for k, v in c.items():  # summed per role; a process that appears mid-window counts from 0
                row[f"{role}_{k}"] = row.get(f"{role}_{k}", 0.0) + v
                row[f"{role}:{pid}_{k}"] = v
        return row

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self.sample()))
            self._stop.wait(self.every)

    def deltas(self, t0: float, t1: float) -> dict[str, Any]:
        """Per second over [t0, t1): counters as rates (per-process ones summed by role), gauges as their max."""
        rows = [(t, r) for t, r in self.samples if t0 <= t < t1]
        if len(rows) < 2:
            return {}
        (ta, _), (tb, b) = rows[0], rows[-1]
        dt = tb - ta
        out: dict[str, Any] = {"seconds": round(dt, 3)}
        for k in b:
            if ":" in k:
                continue
            if k in _GAUGES:
                out[f"{k}_max"] = max(r.get(k, 0.0) for _, r in rows)
                continue
            # per process: counter increase while it existed (a loader that started mid-window counts from 0)
            out[f"{k}_per_s"] = round(self._increase(rows, k) / dt, 3) if dt > 0 else None
        return out

    @staticmethod
    def _increase(rows: list[tuple[float, dict[str, float]]], key: str) -> float:
        """How much a counter grew over the rows; a role's counter is the sum over its processes, each
        from its first sample (processes come and go: a loader or a restarted worker)."""
        role, _, metric = key.partition("_")
        if role not in ("broker", "worker", "loader", "client"):
            return rows[-1][1].get(key, 0.0) - rows[0][1].get(key, 0.0)
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        for _, r in rows:
            for k, v in r.items():
                if k.startswith(f"{role}:"):
                    pid, _, m = k[len(role) + 1:].partition("_")
                    if m == metric:
                        first.setdefault(pid, v)
                        last[pid] = v
        return sum(last[p] - first[p] for p in last)


def dump_stacks_when(sampler: SwapProbe, ready: Callable[[], bool], delay: float,
                     timeout: float = 30.0) -> dict[str, str]:
    """py-spy dumps (native frames too) of the loader, then one worker, then the broker, taken on a
    thread once ``ready()`` (the new version is LOADING) plus ``delay`` s; the dict fills as they come."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    out: dict[str, str] = {}
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    spy = spy if os.path.exists(spy) else shutil.which("py-spy") or "py-spy"

    def run() -> None:
        deadline = time.monotonic() + timeout
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        roles: dict[str, int] = {}
        for pid in sampler._tree():
            roles.setdefault(_role(pid), pid)
        for role in ("loader", "worker", "broker"):
            if role in roles:
                r = subprocess.run([spy, "dump", "--native", "--pid", str(roles[role])], capture_output=True,
                                   text=True, timeout=20, check=False)
                out[role] = f"t={time.time():.3f}\n" + (r.stdout or r.stderr)[-6000:]

    threading.Thread(target=run, daemon=True, name="py-spy").start()
    return out


def boost_autogroups(pids: list[int], nice: int) -> list[str]:
    """Sets the autogroup nice value (sched(7), "The autogroup feature") of each pid's session.

    With autogroups the kernel shares the cores between sessions first: on a machine shared with
    other people's jobs, a server and load generator boosted this way feel less of their load, so a
    swap's effect is not drowned by theirs. The loader stays SCHED_IDLE inside the server's group.
    Returns what it could not set (not root, no autogroups)."""
    failed = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/autogroup", "w") as f:
                f.write(str(nice))
        except OSError as exc:
            failed.append(f"{pid}: {exc}")
    return failed
