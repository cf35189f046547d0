"""The benchmark models, built once into bench/.cache/models/<name>/1 (TF Serving layout).

Each is built in a child process (``python bench/_models.py KIND --out DIR ...``) so that the bench
driver does not hold TensorFlow's or the build's memory. Kinds:

- ``embedding``: one big table (ROWS x 64 float32, ``--gib`` of it) + a small dense layer;
  signature serving_default(ids int64[None]) -> score float32[None]. Built with a peak RSS of about
  1x the table + TensorFlow (zeros, then filled in place in 64 MiB chunks).
- ``half_plus_two``: y = 0.5 x + 2, two scalar variables; serving_default(x float32[None]) -> y.
- ``mlp``: x float32[None, WIDTH] through DEPTH dense WIDTH x WIDTH relu layers + a WIDTH x 16 head;
  serving_default(x) -> y float32[None, 16]. Compute-bound.
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
from _common import CACHE_DIR, GiB, log  # noqa: E402

DIM = 64
HIDDEN = 64
CHUNK_ROWS = 1 << 18  # 64 MiB of the table per fill step


def embedding_rows(gib: float) -> int:
    return int(round(gib * GiB / (DIM * 4)))


def build_embedding(out: str, gib: float) -> dict:
    import tensorflow as tf  # noqa: PLC0415

    rows = embedding_rows(gib)

    class Embedding(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="emb")
            # Zeros, then filled in place 64 MiB at a time: peak RSS is about 1x the table (measured;
            # a full-size random initial value, or slice assignment, would copy it 2-3x).
            self.table = tf.Variable(tf.zeros([rows, DIM]), name="table")
            step = CHUNK_ROWS
            for i in range(0, rows, step):
                n = min(step, rows - i)
                chunk = tf.random.stateless_uniform([n, DIM], seed=[7, i], minval=-0.05, maxval=0.05)
                self.table.scatter_update(tf.IndexedSlices(chunk, tf.range(i, i + n, dtype=tf.int64)))
            self.w1 = tf.Variable(tf.random.stateless_normal([DIM, HIDDEN], seed=[1, 2], stddev=0.1), name="w1")
            self.b1 = tf.Variable(tf.zeros([HIDDEN]), name="b1")
            self.w2 = tf.Variable(tf.random.stateless_normal([HIDDEN, 1], seed=[3, 4], stddev=0.1), name="w2")
            self.b2 = tf.Variable(tf.zeros([1]), name="b2")

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
        def serve(self, ids):
            e = tf.nn.embedding_lookup(self.table, tf.math.floormod(ids, rows))
            h = tf.nn.relu(tf.matmul(e, self.w1) + self.b1)
            return {"score": tf.squeeze(tf.matmul(h, self.w2) + self.b2, axis=1)}

    m = Embedding()
    tf.saved_model.save(m, out, signatures={"serving_default": m.serve})
    variable_bytes = sum(int(v.shape.num_elements()) * v.dtype.size for v in m.variables)
    return {"rows": rows, "dim": DIM, "table_bytes": rows * DIM * 4, "variable_bytes": variable_bytes}


def build_half_plus_two(out: str) -> dict:
    import tensorflow as tf  # noqa: PLC0415

    class HalfPlusTwo(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="half_plus_two")
            self.a = tf.Variable(0.5, name="a")
            self.b = tf.Variable(2.0, name="b")

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def serve(self, x):
            return {"y": self.a * x + self.b}

    m = HalfPlusTwo()
    tf.saved_model.save(m, out, signatures={"serving_default": m.serve})
    return {"variable_bytes": 8}


def build_mlp(out: str, width: int, depth: int) -> dict:
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    rng = np.random.default_rng(5)

    class MLP(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="mlp")
            self.ws = [tf.Variable(rng.normal(0, (2.0 / width) ** 0.5, (width, width)).astype("float32"), name=f"w{i}")
                       for i in range(depth)]
            self.bs = [tf.Variable(np.zeros(width, "float32"), name=f"b{i}") for i in range(depth)]
            self.head = tf.Variable(rng.normal(0, 0.05, (width, 16)).astype("float32"), name="head")

        @tf.function(input_signature=[tf.TensorSpec([None, width], tf.float32, name="x")])
        def serve(self, x):
            h = x
            for w, b in zip(self.ws, self.bs):
                h = tf.nn.relu(tf.matmul(h, w) + b)
            return {"y": tf.matmul(h, self.head)}

    m = MLP()
    tf.saved_model.save(m, out, signatures={"serving_default": m.serve})
    return {"width": width, "depth": depth,
            "variable_bytes": sum(int(v.shape.num_elements()) * 4 for v in m.variables),
            "flops_per_row": 2 * (depth * width * width + width * 16)}


def model_dir(kind: str, **params) -> str:
    tag = "_".join(f"{k}{v}" for k, v in sorted(params.items()))
    return os.path.join(CACHE_DIR, "models", f"{kind}_{tag}" if tag else kind)


def ensure(kind: str, **params) -> tuple[str, dict]:
    """(base path, build info) of a cached model, building it in a child process if missing."""
    base = model_dir(kind, **params)
    final = os.path.join(base, "1")
    info_path = os.path.join(base, "build.json")
    if os.path.isfile(os.path.join(final, "saved_model.pb")) and os.path.isfile(info_path):
        with open(info_path) as f:
            return base, json.load(f)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base, exist_ok=True)
    tmp = os.path.join(base, ".building")
    cmd = [sys.executable, os.path.abspath(__file__), kind, "--out", tmp]
    for k, v in params.items():
        cmd += [f"--{k}", str(v)]
    log(f"building model {kind} {params} into {os.path.relpath(base)} ...")
    t0 = time.monotonic()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if out.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"building {kind} failed (exit {out.returncode})")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info["build_seconds"] = round(time.monotonic() - t0, 1)
    os.rename(tmp, final)
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    log(f"built {kind} in {info['build_seconds']} s (peak RSS {info['build_peak_rss'] / GiB:.2f} GiB)")
    return base, info


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["embedding", "half_plus_two", "mlp"])
    p.add_argument("--out", required=True)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=4)
    a = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if a.kind == "embedding":
        info = build_embedding(a.out, a.gib)
    elif a.kind == "half_plus_two":
        info = build_half_plus_two(a.out)
    else:
        info = build_mlp(a.out, a.width, a.depth)
    info["kind"] = a.kind
    info["build_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
