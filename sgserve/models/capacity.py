"""Will a new segment fit? Free space of its tier and, for /dev/shm, the memory cgroup's limit.

A /dev/shm segment is tmpfs: RAM that cannot be reclaimed without swap, charged to the memory
cgroup of the process that writes it (the loader, in the server's cgroup). Writing more than the
cgroup has room for does not fail cleanly: the kernel OOM-kills a process of the cgroup (a worker,
the loader, the broker). So the loader asks before it creates a segment, and a version that will
not fit fails with a message naming the sizes, through the normal version-state path (FAILED, or
exit 2 at start). A file-tier segment needs disk space only: its pages are page cache, which the
kernel reclaims under the cgroup's limit.

Room in a cgroup is its limit minus its usage, plus the inactive file cache it holds (clean pages
the kernel drops before it OOM-kills: the kubelet's "working set" rule), taken over the cgroup and
each ancestor that has a limit. cgroup v1 (``memory.limit_in_bytes``, ``memory.usage_in_bytes``,
``total_inactive_file``) and v2 (``memory.max``, ``memory.current``, ``inactive_file``).
"""
from __future__ import annotations

import dataclasses
import os

from sgserve.errors import ResourceExhausted

UNLIMITED = 1 << 62  # cgroup v1 says "no limit" with a number near 2**63
MIB = 2**20


class SegmentWontFit(ResourceExhausted):
    """A version's segment is larger than its tier can hold; the message says the sizes."""


@dataclasses.dataclass(frozen=True)
class CgroupMemory:
    """The tightest memory limit over a cgroup and its ancestors."""

    path: str  # the cgroup directory whose limit binds
    limit: int
    usage: int
    reclaimable: int  # inactive file cache

    @property
    def room(self) -> int:
        return max(self.limit - self.usage + self.reclaimable, 0)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _stat_value(stat: str | None, key: str) -> int:
    for line in (stat or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.isdigit():
            return int(value)
    return 0


def _mounts() -> list[tuple[str, str, str, str]]:
    """(root, mount point, fs type, super options) of each cgroup mount, from /proc/self/mountinfo."""
    out = []
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) >= 5 and len(rfields) >= 3 and rfields[0] in ("cgroup", "cgroup2"):
            out.append((fields[3], fields[4], rfields[0], rfields[2]))
    return out


def memory_cgroup_dir(proc_cgroup: str | None = None) -> tuple[str, int] | None:
    """(directory, cgroup version) of this process's memory cgroup; None when it has none."""
    text = proc_cgroup if proc_cgroup is not None else _read("/proc/self/cgroup") or ""
    v1 = v2 = None
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            v1 = path
        elif hier == "0" and controllers == "":
            v2 = path
    for root, mount, fstype, opts in _mounts():
        cg = v1 if fstype == "cgroup" and "memory" in opts.split(",") else v2 if fstype == "cgroup2" else None
        if cg is None:
            continue
        rel = os.path.relpath(cg, root) if cg.startswith(root) else cg.lstrip("/")
        directory = os.path.normpath(os.path.join(mount, rel))
        if os.path.isdir(directory):
            return directory, 1 if fstype == "cgroup" else 2
    return None


def cgroup_memory(found: tuple[str, int] | None = None) -> CgroupMemory | None:
    """The binding memory limit of this process's cgroup (the least room over it and its
    ancestors); None when no limit applies."""
    found = found if found is not None else memory_cgroup_dir()
    if found is None:
        return None
    directory, version = found
    files = (("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file") if version == 1
             else ("memory.max", "memory.current", "inactive_file"))
    best: CgroupMemory | None = None
    while True:
        limit_text = _read(os.path.join(directory, files[0]))
        usage_text = _read(os.path.join(directory, files[1]))
        if limit_text is None or usage_text is None or not usage_text.isdigit():
            break  # above the cgroup mount's root
        if limit_text.isdigit() and int(limit_text) < UNLIMITED:
            mem = CgroupMemory(directory, int(limit_text), int(usage_text),
                               _stat_value(_read(os.path.join(directory, "memory.stat")), files[2]))
            if best is None or mem.room < best.room:
                best = mem
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return best


def free_bytes(directory: str) -> int:
    """Bytes an unprivileged writer may still put in the file system of ``directory``."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def check_fits(segment: str, size: int) -> None:
    """Raises SegmentWontFit when a segment of ``size`` bytes cannot be written to its tier."""
    from sgserve.models import shared_segment  # noqa: PLC0415 - it imports this module lazily too

    directory = os.path.dirname(shared_segment.segment_path(segment))
    shm = not shared_segment.is_file_segment(segment)
    where = "/dev/shm" if shm else directory
    free = free_bytes(directory)
    hint = ("; give the server more shared memory (a container's /dev/shm is 64 MiB unless set), or put "
            "segments on disk with --segment-dir DIR" if shm else "; free space there or choose another --segment-dir")
    if size > free:
        raise SegmentWontFit(f"the version needs {size / MIB:.1f} MiB in {where}, which has {free / MIB:.1f} MiB "
                             f"free{hint}")
    if not shm:
        return
    mem = cgroup_memory()
    if mem is not None and size > mem.room:
        raise SegmentWontFit(
            f"the version needs {size / MIB:.1f} MiB of shared memory (/dev/shm is RAM), but the memory cgroup "
            f"{mem.path} has {mem.room / MIB:.1f} MiB left (limit {mem.limit / MIB:.1f} MiB, "
            f"{mem.usage / MIB:.1f} MiB in use, {mem.reclaimable / MIB:.1f} MiB of it reclaimable cache); writing "
            f"it would get processes OOM-killed. Serve it from disk with --segment-dir DIR (a file-backed tier: "
            f"the page cache keeps the hot pages in RAM)")


__all__ = ["CgroupMemory", "SegmentWontFit", "cgroup_memory", "check_fits", "free_bytes", "memory_cgroup_dir"]
