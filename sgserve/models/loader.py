"""The loader: reads model versions' variables once and writes each into one shared segment.

Runs as its own long-lived process (``python -m sgserve.models.loader``, started by the server's
LoaderService) so that the broker never imports TensorFlow and a loader crash cannot take the
server down. It takes load jobs as JSON lines on stdin and answers each with one JSON line on stdout:
the ModelSpec, or the cause of the failure (missing or corrupt directory). Any partly written
segment is unlinked before it answers. A long load shows its progress on stderr.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, TextIO

import click

import google_crc32c
import msgpack
import numpy as np

from sgserve.models import shared_segment
from sgserve.config import ModelSpec
from sgserve.errors import NotFound
from sgserve.logs import setup_logging
from sgserve.process import die_with_parent, lowest_priority, tensorflow_import_quiet, to_background

log = logging.getLogger(__name__)



class ModelNotFound(NotFound):
    pass


def find_versions(base_path: str) -> list[int]:
    """Integer-named version directories under a TF Serving model base path, ascending."""
    if not os.path.isdir(base_path):
        raise ModelNotFound(f"model base path {base_path} does not exist or is not a directory")
    versions = []
    for entry in os.listdir(base_path):
        if entry.isdigit() and os.path.isdir(os.path.join(base_path, entry)):
            versions.append(int(entry))
    return sorted(versions)


def latest_version(base_path: str) -> int:
    versions = find_versions(base_path)
    if not versions:
        raise ModelNotFound(
            f"model base path {base_path} has no version directories (expected {base_path}/<integer version>/saved_model.pb)")
    return versions[-1]


class LoadProgress:
    """Progress of a long load on stderr: rich's live bar on a terminal, a plain line every few
    seconds otherwise (a log file or a pipe). Loads under half a second show nothing."""

    QUIET_S = 0.5  # small models load silently
    LINE_EVERY_S = 2.0  # plain lines, when stderr is not a terminal
    FINAL_LINE_BYTES = 64 * 1024 * 1024  # a load this big reports its end even when it was quick

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.monotonic()
        self.last = 0.0
        self._bar: Any = None  # rich.progress.Progress once shown
        self._task: Any = None

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.started < self.QUIET_S:
            return
        if self.tty:
            self._live().update(self._task, completed=self.done)
        elif now - self.last >= self.LINE_EVERY_S:
            self.last = now
            self._line()

    def finish(self) -> None:
        printed_all = self.last and self.done >= self.total
        self.done = self.total
        if self._bar is not None:
            self._bar.update(self._task, completed=self.total)
            self.stop()
        elif not printed_all and (self.last or self.total >= self.FINAL_LINE_BYTES):
            self._line()

    def stop(self) -> None:
        """Ends the live bar (also when the load failed half way)."""
        if self._bar is not None:
            self._bar.stop()

    def _live(self) -> Any:
        if self._bar is None:
            from rich.console import Console  # noqa: PLC0415
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,  # noqa: PLC0415
                                       TimeElapsedColumn)

            self._bar = Progress(TextColumn("loading {task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                                 TimeElapsedColumn(), console=Console(file=self.stream))
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.done)
            self._bar.start()
        return self._bar

    def _line(self) -> None:
        mib = 1024 * 1024
        self.stream.write(f"sgserve loader: loading {self.label}: {self.done / mib:.1f}/{self.total / mib:.1f} MiB "
                          f"({100.0 * self.done / self.total:.0f}%), {time.monotonic() - self.started:.1f} s\n")
        self.stream.flush()


def _checkpoint_crcs(ckpt_prefix: str) -> dict[str, Any]:
    """Per-tensor (crc32c, dtype, shape, sliced) from the checkpoint index; {} when unreadable."""
    from sgserve.models import checkpoint_index  # noqa: PLC0415

    try:
        return checkpoint_index.read_index(ckpt_prefix)
    except checkpoint_index.CheckpointIndexError as exc:
        log.warning("incremental update disabled for %s: %s", ckpt_prefix, exc)
        return {}


def _reusable(base: dict[str, Any] | None, key: str, entry: Any) -> dict[str, Any] | None:
    """The base version's manifest entry for ``key`` when the new checkpoint holds the same bytes."""
    if base is None or entry is None or entry.sliced:
        return None
    old = base["by_key"].get(key)
    if old is None or old.get("crc32c") is None:
        return None
    if (old["crc32c"], old["dtype"], list(old["shape"])) != (entry.crc32c, entry.dtype, list(entry.shape)):
        return None
    return old


