"""One segment per model version: variable bytes + a msgpack manifest.

Two tiers, one format. The default tier is a POSIX shared-memory object (``/dev/shm``, tmpfs: RAM
that cannot be reclaimed without swap). ``--segment-dir DIR`` puts each segment in a regular file
under DIR instead (an SSD or NVMe volume): the workers map it the same way, read-only and
MAP_SHARED, and the kernel's page cache keeps the hot pages in RAM and drops cold ones, so a model
larger than the memory the server may use still serves. A shm segment is named ``/sgserve_...``;
a file segment by its absolute path ``DIR/sgserve_...``; everything that passes names around
(manifests, ModelSpec, reference counts) does not need to know which.

Layout (all offsets from the start of the segment)::

    0      header (40 bytes, page reserved): b"SGSEG001", u64 manifest offset, u64 manifest length,
           u64 data bytes, u64 state (0 = being written, 1 = complete)
    4096   tensor data, each tensor 64-byte aligned (what TensorFlow needs to alias it)
    ...    manifest (msgpack map), right after the data

Names are ``/sgserve_<server pid>_<server start time>_<model>_<version>_<rand>`` (or that file name
under the segment dir): unique per server, and the pid + start time let a new server tell a dead
server's leftovers from a live server's segments (it removes only the former), in either tier.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import re
import secrets
import struct
import weakref
from typing import Any

import msgpack
import numpy as np
import posix_ipc
import psutil

log = logging.getLogger(__name__)

SEGMENT_PREFIX = "sgserve_"
HEADER = struct.Struct("<8sQQQQ")
MAGIC = b"SGSEG001"
DATA_START = 4096
ALIGN = 64
SHM_DIR = "/dev/shm"


def align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def server_id(pid: int | None = None) -> str:
    """``<pid>_<start time>``: identifies this server process across pid reuse."""
    pid = pid or os.getpid()
    start = int(psutil.Process(pid).create_time() * 100)
    return f"{pid}_{start}"


def is_shm_dir(directory: str | None) -> bool:
    """Whether ``directory`` means the POSIX shared-memory tier (today's names, unchanged)."""
    return not directory or os.path.realpath(directory) == os.path.realpath(SHM_DIR)


def is_file_segment(name: str) -> bool:
    """A file-tier segment is named by its path; a shm one is ``/sgserve_...`` (no directory)."""
    return os.path.dirname(name) not in ("", "/")


def tier(name: str) -> str:
    """``shm`` or the directory of a file-tier segment: what status shows."""
    return os.path.dirname(name) if is_file_segment(name) else "shm"


def segment_path(name: str) -> str:
    """Where the segment's bytes are visible in the file system (statvfs, sizes, ls)."""
    return name if is_file_segment(name) else os.path.join(SHM_DIR, name.lstrip("/"))


def segment_name(sid: str, model: str, version: int, directory: str | None = None) -> str:
    safe = re.sub(r"[^A-Za-z0-9-]", "-", model)[:64]
    base = f"{SEGMENT_PREFIX}{sid}_{safe}_{version}_{secrets.token_hex(3)}"
    if is_shm_dir(directory):
        return "/" + base
    return os.path.join(os.path.abspath(directory), base)


def _owner_alive(name: str) -> bool:
    m = re.match(rf"^/?{SEGMENT_PREFIX}(\d+)_(\d+)(?:_|$)", os.path.basename(name) or name)
    if not m:
        return True  # not ours to judge
    pid, start = int(m.group(1)), int(m.group(2))
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped: it owns nothing any more
            return False
        return int(proc.create_time() * 100) == start
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def list_segments(directory: str | None = None) -> list[str]:
    """Every sgserve segment name in a tier (default: /dev/shm), any server's."""
    shm = is_shm_dir(directory)
    where = SHM_DIR if shm else os.path.abspath(directory or SHM_DIR)
    try:
        found = [n for n in os.listdir(where) if n.startswith(SEGMENT_PREFIX)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted("/" + n if shm else os.path.join(where, n) for n in found)


def remove_stale_segments(directories: tuple[str | None, ...] = (None,)) -> list[str]:
    """Unlinks segments whose server is gone (killed with -9, say), in /dev/shm and each segment
    dir given (file-tier leftovers, too). Live servers' stay."""
    removed = []
    tiers = dict.fromkeys([SHM_DIR] + [os.path.realpath(d) for d in directories if not is_shm_dir(d)])
    for name in (n for d in tiers for n in list_segments(d)):
        if not _owner_alive(name):
            unlink(name)
            removed.append(name)
    removed += remove_stale_runtime_dirs()
    if removed:
        log.warning("removed %d segment(s) or runtime dir(s) left by a server that is gone: %s",
                    len(removed), ", ".join(removed))
    return removed


def runtime_dir(sid: str) -> str:
    """Where a server keeps its broker<->worker ipc socket: named after the server, like segments."""
    import tempfile  # noqa: PLC0415

    return os.path.join(tempfile.gettempdir(), f"{SEGMENT_PREFIX}{sid}")


def remove_stale_runtime_dirs() -> list[str]:
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    removed = []
    tmp = tempfile.gettempdir()
    for entry in os.listdir(tmp):
        if entry.startswith(SEGMENT_PREFIX) and not _owner_alive(entry):
            shutil.rmtree(os.path.join(tmp, entry), ignore_errors=True)
            removed.append(os.path.join(tmp, entry))
    return removed


def unlink(name: str) -> None:
    """Removes a segment (its memory goes when the last mapping does). Freeing a large segment takes
    the kernel tens of milliseconds; os.unlink releases the GIL meanwhile, so a thread may do it."""
    path = segment_path(name)
    if is_file_segment(name) or os.path.isdir(SHM_DIR):
        try:
            os.unlink(path)
            return
        except FileNotFoundError:
            return
        except PermissionError as exc:  # another user's server: not ours to remove
            log.warning("cannot remove segment %s: %s", name, exc)
            return
        except OSError as exc:
            if is_file_segment(name):
                log.warning("cannot remove segment %s: %s", name, exc)
                return
            # else fall back to posix_ipc
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass
    except posix_ipc.PermissionsError as exc:  # another user's server: not ours to remove
        log.warning("cannot remove shared-memory segment %s: %s", name, exc)


def _create(name: str, size: int) -> int:
    """A new segment of ``size`` bytes, mode 0600, opened read-write; its descriptor.

    A file segment's blocks are reserved up front (posix_fallocate): a full disk is an error here,
    not a SIGBUS in the middle of writing through the mapping."""
    if not is_file_segment(name):
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        return shm.fd
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        os.close(fd)
        os.unlink(name)
        raise OSError(exc.errno, f"cannot reserve {size / 2**20:.1f} MiB for segment {name}: "
                                 f"{os.strerror(exc.errno or 0)}") from None
    return fd


def _open_read_only(name: str) -> int:
    """A descriptor of an existing segment, read-only, in either tier."""
    if is_file_segment(name):
        return os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    shm = posix_ipc.SharedMemory(name, 0, read_only=True)
    return shm.fd


class SegmentWriter:
    """Creates a segment of a known size and fills it; the loader's side.

    On the file tier each chunk written is flushed to disk at once (msync): dirty pages cannot be
    dropped until written back, so a segment larger than the memory cgroup's limit would otherwise
    fill it with dirty page cache; clean pages are reclaimable, and stay cached while there is room.
    """

    FLUSH_CHUNK = 32 * 2**20

    def __init__(self, name: str, data_bytes: int, manifest: dict[str, Any]) -> None:
        self.name = name
        self.data_bytes = data_bytes
        self._manifest = msgpack.packb(manifest, use_bin_type=True)
        self.manifest_offset = DATA_START + align(data_bytes)
        self.size = self.manifest_offset + len(self._manifest)
        from sgserve.models import capacity  # noqa: PLC0415

        capacity.check_fits(name, self.size)
        fd = _create(name, self.size)
        try:
            self._map = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        HEADER.pack_into(self._map, 0, MAGIC, self.manifest_offset, len(self._manifest), data_bytes, 0)
        self.buffer = np.frombuffer(self._map, dtype=np.uint8)
        self.file_tier = is_file_segment(name)

    def write(self, offset: int, arr: np.ndarray) -> None:
        self._put(DATA_START + offset, np.ascontiguousarray(arr).reshape(-1).view(np.uint8))

    def write_bytes(self, offset: int, data: bytes) -> None:
        self._put(DATA_START + offset, np.frombuffer(data, np.uint8))

    def _put(self, start: int, raw: np.ndarray) -> None:
        if not self.file_tier:
            self.buffer[start:start + raw.size] = raw
            return
        for i in range(0, raw.size, self.FLUSH_CHUNK):
            part = raw[i:i + self.FLUSH_CHUNK]
            self.buffer[start + i:start + i + part.size] = part
            self._flush(start + i, part.size)

    def _flush(self, start: int, nbytes: int) -> None:
        """Writes a range of a file segment back to disk now (its pages become clean, reclaimable)."""
        first = start // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        self._map.flush(first, start + nbytes - first)

    def finish(self) -> None:
        self._map[self.manifest_offset:self.manifest_offset + len(self._manifest)] = self._manifest
        HEADER.pack_into(self._map, 0, MAGIC, self.manifest_offset, len(self._manifest), self.data_bytes, 1)
        if self.file_tier:
            self._map.flush()
        self.close()

    def close(self) -> None:
        del self.buffer
        self._map.close()


def read_manifest(name: str) -> dict[str, Any]:
    """The manifest of a complete segment (no TensorFlow needed: the broker reads it)."""
    fd = _open_read_only(name)
    try:
        with mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ) as m:
            magic, moff, mlen, _data, state = HEADER.unpack_from(m, 0)
            if magic != MAGIC or state != 1:
                raise ValueError(f"segment {name} is not a complete sgserve segment")
            return msgpack.unpackb(m[moff:moff + mlen], raw=False, strict_map_key=False)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value


class SegmentView:
    """A read-only mapping of a segment in a worker.

    The pages are mapped PROT_READ, so a bug that writes to a variable crashes that worker instead
    of corrupting the model for every worker. numpy/DLPack need a writable buffer object to export
    it, so the ndarray is built over the address with ctypes: the page protection still holds.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        fd = _open_read_only(name)
        try:
            self.size = os.fstat(fd).st_size
            addr = _libc.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {name} failed: {os.strerror(err)}")
        self.address = addr
        self._raw = (ctypes.c_ubyte * self.size).from_address(addr)
        # Unmapped when the last view of it is gone: every ndarray and DLPack tensor over the
        # mapping keeps this ctypes array alive, so the pages cannot vanish under TensorFlow.
        weakref.finalize(self._raw, _libc.munmap, addr, self.size)
        self.buffer = np.frombuffer(self._raw, dtype=np.uint8)
        magic, moff, mlen, _data, state = HEADER.unpack_from(self.buffer, 0)
        if magic != MAGIC or state != 1:
            raise ValueError(f"segment {name} is not a complete sgserve segment")
        self.manifest = msgpack.unpackb(self.buffer[moff:moff + mlen].tobytes(), raw=False, strict_map_key=False)

    def array(self, offset: int, dtype: str, shape: list[int]) -> np.ndarray:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        start = DATA_START + offset
        return self.buffer[start:start + count * dt.itemsize].view(dt).reshape(shape)

    def raw(self, offset: int, nbytes: int) -> bytes:
        start = DATA_START + offset
        return self.buffer[start:start + nbytes].tobytes()

    def advise(self, offset: int, nbytes: int, advice: int) -> None:
        """madvise() on the pages of one tensor (a hint: failures are logged, never raised)."""
        page = mmap.PAGESIZE
        start = (self.address + DATA_START + offset) // page * page
        end = self.address + DATA_START + offset + nbytes
        if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice) != 0:
            log.info("madvise(%d) on %s failed: %s", advice, self.name, os.strerror(ctypes.get_errno()))
