"""The loader: reads one model version's variables once and writes them into one shared segment.

Runs as its own short-lived process (``python -m sgserve.models.loader``) so that the broker never imports
TensorFlow and a loader crash cannot take the server down. It prints progress on stderr and, on
success, the ModelSpec as one JSON line on stdout. Exit code 2 means "this model cannot be served"
(missing or corrupt directory); the message on stderr says why. Any partly written segment is
unlinked before it exits.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable

import msgpack
import numpy as np

from sgserve.models import shared_segment
from sgserve.config import ModelSpec
from sgserve.errors import NotFound
from sgserve.process import EXIT_MODEL_ERROR, die_with_parent, lowest_priority

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


class Progress:
    """Progress of a long load on stderr: a live line on a terminal, a line every few seconds otherwise."""

    def __init__(self, label: str, total: int, stream=None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.monotonic()
        self.last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.started < 0.5:  # small models load silently
            return
        if now - self.last >= (0.2 if self.tty else 2.0):
            self.last = now
            self._print(final=False)

    def _print(self, final: bool) -> None:
        mib = 1024 * 1024
        pct = 100.0 * self.done / self.total
        line = (f"[sgserve] loading {self.label}: {self.done / mib:.1f}/{self.total / mib:.1f} MiB "
                f"({pct:.0f}%), {time.monotonic() - self.started:.1f} s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        printed_all = self.last and self.done >= self.total
        self.done = self.total
        if printed_all:
            return
        if self.last or self.total >= 64 * 1024 * 1024:
            self._print(final=True)


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
                 progress: Callable[[str, int], Progress] | None = None,
                 base_segment: str | None = None) -> ModelSpec:
    """Reads ``base_path/version`` into a new shared segment; returns its ModelSpec.

    With ``base_segment`` (a live segment of an earlier version of the same model), tensors whose
    checkpoint crc32c, dtype and shape match that version's are not read again: the new manifest
    points at the bytes already in shared memory, so the update costs time and memory in proportion
    to what changed.
    """
    import tensorflow as tf  # noqa: PLC0415

    from sgserve.models import graph_rewrite  # noqa: PLC0415

    started = time.monotonic()
    version_dir = os.path.join(base_path, str(version))
    ckpt_prefix = os.path.join(version_dir, "variables", "variables")
    try:
        reader = tf.train.load_checkpoint(ckpt_prefix)
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
    except Exception as exc:  # noqa: BLE001 - NotFoundError, DataLossError, ...
        if not os.path.exists(ckpt_prefix + ".index"):
            # A model with no variables at all is legal (tf.Module with constants only).
            if os.path.isfile(os.path.join(version_dir, "saved_model.pb")) and not os.path.isdir(
                    os.path.join(version_dir, "variables")):
                reader, shapes, dtypes = None, {}, {}
            else:
                raise graph_rewrite.ModelFormatError(
                    f"{version_dir}: no checkpoint at variables/variables.index ({type(exc).__name__})") from None
        else:
            raise graph_rewrite.ModelFormatError(
                f"{version_dir}: corrupt checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None

    sg = graph_rewrite.build_serving_graph(
        version_dir, table_prefix=f"sgserve/{name}/{version}",
        variable_shapes={k: list(v) for k, v in shapes.items()},
        variable_dtypes={k: v for k, v in dtypes.items()})

    crcs = _checkpoint_crcs(ckpt_prefix) if reader is not None else {}
    base = load_base(base_segment) if base_segment and crcs else None

    # Lay out every distinct checkpoint key once; unchanged ones stay where the base version has them.
    tensors: list[dict[str, Any]] = []
    offsets: dict[str, dict[str, Any]] = {}  # the keys this version writes into its own segment
    placed: dict[str, dict[str, Any]] = {}
    offset = 0
    shared_bytes = 0
    strings: dict[str, bytes] = {}
    for var in sg.variables:
        if var.key in placed:
            tensors.append(dict(placed[var.key], node=var.node))
            continue
        if var.key not in shapes:
            raise graph_rewrite.ModelFormatError(
                f"{version_dir}: variable '{var.node}' (checkpoint key '{var.key}') is not in the checkpoint")
        dtype = graph_rewrite.dtype_name(tf.as_dtype(dtypes[var.key]).as_datatype_enum)
        crc = crcs.get(var.key)
        old = _reusable(base, var.key, crc)
        if old is not None:
            entry = {"node": var.node, "key": var.key, "dtype": dtype, "shape": [int(d) for d in shapes[var.key]],
                     "offset": old["offset"], "nbytes": old["nbytes"], "segment": old["segment"],
                     "crc32c": old["crc32c"]}
            placed[var.key] = entry
            tensors.append(entry)
            shared_bytes += old["nbytes"]
            continue
        if dtype == "string":
            data = msgpack.packb([bytes(x) for x in reader.get_tensor(var.key).reshape(-1).tolist()], use_bin_type=True)
            strings[var.key] = data
            nbytes = len(data)
        else:
            nbytes = math.prod(int(d) for d in shapes[var.key]) * np.dtype(dtype).itemsize
        entry = {"node": var.node, "key": var.key, "dtype": dtype, "shape": [int(d) for d in shapes[var.key]],
                 "offset": offset, "nbytes": nbytes}
        if crc is not None and not crc.sliced:
            entry["crc32c"] = crc.crc32c
        offsets[var.key] = placed[var.key] = entry
        tensors.append(entry)
        offset = shared_segment.align(offset + nbytes)
    data_bytes = offset
    borrowed = sorted({t["segment"] for t in placed.values() if "segment" in t})
    if base is not None:
        log.info("%s version %d: %d of %d tensors (%.1f MiB) unchanged since version %s, shared with it",
                 name, version, len(placed) - len(offsets), len(placed), shared_bytes / 2**20, base["version"])

    signatures_full = {
        k: {"method": s.method,
            "inputs": {n: {"tensor": t.tensor, "dtype": t.dtype, "shape": t.shape} for n, t in s.inputs.items()},
            "outputs": {n: {"tensor": t.tensor, "dtype": t.dtype, "shape": t.shape} for n, t in s.outputs.items()}}
        for k, s in sg.signatures.items()
    }
    manifest = {"format": 1, "model": name, "version": version, "base_path": base_path, "tensors": tensors,
                "graph": sg.graph_def, "signatures": signatures_full, "init_nodes": sg.init_nodes,
                "assets": sg.assets}
    seg_name = shared_segment.segment_name(sid, name, version)
    writer = shared_segment.SegmentWriter(seg_name, data_bytes, manifest)
    try:
        prog = (progress or Progress)(f"{name} version {version}", data_bytes)
        for entry in offsets.values():
            if entry["dtype"] == "string":
                writer.write_bytes(entry["offset"], strings[entry["key"]])
            elif entry["nbytes"]:
                try:
                    arr = reader.get_tensor(entry["key"])
                except Exception as exc:  # noqa: BLE001 - IndexError, DataLossError, ... on a bad file
                    raise graph_rewrite.ModelFormatError(
                        f"{version_dir}: corrupt or truncated checkpoint data for '{entry['key']}' "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
                writer.write(entry["offset"], arr)
                del arr
            prog.advance(entry["nbytes"])
        prog.finish()
        writer.finish()
    except BaseException:
        writer.close()
        shared_segment.unlink(seg_name)
        raise
    public = {k: s.public() for k, s in sg.signatures.items()}
    return ModelSpec(name=name, version=version, base_path=base_path, segment=seg_name,
                     segment_bytes=data_bytes + shared_bytes, signatures=public,
                     load_seconds=round(time.monotonic() - started, 3), segments=[seg_name, *borrowed],
                     own_bytes=data_bytes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sgserve.models.loader", description=__doc__)
    p.add_argument("--name", help="the model's name (one-shot mode)")
    p.add_argument("--base-path", help="TF Serving model base path; omit with --demo")
    p.add_argument("--version", type=int, default=None, help="default: the highest version")
    p.add_argument("--server-id", required=True)
    p.add_argument("--demo-cache-dir", help="build (once) and load the built-in demo model from here")
    p.add_argument("--base-segment", help="segment of an earlier version: share the tensors that did not change")
    p.add_argument("--background", action="store_true",
                   help="a load while serving: lowest CPU priority (SCHED_IDLE), so it never competes with workers")
    p.add_argument("--cores", help="comma-separated cores to run on (default: all)")
    p.add_argument("--serve", action="store_true",
                   help="stay up: read load jobs as JSON lines on stdin, answer each with one JSON line")
    args = p.parse_args(argv)
    if not args.serve and not args.name:
        p.error("--name is required (or --serve)")
    die_with_parent()
    if args.cores:
        os.sched_setaffinity(0, [int(c) for c in args.cores.split(",")])
    if args.background:
        lowest_priority()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.serve:
        return serve_jobs(args.server_id)
    try:
        base = args.base_path
        if args.demo_cache_dir:
            from sgserve.models import demo  # noqa: PLC0415

            base = demo.ensure_demo_model(args.demo_cache_dir)
        version = args.version if args.version is not None else latest_version(base)
        if not os.path.isdir(os.path.join(base, str(version))):
            raise ModelNotFound(f"version {version} of model '{args.name}' not found under {base}")
        spec = load_version(args.name, base, version, args.server_id, base_segment=args.base_segment)
    except Exception as exc:  # noqa: BLE001
        print(f"sgserve: cannot load model '{args.name}': {_why(exc)}", file=sys.stderr)
        return EXIT_MODEL_ERROR
    sys.stdout.write(json.dumps(spec.to_dict()) + "\n")
    sys.stdout.flush()
    return 0


def _why(exc: BaseException) -> str:
    return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"


def serve_jobs(sid: str) -> int:
    """The loader as a service: TensorFlow is imported once, so a version update costs what the
    version needs (its graph and changed tensors), not a TensorFlow start-up of several seconds.

    Each stdin line is {"name", "base_path", "version", "base_segment"}; each answer one stdout line,
    {"ok": true, "spec": ModelSpec} or {"ok": false, "error": str}. Exits at end of input.
    """
    import tensorflow as tf  # noqa: PLC0415, F401 - paid once, here

    from sgserve.models import checkpoint_index, graph_rewrite  # noqa: PLC0415, F401 - imported now, not during the first job

    lowest_priority()  # the threads the imports started, too
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            job = json.loads(line)
            version_dir = os.path.join(job["base_path"], str(job["version"]))
            if not os.path.isdir(version_dir):
                raise ModelNotFound(f"version {job['version']} of model '{job['name']}' not found under "
                                    f"{job['base_path']}")
            spec = load_version(job["name"], job["base_path"], int(job["version"]), sid,
                                base_segment=job.get("base_segment"))
            answer = {"ok": True, "spec": spec.to_dict()}
        except Exception as exc:  # noqa: BLE001 - one bad version must not stop the service
            answer = {"ok": False, "error": _why(exc)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
        lowest_priority()  # thread pools TensorFlow started during the job
    return 0


if __name__ == "__main__":
    sys.exit(main())