def load_base(segment: str) -> dict[str, Any]:
    """What an incremental load needs from the previous version: where each checkpoint key lives."""
    manifest = shared_segment.read_manifest(segment)
    by_key = {}
    for t in manifest["tensors"]:
        by_key.setdefault(t["key"], dict(t, segment=t.get("segment") or segment))
    return {"segment": segment, "version": manifest["version"], "by_key": by_key}


def load_version(name: str, base_path: str, version: int, sid: str,
                 progress: Callable[[str, int], LoadProgress] | None = None,
                 base_segment: str | None = None, segment_dir: str | None = None,
                 pace: LoadPace | None = None) -> ModelSpec:
    """Reads ``base_path/version`` into a new shared segment; returns its ModelSpec.

    With ``base_segment`` (a live segment of an earlier version of the same model), tensors whose
    checkpoint crc32c, dtype and shape match that version's are not read again: the new manifest
    points at the bytes already in shared memory, so the update costs time and memory in proportion
    to what changed. ``pace`` limits how fast the bytes are written (an update next to serving workers).
    """
    from sgserve.models import graph_rewrite  # noqa: PLC0415

    started = time.monotonic()
    version_dir = os.path.join(base_path, str(version))
    ckpt_prefix = os.path.join(version_dir, "variables", "variables")
    reader, shapes, dtypes = _open_checkpoint(version_dir, ckpt_prefix)
    sg = graph_rewrite.build_serving_graph(
        version_dir, table_prefix=f"sgserve/{name}/{version}",
        variable_shapes={k: list(v) for k, v in shapes.items()},
        variable_dtypes={k: v for k, v in dtypes.items()})
    crcs = _checkpoint_crcs(ckpt_prefix) if reader is not None else {}
    base = load_base(base_segment) if base_segment and crcs else None
    layout = _lay_out(sg.variables, version_dir, reader, shapes, dtypes, crcs, base)
    if base is not None:
        log.info("%s version %d: %d of %d tensors (%.1f MiB) unchanged since version %s, shared with it",
                 name, version, len(layout.placed) - len(layout.own), len(layout.placed),
                 layout.shared_bytes / 2**20, base["version"])
    signatures_full = {
        k: {"method": s.method,
            "inputs": {n: {"tensor": t.tensor, "dtype": t.dtype, "shape": t.shape} for n, t in s.inputs.items()},
            "outputs": {n: {"tensor": t.tensor, "dtype": t.dtype, "shape": t.shape} for n, t in s.outputs.items()}}
        for k, s in sg.signatures.items()
    }
    manifest = {"format": 1, "model": name, "version": version, "base_path": base_path, "tensors": layout.tensors,
                "graph": sg.graph_def, "signatures": signatures_full, "init_nodes": sg.init_nodes,
                "assets": sg.assets}
    seg_name = shared_segment.segment_name(sid, name, version, segment_dir)  # a file under it, or /dev/shm
    _write_segment(seg_name, manifest, layout, reader, version_dir,
                   (progress or LoadProgress)(f"{name} version {version}", layout.data_bytes), pace)
    borrowed = sorted({t["segment"] for t in layout.placed.values() if "segment" in t})
    public = {k: s.public() for k, s in sg.signatures.items()}
    return ModelSpec(name=name, version=version, base_path=base_path, segment=seg_name,
                     segment_bytes=layout.data_bytes + layout.shared_bytes, signatures=public,
                     load_seconds=round(time.monotonic() - started, 3), segments=[seg_name, *borrowed],
                     own_bytes=layout.data_bytes)


