"""One POSIX shared-memory segment per model version: variable bytes + a msgpack manifest.

Layout (all offsets from the start of the segment)::

    0      header (40 bytes, page reserved): b"SGSEG001", u64 manifest offset, u64 manifest length,
           u64 data bytes, u64 state (0 = being written, 1 = complete)
    4096   tensor data, each tensor 64-byte aligned (what TensorFlow needs to alias it)
    ...    manifest (msgpack map), right after the data

Names are ``/sgserve_<server pid>_<server start time>_<model>_<version>_<rand>``: unique per server,
and the pid + start time let a new server tell a dead server's leftovers from a live server's
segments (it removes only the former).
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


def segment_name(sid: str, model: str, version: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9-]", "-", model)[:64]
    return f"/{SEGMENT_PREFIX}{sid}_{safe}_{version}_{secrets.token_hex(3)}"


def _owner_alive(name: str) -> bool:
    m = re.match(rf"^/?{SEGMENT_PREFIX}(\d+)_(\d+)(?:_|$)", name)
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


def list_segments() -> list[str]:
    try:
        return sorted("/" + n for n in os.listdir(SHM_DIR) if n.startswith(SEGMENT_PREFIX))
    except FileNotFoundError:
        return []


def remove_stale_segments() -> list[str]:
    """Unlinks segments whose server is gone (killed with -9, say). Live servers' stay."""
    removed = []
    for name in list_segments():
        if not _owner_alive(name):
            unlink(name)
            removed.append(name)
    removed += remove_stale_runtime_dirs()
    if removed:
        log.warning("removed %d shared-memory segment(s) or runtime dir(s) left by a server that is gone: %s",
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
    path = os.path.join(SHM_DIR, name.lstrip("/"))
    if os.path.isdir(SHM_DIR):
        try:
            os.unlink(path)
            return
        except FileNotFoundError:
            return
        except PermissionError as exc:  # another user's server: not ours to remove
            log.warning("cannot remove shared-memory segment %s: %s", name, exc)
            return
        except OSError:
            pass  # fall back to posix_ipc
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass
    except posix_ipc.PermissionsError as exc:  # another user's server: not ours to remove
        log.warning("cannot remove shared-memory segment %s: %s", name, exc)


class SegmentWriter:
    """Creates a segment of a known size and fills it; the loader's side."""

    def __init__(self, name: str, data_bytes: int, manifest: dict[str, Any]) -> None:
        self.name = name
        self.data_bytes = data_bytes
        self._manifest = msgpack.packb(manifest, use_bin_type=True)
        self.manifest_offset = DATA_START + align(data_bytes)
        self.size = self.manifest_offset + len(self._manifest)
        self._shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=self.size)
        try:
            self._map = mmap.mmap(self._shm.fd, self.size)
        finally:
            self._shm.close_fd()
        HEADER.pack_into(self._map, 0, MAGIC, self.manifest_offset, len(self._manifest), data_bytes, 0)
        self.buffer = np.frombuffer(self._map, dtype=np.uint8)

    def write(self, offset: int, arr: np.ndarray) -> None:
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        self.buffer[DATA_START + offset: DATA_START + offset + raw.size] = raw

    def write_bytes(self, offset: int, data: bytes) -> None:
        self.buffer[DATA_START + offset: DATA_START + offset + len(data)] = np.frombuffer(data, np.uint8)

    def finish(self) -> None:
        self._map[self.manifest_offset:self.manifest_offset + len(self._manifest)] = self._manifest
        HEADER.pack_into(self._map, 0, MAGIC, self.manifest_offset, len(self._manifest), self.data_bytes, 1)
        self.close()

    def close(self) -> None:
        del self.buffer
        self._map.close()


def read_manifest(name: str) -> dict[str, Any]:
    """The manifest of a complete segment (no TensorFlow needed: the broker reads it)."""
    shm = posix_ipc.SharedMemory(name, 0, read_only=True)
    try:
        with mmap.mmap(shm.fd, shm.size, prot=mmap.PROT_READ) as m:
            magic, moff, mlen, _data, state = HEADER.unpack_from(m, 0)
            if magic != MAGIC or state != 1:
                raise ValueError(f"segment {name} is not a complete sgserve segment")
            return msgpack.unpackb(m[moff:moff + mlen], raw=False, strict_map_key=False)
    finally:
        shm.close_fd()


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value


class SegmentView:
    """A read-only mapping of a segment in a worker.

    The pages are mapped PROT_READ, so a bug that writes to a variable crashes that worker instead
    of corrupting the model for every worker. numpy/DLPack need a writable buffer object to export
    it, so the ndarray is built over the address with ctypes: the page protection still holds.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        shm = posix_ipc.SharedMemory(name, 0, read_only=True)
        try:
            self.size = shm.size
            addr = _libc.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, shm.fd, 0)
        finally:
            shm.close_fd()
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
