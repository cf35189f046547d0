"""Versioned models for bench/bench_lifecycle.py, built once into bench/.cache/models/ (a store of
complete SavedModel versions ``STORE/<v>/``; the benchmark publishes them into a watched base path).

Each store is built in a child process (``python bench/_lifecycle_models.py KIND --out DIR ...``),
so that the bench driver does not hold TensorFlow's or the build's memory. All versions of a store
come from one tf.Module saved several times (the big table is filled once), so variable names, and
therefore checkpoint keys, are identical across versions. Kinds:

- ``swap``: an embedding table (``--table-mib`` of ROWS x 64 float32) + an MLP (``--depth`` dense
  WIDTH x WIDTH relu layers + a WIDTH x 1 head); serving_default(ids int64[None]) -> score
  float32[None]. ``--change all`` (default): every variable differs between versions (a retrained
  model: every tensor is loaded again); ``--change dense``: only the MLP differs (the table is shared
  by an incremental update).
- ``incremental``: a big table (``--table-mib``, 1 GiB = 4,194,304 rows) + a small dense layer
  (64 -> 64 relu -> 1); version v+1 changes ONLY the dense layer, so the table's bytes (and
  checkpoint crc32c) are the same in every version.

Signature of both: serving_default(ids int64[None]) -> {"score": float32[None]}; ids are taken
modulo ROWS, so any int64 ids work.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CACHE_DIR, MiB, log  # noqa: E402

DIM = 64
CHUNK_ROWS = 1 << 18  # 64 MiB of the table per fill step


def table_rows(table_mib: float) -> int:
    return max(1, int(round(table_mib * MiB / (DIM * 4))))


def build(kind: str, out: str, table_mib: float, versions: int, width: int, depth: int, change: str) -> dict:
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    rows = table_rows(table_mib)
    if kind == "incremental":
        width, depth, change = 64, 1, "dense"

    def fill_table(var: tf.Variable, seed: int) -> None:
        """Fills the table in place, 64 MiB at a time (peak RSS about 1x the table + TF)."""
        t0, last = time.monotonic(), time.monotonic()
        for i in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - i)
            chunk = tf.random.stateless_uniform([n, DIM], seed=[seed, i], minval=-0.05, maxval=0.05)
            var.scatter_update(tf.IndexedSlices(chunk, tf.range(i, i + n, dtype=tf.int64)))
            if time.monotonic() - last > 5:
                last = time.monotonic()
                log(f"  table: {100.0 * (i + n) / rows:.0f}% of {rows * DIM * 4 / MiB:.0f} MiB "
                    f"({time.monotonic() - t0:.0f} s)")

    class Versioned(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="lifecycle")
            self.table = tf.Variable(tf.zeros([rows, DIM]), name="table")
            dims = [DIM] + [width] * depth
            self.ws = [tf.Variable(tf.zeros([a, b]), name=f"w{i}") for i, (a, b) in enumerate(zip(dims, dims[1:]))]
            self.bs = [tf.Variable(tf.zeros([b]), name=f"b{i}") for i, b in enumerate(dims[1:])]
            self.head = tf.Variable(tf.zeros([width, 1]), name="head")
            self.head_b = tf.Variable(tf.zeros([1]), name="head_b")

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
        def serve(self, ids):
            h = tf.nn.embedding_lookup(self.table, tf.math.floormod(ids, rows))
            for w, b in zip(self.ws, self.bs):
                h = tf.nn.relu(tf.matmul(h, w) + b)
            return {"score": tf.squeeze(tf.matmul(h, self.head) + self.head_b, axis=1)}

    m = Versioned()
    saved = []
    for v in range(1, versions + 1):
        t0 = time.monotonic()
        if v == 1 or change == "all":
            fill_table(m.table, seed=1000 + v)
        rng = np.random.default_rng(v)
        for w in m.ws + [m.head]:
            fan_in = int(w.shape[0])
            w.assign(rng.normal(0, (2.0 / fan_in) ** 0.5, tuple(w.shape)).astype("float32"))
        for b in m.bs:
            b.assign(np.full(tuple(b.shape), 0.01 * v, "float32"))
        m.head_b.assign(np.array([float(v)], "float32"))  # the score's offset tells versions apart
        path = os.path.join(out, str(v))
        tf.saved_model.save(m, path, signatures={"serving_default": m.serve})
        saved.append(v)
        log(f"  version {v} saved in {time.monotonic() - t0:.1f} s")
    table_bytes = rows * DIM * 4
    variable_bytes = sum(int(v.shape.num_elements()) * v.dtype.size for v in m.variables)
    return {"kind": kind, "rows": rows, "dim": DIM, "table_bytes": table_bytes, "variable_bytes": variable_bytes,
            "dense_bytes": variable_bytes - table_bytes, "width": width, "depth": depth, "change": change,
            "versions": saved}


def store_dir(kind: str, **params) -> str:
    tag = "_".join(f"{k}{v}" for k, v in sorted(params.items()))
    return os.path.join(CACHE_DIR, "models", f"lifecycle_{kind}_{tag}")


def ensure(kind: str, *, table_mib: float, versions: int, width: int = 256, depth: int = 3,
           change: str = "all") -> tuple[str, dict]:
    """(store directory holding 1..versions, build info), building it in a child process if missing."""
    params = {"mib": f"{table_mib:g}", "v": versions}
    if kind == "swap":
        params.update(w=width, d=depth, change=change)
    store = store_dir(kind, **params)
    info_path = os.path.join(store, "build.json")
    if os.path.isfile(info_path) and all(
            os.path.isfile(os.path.join(store, str(v), "saved_model.pb")) for v in range(1, versions + 1)):
        with open(info_path) as f:
            return store, json.load(f)
    shutil.rmtree(store, ignore_errors=True)
    os.makedirs(os.path.dirname(store), exist_ok=True)
    tmp = store + ".building"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, os.path.abspath(__file__), kind, "--out", tmp, "--table-mib", str(table_mib),
           "--versions", str(versions), "--width", str(width), "--depth", str(depth), "--change", change]
    log(f"building {kind} model store ({table_mib:g} MiB table, versions 1..{versions}) into "
        f"{os.path.relpath(store)} ...")
    t0 = time.monotonic()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if out.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"building the {kind} store failed (exit {out.returncode})")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info["build_seconds"] = round(time.monotonic() - t0, 1)
    os.rename(tmp, store)
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    log(f"built the {kind} store in {info['build_seconds']} s (peak RSS {info['build_peak_rss'] / MiB:.0f} MiB)")
    return store, info


def publish(store: str, base: str, version: int, source: int | None = None) -> str:
    """Puts ``store/<source>`` (default: ``version``) into a watched base path as version ``version``,
    as deploy tools do: a hidden copy, then a rename. The copy is made of hard links where the file
    system allows (instant, no page cache), so the time measured from the rename is the server's
    alone. Cycling a few stored versions (1, 2, 3, 1, 2, ...) gives any number of full swaps: each
    one differs in every tensor from the version before it."""
    source = version if source is None else source
    os.makedirs(base, exist_ok=True)
    tmp = os.path.join(base, f".incoming-{version}")
    shutil.rmtree(tmp, ignore_errors=True)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(os.path.join(store, str(source)), tmp, copy_function=link_or_copy)
    final = os.path.join(base, str(version))
    os.rename(tmp, final)
    return final


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["swap", "incremental"])
    p.add_argument("--out", required=True)
    p.add_argument("--table-mib", type=float, default=128)
    p.add_argument("--versions", type=int, default=5)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--change", choices=["all", "dense"], default="all")
    a = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    info = build(a.kind, a.out, a.table_mib, a.versions, a.width, a.depth, a.change)
    info["build_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