def _open_checkpoint(version_dir: str, ckpt_prefix: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The checkpoint reader and its variables' shapes and dtypes (none for a model without variables)."""
    import tensorflow as tf  # noqa: PLC0415

    from sgserve.models import graph_rewrite  # noqa: PLC0415

    try:
        reader = tf.train.load_checkpoint(ckpt_prefix)
        return reader, reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    except Exception as exc:  # noqa: BLE001 - NotFoundError, DataLossError, ...
        if os.path.exists(ckpt_prefix + ".index"):
            raise graph_rewrite.ModelFormatError(
                f"{version_dir}: corrupt checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
        # A model with no variables at all is legal (tf.Module with constants only).
        if os.path.isfile(os.path.join(version_dir, "saved_model.pb")) and not os.path.isdir(
                os.path.join(version_dir, "variables")):
            return None, {}, {}
        raise graph_rewrite.ModelFormatError(
            f"{version_dir}: no checkpoint at variables/variables.index ({type(exc).__name__})") from None


@dataclasses.dataclass
class _Layout:
    """Where each checkpoint key's bytes go: this version's own segment, or the base version's."""

    tensors: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one per graph variable
    own: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # keys written into its segment
    placed: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # every key, once
    strings: dict[str, bytes] = dataclasses.field(default_factory=dict)  # string tensors, packed
    sources: dict[str, Any] = dataclasses.field(default_factory=dict)  # key -> checkpoint_index.TensorEntry
    data_bytes: int = 0
    shared_bytes: int = 0


def _lay_out(variables: Any, version_dir: str, reader: Any, shapes: dict[str, Any], dtypes: dict[str, Any],
             crcs: dict[str, Any], base: dict[str, Any] | None) -> _Layout:
    """Lays out every distinct checkpoint key once; unchanged ones stay where the base version has them."""
    import tensorflow as tf  # noqa: PLC0415

    from sgserve.models import graph_rewrite  # noqa: PLC0415

    out = _Layout()
    for var in variables:
        if var.key in out.placed:
            out.tensors.append(dict(out.placed[var.key], node=var.node))
            continue
        if var.key not in shapes:
            raise graph_rewrite.ModelFormatError(
                f"{version_dir}: variable '{var.node}' (checkpoint key '{var.key}') is not in the checkpoint")
        dtype = graph_rewrite.dtype_name(tf.as_dtype(dtypes[var.key]).as_datatype_enum)
        shape = [int(d) for d in shapes[var.key]]
        crc = crcs.get(var.key)
        old = _reusable(base, var.key, crc)
        if old is not None:
            entry = {"node": var.node, "key": var.key, "dtype": dtype, "shape": shape, "offset": old["offset"],
                     "nbytes": old["nbytes"], "segment": old["segment"], "crc32c": old["crc32c"]}
            out.placed[var.key] = entry
            out.tensors.append(entry)
            out.shared_bytes += old["nbytes"]
            continue
        if dtype == "string":
            data = msgpack.packb([bytes(x) for x in reader.get_tensor(var.key).reshape(-1).tolist()], use_bin_type=True)
            out.strings[var.key] = data
            nbytes = len(data)
        else:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        entry = {"node": var.node, "key": var.key, "dtype": dtype, "shape": shape, "offset": out.data_bytes,
                 "nbytes": nbytes}
        if crc is not None and not crc.sliced:
            entry["crc32c"] = crc.crc32c
            out.sources[var.key] = crc
        out.own[var.key] = out.placed[var.key] = entry
        out.tensors.append(entry)
        out.data_bytes = shared_segment.align(out.data_bytes + nbytes)
    return out


def _write_segment(seg_name: str, manifest: dict[str, Any], layout: _Layout, reader: Any, version_dir: str,
                   prog: LoadProgress, pace: LoadPace | None = None) -> None:
    """Creates the segment and copies this version's own tensors in; unlinks it on any failure."""
    pace = pace or LoadPace()
    data_files = _DataFiles(os.path.join(version_dir, "variables", "variables"))
    writer = shared_segment.SegmentWriter(seg_name, layout.data_bytes, manifest)
    try:
        for entry in layout.own.values():
            if entry["dtype"] == "string":
                writer.write_bytes(entry["offset"], layout.strings[entry["key"]])
                pace.wrote(entry["nbytes"])
            elif entry["nbytes"]:
                source = layout.sources.get(entry["key"])
                direct = source is not None and source.size == entry["nbytes"]
                if not (direct and data_files.read_into(writer, entry, source, pace)):
                    writer.write(entry["offset"], _get_tensor(reader, entry["key"], version_dir))
                    pace.wrote(entry["nbytes"])
            prog.advance(entry["nbytes"])
        prog.finish()
        writer.finish()
    except BaseException:
        prog.stop()
        writer.close()
        shared_segment.unlink(seg_name)
        raise
    finally:
        data_files.close()


def _get_tensor(reader: Any, key: str, version_dir: str) -> np.ndarray:
    """One whole tensor through TensorFlow's reader (string and partitioned tensors, odd checkpoints)."""
    from sgserve.models import graph_rewrite  # noqa: PLC0415

    try:
        return reader.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - IndexError, DataLossError, ... on a bad file
        raise graph_rewrite.ModelFormatError(
            f"{version_dir}: corrupt or truncated checkpoint data for '{key}' "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


class LoadPace:
    """Holds a load to at most ``bandwidth`` bytes/s (0: no limit), checked after every chunk.

    A full-model write next to serving workers competes with them for the cores (the loader's page
    faults and copies run in the kernel, where SCHED_IDLE does not hold it back) and for memory
    bandwidth; sleeping between chunks spreads that cost so that the workers' requests are not
    queued behind it (bench/RESULTS.md section 4.4 measured the trade: load time against p99).
    """

    CHUNK = 4 * 2**20  # bytes per read-and-copy step: small enough to pace, big enough to be cheap

    def __init__(self, bandwidth: int = 0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.bandwidth = max(0, int(bandwidth))
        self._clock, self._sleep = clock, sleep
        self._start = clock()
        self.done = 0
        self.slept = 0.0

    def wrote(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.bandwidth:
            return
        ahead = self.done / self.bandwidth - (self._clock() - self._start)
        if ahead > 0:
            self._sleep(ahead)
            self.slept += ahead


class _DataFiles:
    """A checkpoint's data shards, read straight into the segment.

    TensorFlow's reader returns each tensor in a fresh private buffer, which is then copied into
    the segment: twice the page faults, twice the copying, and a peak of twice the tensor. Numeric
    tensors are stored raw in the shard the index names, so they are read chunk by chunk into their
    place in the segment, their crc32c checked as TensorFlow's reader checks it. Anything unusual
    (a missing shard, a short read) returns False and the caller falls back to TensorFlow's reader.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._fds: dict[int, int | None] = {}
        self._bounce: np.ndarray | None = None  # file tier: chunks go through SegmentWriter.write

    def _fd(self, shard: int) -> int | None:
        if shard not in self._fds:
            import glob  # noqa: PLC0415

            found = sorted(glob.glob(f"{glob.escape(self.prefix)}.data-{shard:05d}-of-*"))
            self._fds[shard] = os.open(found[0], os.O_RDONLY) if len(found) == 1 else None
        return self._fds[shard]

    def read_into(self, writer: shared_segment.SegmentWriter, entry: dict[str, Any], source: Any,
                  pace: LoadPace) -> bool:
        fd = self._fd(source.shard_id)
        if fd is None:
            return False
        # /dev/shm: straight into the mapping (one copy). The file tier's writer flushes what it is
        # given to disk as it goes, so there each chunk goes through it (a cache-hot second copy).
        direct = not getattr(writer, "file_tier", False)
        start = shared_segment.DATA_START + entry["offset"]
        crc, pos, size = 0, 0, source.size
        view = done = None
        try:
            while pos < size:
                n = min(size - pos, pace.CHUNK)
                if direct:
                    view = writer.buffer[start + pos:start + pos + n]
                else:
                    if self._bounce is None:
                        self._bounce = np.empty(pace.CHUNK, np.uint8)
                    view = self._bounce[:n]
                got = os.preadv(fd, [view], source.offset + pos)
                if got <= 0:
                    return False
                done = view[:got].view()
                done.flags.writeable = False  # google_crc32c takes read-only buffers only
                crc = google_crc32c.extend(crc, done)
                if not direct:
                    writer.write(entry["offset"] + pos, done)
                pos += got
                pace.wrote(got)
        finally:
            view = done = None  # views of the mapping: the writer cannot close it while they exist
        if _masked(crc) != source.crc32c:
            from sgserve.models import graph_rewrite  # noqa: PLC0415

            raise graph_rewrite.ModelFormatError(
                f"{os.path.dirname(os.path.dirname(self.prefix))}: corrupt checkpoint data for '{entry['key']}' "
                f"(crc32c mismatch)")
        return True

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()


def _masked(crc: int) -> int:
    """TensorFlow's crc32c::Mask, as the checkpoint index stores each tensor's crc32c."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--server-id", required=True, help="the server's id: it names the segments")
@click.option("--background", is_flag=True,
              help="start at the lowest CPU priority (SCHED_IDLE), so it never competes with workers")
@click.option("--cores", default=None, help="comma-separated cores to run on (default: all)")
def main(server_id: str, background: bool, cores: str | None) -> None:
    """The sgserve loader service: reads load jobs as JSON lines on stdin and answers each with one
    JSON line on stdout (started by the server, not by hand)."""
    setup_logging("loader")
    die_with_parent()
    if background:
        to_background([int(c) for c in cores.split(",")] if cores else [])
    sys.exit(serve_jobs(server_id, background))


def _why(exc: BaseException) -> str:
    return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"


def serve_jobs(sid: str, background: bool = False) -> int:
    """The loader as a service: TensorFlow is imported once, so a version update costs what the
    version needs (its graph and changed tensors), not a TensorFlow start-up of several seconds.

    Each stdin line is a job, {"name", "base_path", "version", "base_segment"}, plus "background",
    "cores" and "load_bandwidth" (bytes/s, 0: unlimited) for an update while serving, or {"name",
    "demo_cache_dir"} for the built-in demo model (built once, its latest version loaded). Each answer is one stdout line, {"ok": true,
    "spec": ModelSpec} or {"ok": false, "error": the cause}. Exits at end of input.
    """
    with tensorflow_import_quiet():
        import tensorflow as tf  # noqa: PLC0415, F401 - paid once, here

    from sgserve.models import checkpoint_index, graph_rewrite  # noqa: PLC0415, F401 - imported now, not during the first job

    if background:
        lowest_priority()  # the threads the imports started, too
    answers = _private_stdout()
    _answer(answers, {"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            job = json.loads(line)
            if job.get("background"):
                background = True
                to_background(job.get("cores") or [])
            spec = _run_job(job, sid)
            answer = {"ok": True, "spec": spec.to_dict()}
        except Exception as exc:  # noqa: BLE001 - one bad version must not stop the service
            answer = {"ok": False, "error": _why(exc)}
        _answer(answers, answer)
        if background:
            lowest_priority()  # thread pools TensorFlow started during the job
    return 0


def _run_job(job: dict[str, Any], sid: str) -> ModelSpec:
    base, version = job.get("base_path"), job.get("version")
    if job.get("demo_cache_dir"):
        from sgserve.models import demo  # noqa: PLC0415

        base = demo.ensure_demo_model(job["demo_cache_dir"])
    if version is None:
        version = latest_version(base)
    if not os.path.isdir(os.path.join(base, str(version))):
        raise ModelNotFound(f"version {version} of model '{job['name']}' not found under {base}")
    return load_version(job["name"], base, int(version), sid, base_segment=job.get("base_segment"),
                        segment_dir=job.get("segment_dir"), pace=LoadPace(job.get("load_bandwidth") or 0))


def _private_stdout() -> TextIO:
    """The answers' own copy of stdout; whatever else prints to stdout (a library) goes to stderr,
    so it cannot break the one-JSON-line-per-answer protocol."""
    sys.stdout.flush()
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return answers


def _answer(out: TextIO, msg: dict[str, Any]) -> None:
    out.write(json.dumps(msg) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
