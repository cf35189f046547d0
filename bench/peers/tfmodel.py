"""What every peer server process does with TensorFlow: pin itself, size TF's pools, load its own
copy of the SavedModel with ``tf.saved_model.load``, and call a signature on numpy arrays.

Placement follows sgserve's workers (sgserve/worker/pinning.py): ``os.sched_setaffinity`` to the
process's cores and the pool sizes in the environment *before* TensorFlow is imported, then
``tf.config.threading`` as well. Server processes that a framework forks (gunicorn workers, Ray
replicas) find their index by claiming a slot: an exclusive ``flock`` on ``SLOT_DIR/slot-<i>``,
held for the life of the process, so a replacement process gets the index of the one it replaces.
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from typing import Any

_SLOT_FDS: list[int] = []  # claimed slot locks, held open until the process exits


def claim_slot(slot_dir: str, slots: int, timeout: float = 60.0) -> int:
    """The lowest free index in [0, slots); waits for one to be released when all are held."""
    os.makedirs(slot_dir, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        for i in range(slots):
            fd = os.open(os.path.join(slot_dir, f"slot-{i}"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            _SLOT_FDS.append(fd)
            return i
        if time.monotonic() > deadline:
            raise RuntimeError(f"no free slot of {slots} in {slot_dir} after {timeout:.0f} s")
        time.sleep(0.2)


def mark_ready(slot_dir: str, index: int) -> None:
    """Tells the benchmark driver that this slot's process has loaded and warmed its model."""
    with open(os.path.join(slot_dir, f"ready-{index}"), "w") as f:
        f.write(f"{os.getpid()}\n")


def ready_pids(slot_dir: str, slots: int) -> list[int]:
    pids = []
    for i in range(slots):
        try:
            with open(os.path.join(slot_dir, f"ready-{i}")) as f:
                pids.append(int(f.read().strip()))
        except (OSError, ValueError):
            pass
    return pids


def default_inter_threads(cpus: int) -> int:
    """sgserve's default inter-op pool (sgserve/config.py): 1 up to 2 cores, else 2."""
    return 1 if cpus <= 2 else 2


def place(cores: list[int] | None, intra: int, inter: int) -> None:
    """Pins this process and sizes TF's and oneDNN's pools; call before importing TensorFlow."""
    if cores:
        os.sched_setaffinity(0, set(cores))
    os.environ.update({"OMP_NUM_THREADS": str(intra), "TF_NUM_INTRAOP_THREADS": str(intra),
                       "TF_NUM_INTEROP_THREADS": str(inter)})
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cores_of_slot(index: int, cpus_per_worker: int) -> list[int]:
    """sgserve's assignment (broker.assign_cores): slot i gets the i-th run of K usable cores."""
    usable = sorted(os.sched_getaffinity(0))
    return [usable[(index * cpus_per_worker + j) % len(usable)] for j in range(cpus_per_worker)]


def latest_version(base: str) -> int:
    versions = [int(d) for d in os.listdir(base) if d.isdigit() and os.path.isfile(os.path.join(base, d, "saved_model.pb"))]
    if not versions:
        raise FileNotFoundError(f"{base}: no <version>/saved_model.pb (TF Serving layout)")
    return max(versions)


class LoadedModel:
    """One private copy of a SavedModel's highest version, loaded by TensorFlow itself."""

    def __init__(self, base: str, name: str, intra: int, inter: int) -> None:
        import tensorflow as tf  # noqa: PLC0415

        tf.get_logger().setLevel("ERROR")
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
        self.tf = tf
        self.name = name
        self.base = os.path.abspath(base)
        self.version = latest_version(base)
        self.path = os.path.join(self.base, str(self.version))
        self.loaded = tf.saved_model.load(self.path)
        self.functions = dict(self.loaded.signatures)
        self.signatures = {k: self._describe(f) for k, f in self.functions.items()}

    def _describe(self, fn) -> dict[str, Any]:
        """sgserve's metadata shape (graph_rewrite.SignatureInfo.public), which sgserve's load
        generator reads to synthesize inputs."""
        def spec(s) -> dict[str, Any]:
            import numpy as np  # noqa: PLC0415

            dtype = "string" if s.dtype == self.tf.string else np.dtype(s.dtype.as_numpy_dtype).name
            shape = None if s.shape.rank is None else [-1 if d is None else int(d) for d in s.shape.as_list()]
            return {"dtype": dtype, "shape": shape}

        return {"method": "tensorflow/serving/predict",
                "inputs": {k: spec(v) for k, v in sorted(fn.structured_input_signature[1].items())},
                "outputs": {k: spec(v) for k, v in sorted(fn.structured_outputs.items())}}

    def metadata(self) -> dict[str, Any]:
        return {"model": self.name, "version": self.version, "versions": [self.version],
                "signatures": self.signatures}

    def run(self, signature: str, inputs: dict[str, Any], output_filter: list[str] | None = None) -> dict[str, Any]:
        """numpy in, numpy out. KeyError: unknown signature; ValueError: inputs that do not fit."""
        fn = self.functions[signature]
        want = self.signatures[signature]["inputs"]
        missing, extra = sorted(set(want) - set(inputs)), sorted(set(inputs) - set(want))
        if missing or extra:
            raise ValueError(f"signature '{signature}' takes inputs {sorted(want)}; missing {missing}, unexpected {extra}")
        try:
            out = fn(**{k: self.tf.convert_to_tensor(v) for k, v in inputs.items()})
        except (TypeError, self.tf.errors.InvalidArgumentError) as exc:
            raise ValueError(str(exc).splitlines()[0]) from None
        names = output_filter if output_filter else list(out)
        return {k: out[k].numpy() for k in names}

    def warmup(self) -> None:
        import numpy as np  # noqa: PLC0415

        for sig, desc in self.signatures.items():
            inputs = {}
            for k, s in desc["inputs"].items():
                shape = [1 if d == -1 else d for d in (s["shape"] if s["shape"] is not None else [-1])]
                inputs[k] = np.full(shape, b"a", dtype=object) if s["dtype"] == "string" else np.zeros(shape, s["dtype"])
            self.run(sig, inputs)


def log(msg: str) -> None:
    sys.stderr.write(f"[{os.path.basename(sys.argv[0])} pid {os.getpid()}] {msg}\n")
    sys.stderr.flush()
