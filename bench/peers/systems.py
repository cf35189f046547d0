"""The systems bench_peers.py compares: how each starts, where clients reach it, which processes and
shared-memory files are its own, and how it is stopped and checked for leftovers.

Every system runs in process groups of its own (``start_new_session``), logs to
bench/.cache/logs/, and is driven over its endpoint only: ``tcp://`` (the sgserve protocol),
``http://`` (TF Serving's REST API) or ``grpc://`` (TF Serving's gRPC API). Each process that runs the model is pinned to cores
[i*K, (i+1)*K) with TF pools of K intra-op threads and sgserve's default inter-op pool, as sgserve
pins its workers; front ends (sgserve's broker, the round-robin proxy, gunicorn's master, Ray's
proxy and daemons) are not pinned, as sgserve's broker is not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

PEERS_DIR = os.path.dirname(os.path.abspath(__file__))
BENCH_DIR = os.path.dirname(PEERS_DIR)
sys.path.insert(0, BENCH_DIR)
sys.path.insert(0, PEERS_DIR)
import _common as C  # noqa: E402
import tfmodel  # noqa: E402  (no TensorFlow at import)

SHM = C.SHM


class StartError(RuntimeError):
    """The system did not come up; the message says why (with the tail of its log)."""


class Skipped(RuntimeError):
    """The system cannot run here (a package is missing, a flag does not exist yet)."""


@dataclasses.dataclass
class ModelRef:
    kind: str  # demo | cnn | embedding
    name: str  # the name clients use
    base: str  # TF Serving layout base path
    batch: int  # rows per request in the load test
    info: dict[str, Any]


@dataclasses.dataclass
class Layout:
    workers: int
    cpus_per_worker: int
    allow_oversubscribe: bool = False
    batching_file: str | None = None  # TF Serving batching parameters (text proto), for sgserve_batching

    @property
    def inter(self) -> int:
        return tfmodel.default_inter_threads(self.cpus_per_worker)

    def cores(self, i: int) -> list[int]:
        return tfmodel.cores_of_slot(i, self.cpus_per_worker)

    def all_cores(self) -> list[int]:
        usable = sorted(os.sched_getaffinity(0))
        return usable[:min(len(usable), self.workers * self.cpus_per_worker)]


def sgserve_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([C.REPO, PEERS_DIR, os.environ.get("PYTHONPATH", "")]),
                TF_CPP_MIN_LOG_LEVEL="2")


# ------------------------------------------------------------------------------------------ clients
def sgserve_ready(endpoint: str, expect_workers: int | None = None) -> bool:
    from sgserve.client import Client  # noqa: PLC0415

    with contextlib.closing(Client(endpoint, timeout=1.0)) as c:
        try:
            if not c.ping(timeout=1.0):
                return False
            ws = c.status(timeout=2.0).get("workers", [])
        except Exception:  # noqa: BLE001 - not up yet
            return False
    return bool(ws) and all(str(w.get("state", "")).upper() == "READY" for w in ws) and \
        (expect_workers is None or len(ws) >= expect_workers)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(url: str, body: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def grpc_predict(target: str, model: str, inputs: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One Predict through TF Serving's stock stub (tf-serving-api protos, no TensorFlow needed)."""
    import grpc  # noqa: PLC0415

    from sgserve.frontdoor import protos  # noqa: PLC0415

    protos.load()
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: PLC0415

    from sgserve.frontdoor.tensors import from_numpy, to_numpy  # noqa: PLC0415

    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = "serving_default"
    for k, v in inputs.items():
        req.inputs[k].CopyFrom(from_numpy(v))
    with grpc.insecure_channel(target) as channel:
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(req, timeout)
    return {k: to_numpy(v) for k, v in reply.outputs.items()}


def grpc_model_available(target: str, model: str) -> bool:
    """ModelService.GetModelStatus answers AVAILABLE for some version (the gateway is up)."""
    import grpc  # noqa: PLC0415

    from sgserve.frontdoor import protos  # noqa: PLC0415

    protos.load()
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc  # noqa: PLC0415

    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = model
    try:
        with grpc.insecure_channel(target) as channel:
            reply = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(req, 2.0)
    except grpc.RpcError:
        return False
    return any(v.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE for v in reply.model_version_status)


def predict_once(endpoint: str, model: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """One request through the system's own front door; numpy outputs by name."""
    import numpy as np  # noqa: PLC0415

    if endpoint.startswith("grpc://"):
        return grpc_predict(endpoint[len("grpc://"):], model, inputs)

    if endpoint.startswith("http://"):
        body = json.dumps({"signature_name": "serving_default", "inputs": {k: v.tolist() for k, v in inputs.items()}})
        status, out = http_post(f"{endpoint}/v1/models/{model}:predict", body.encode())
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {out[:300]!r}")
        outputs = json.loads(out)["outputs"]
        return {k: np.asarray(v) for k, v in outputs.items()}
    from sgserve.client import Client  # noqa: PLC0415

    with contextlib.closing(Client(endpoint, timeout=30.0)) as c:
        return {k: np.array(v) for k, v in c.predict(model, inputs).items()}


# ------------------------------------------------------------------------------------------ memory
def _shm_paths_of(pids: list[int]) -> set[str]:
    """/dev/shm files (not deleted ones) that these processes map."""
    import psutil  # noqa: PLC0415

    paths = set()
    for pid in pids:
        try:
            for m in psutil.Process(pid).memory_maps(grouped=True):
                if m.path.startswith(SHM + "/") and not m.path.endswith("(deleted)"):
                    paths.add(m.path)
        except psutil.Error:
            pass
    return paths


def tree_memory(pids: list[int], shm_files: set[str]) -> dict[str, Any]:
    """Memory of a system's processes, every page counted once overall.

    ``total_bytes`` = sum of the processes' PSS, with the PSS of their /dev/shm mappings replaced
    by the files' full allocated size (a segment's pages that no worker has touched yet still
    occupy RAM, and pages shared with processes outside the system count in full). PSS splits a
    page shared by k processes into k parts, so summing it over a tree counts a page shared only
    inside the tree once; pages (TF's libraries) shared with processes outside the tree are
    undercounted. ``unique_bytes`` (root only: /proc/PID/pagemap) is the union of the physical
    pages the tree maps, which has no such bias; the same shm correction applies.
    """
    import psutil  # noqa: PLC0415

    sizes = {}
    for path in shm_files:
        with contextlib.suppress(OSError):
            sizes[path] = os.stat(path).st_blocks * 512
    per = []
    pss = uss = rss = shm_pss = 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            full = p.memory_full_info()
            seg = sum(m.pss for m in p.memory_maps(grouped=True) if m.path in sizes)
            name = " ".join(p.cmdline()[:3])[-90:]
        except psutil.Error:
            continue
        pss, uss, rss, shm_pss = pss + full.pss, uss + full.uss, rss + full.rss, shm_pss + seg
        per.append({"pid": pid, "name": name, "pss": full.pss, "uss": full.uss, "rss": full.rss, "shm_pss": seg})
    shm_files = set(sizes)  # files removed meanwhile keep their mapped PSS and are not added
    shm_bytes = sum(sizes.values())
    out: dict[str, Any] = {"processes": len(per), "pss_sum_bytes": pss, "uss_sum_bytes": uss, "rss_sum_bytes": rss,
                           "shm_files": sorted(os.path.basename(p) for p in shm_files), "shm_file_bytes": shm_bytes,
                           "shm_mapped_pss_bytes": shm_pss, "total_bytes": pss - shm_pss + shm_bytes,
                           "per_process": per}
    # Unique pages: one pagemap pass; the shm files' mapped pages are swapped for their full size
    # when they share a name prefix (sgserve's segments: sgserve_<server pid>_...).
    names = [os.path.basename(p) for p in shm_files]
    prefix = os.path.commonprefix(names) if names else ""
    uniq = C.unique_memory(pids, segment_prefix=prefix or None)
    if uniq:
        out["unique_raw_bytes"] = uniq["unique_bytes"]
        if not names or prefix:
            out["unique_bytes"] = uniq["unique_bytes"] - uniq["unique_segment_bytes"] + shm_bytes
    return out


# ------------------------------------------------------------------------------------------ systems
class System:
    """One server layout. Subclasses fill in _launch, endpoint and (optionally) _own_shm."""

    key = "system"
    protocol = "sgserve"  # or "rest", "grpc"
    label = "system"

    def __init__(self, layout: Layout, model: ModelRef) -> None:
        self.layout = layout
        self.model = model
        self.procs: list[subprocess.Popen] = []
        self.logs: list[str] = []
        self.seen: dict[int, float] = {}  # pid -> create time, every process of ours ever seen
        self.shm_seen: set[str] = set()
        self.notes: list[str] = []
        self.endpoint = ""
        self.port = C.free_port()
        self.tmp = tempfile.mkdtemp(prefix="sgpeer-")

    # -- what subclasses provide -------------------------------------------------------------------
    def _launch(self, timeout: float) -> None:
        raise NotImplementedError

    def _own_shm(self) -> set[str]:
        return set()

    def describe(self) -> str:
        return self.label

    # -- common machinery -----------------------------------------------------------------------------
    def spawn(self, cmd: list[str], tag: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        os.makedirs(os.path.join(C.CACHE_DIR, "logs"), exist_ok=True)
        path = os.path.join(C.CACHE_DIR, "logs", f"peers-{self.key}-{self.model.kind}-{tag}-{self.port}.log")
        log = open(path, "w")
        self.logs.append(path)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env or sgserve_env(), cwd=C.REPO)
        log.close()
        self.procs.append(proc)
        return proc

    def log_tail(self, n: int = 3000) -> str:
        parts = []
        for path in self.logs:
            with contextlib.suppress(OSError), open(path, errors="replace") as f:
                text = f.read()[-n:]
            parts.append(f"--- {os.path.relpath(path, C.REPO)}\n{text}")
        return "\n".join(parts)

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise StartError(f"{self.key}: a process exited with code {p.returncode} during start "
                                 f"({' '.join(p.args[:4]) if isinstance(p.args, list) else p.args})\n{self.log_tail()}")

    def wait_until(self, what: str, ready, timeout: float) -> None:
        t0 = time.monotonic()
        last = t0
        while time.monotonic() - t0 < timeout:
            self.check_alive()
            if ready():
                return
            if time.monotonic() - last > 20:
                last = time.monotonic()
                C.log(f"{self.key}: waiting for {what} ({time.monotonic() - t0:.0f} s)")
            time.sleep(0.3)
        raise StartError(f"{self.key}: {what} not reached after {timeout:.0f} s\n{self.log_tail()}")

    def start(self, timeout: float) -> float:
        t0 = time.monotonic()
        self._launch(timeout)
        self.pids()
        return round(time.monotonic() - t0, 1)

    def pids(self) -> list[int]:
        """Every live process of the system (the trees under the processes we started)."""
        import psutil  # noqa: PLC0415

        out = []
        for p in self.procs:
            for pid in C.tree_pids(p.pid):
                try:
                    q = psutil.Process(pid)
                    if q.status() == psutil.STATUS_ZOMBIE:
                        continue
                    self.seen.setdefault(pid, q.create_time())
                    out.append(pid)
                except psutil.Error:
                    pass
        return sorted(set(out))

    def shm_files(self) -> set[str]:
        files = _shm_paths_of(self.pids()) | self._own_shm()
        self.shm_seen |= files
        return files

    def memory(self) -> dict[str, Any]:
        pids = self.pids()
        return tree_memory(pids, self.shm_files())

    def _terminate(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)

    def stop(self, grace: float = 20.0) -> dict[str, Any]:
        """Graceful stop, then SIGKILL of every group and every process of ours still alive; then
        checks that no process and no /dev/shm file of the system is left (and removes any)."""
        import psutil  # noqa: PLC0415

        with contextlib.suppress(Exception):
            self.shm_files()
        self._terminate()
        deadline = time.monotonic() + grace
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
        graceful = all(p.poll() is not None for p in self.procs)
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        for pid, created in self.seen.items():
            with contextlib.suppress(psutil.Error):
                q = psutil.Process(pid)
                if q.create_time() == created:  # not a recycled pid
                    q.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        left = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = []
            for pid, created in self.seen.items():
                with contextlib.suppress(psutil.Error):
                    q = psutil.Process(pid)
                    if q.create_time() == created and q.status() != psutil.STATUS_ZOMBIE:
                        left.append(pid)
            if not left:
                break
            time.sleep(0.2)
        shm_left = sorted(p for p in self.shm_seen | self._own_shm() if os.path.exists(p))
        for path in shm_left:
            with contextlib.suppress(OSError):
                os.unlink(path)
        shutil.rmtree(self.tmp, ignore_errors=True)
        result = {"graceful": graceful, "exit_codes": [p.returncode for p in self.procs],
                  "leftover_processes": left, "leftover_shm": [os.path.basename(p) for p in shm_left]}
        if left or shm_left:
            C.log(f"{self.key}: LEFT BEHIND after stop: processes {left}, /dev/shm {result['leftover_shm']} "
                  f"(shm files removed)")
        return result


class SgserveSystem(System):
    """``sgserve start`` through the real CLI (bench/_common.py's Server)."""

    key = "sgserve"
    protocol = "sgserve"

    def __init__(self, layout: Layout, model: ModelRef, batching: bool = False, front_door: str | None = None) -> None:
        super().__init__(layout, model)
        self.batching = batching
        self.front_door = front_door  # None (native ZeroMQ), "rest" or "grpc": the gateway process
        if batching:
            self.key = "sgserve_batching"
        if front_door:
            self.key, self.protocol = f"sgserve_{front_door}", front_door
        self.label = f"sgserve {layout.workers} workers x {layout.cpus_per_worker} cores, one shared copy" + \
            (", server-side batching" if batching else "") + \
            {None: "", "rest": ", TF Serving REST front door", "grpc": ", TF Serving gRPC front door"}[front_door]
        self.server: C.Server | None = None

    def _launch(self, timeout: float) -> None:
        args = ["--model-base-path", self.model.base, "--model-name", self.model.name,
                "--workers", str(self.layout.workers), "--cpus-per-worker", str(self.layout.cpus_per_worker)]
        if self.layout.allow_oversubscribe:
            args.append("--allow-oversubscribe")
        if self.batching:
            if not sgserve_has_batching():
                raise Skipped("`sgserve start` has no --enable-batching yet")
            args += ["--enable-batching", "--batching-parameters-file", self.layout.batching_file]
        if self.front_door:
            if "--rest-api-port" not in cli_help("start"):
                raise Skipped("`sgserve start` has no --port / --rest_api_port yet")
            # TF Serving's own spellings, as a migrating user's launch line has them.
            args.append(f"--port={self.port}" if self.front_door == "grpc" else f"--rest_api_port={self.port}")
        self.server = C.Server(args, label=self.key)
        self.endpoint = self.server.endpoint
        try:
            self.server.start(timeout)
        except C.ServerError as exc:
            raise StartError(str(exc)) from None
        finally:
            self.procs = [self.server.proc] if self.server.proc is not None else []
            self.logs = [self.server.log_file.name]
        if self.front_door == "rest":
            self.endpoint = f"http://127.0.0.1:{self.port}"
            url = f"{self.endpoint}/v1/models/{self.model.name}"
            self.wait_until(f"GET {url}", lambda: _http_ok(url), 60)
        elif self.front_door == "grpc":
            self.endpoint = f"grpc://127.0.0.1:{self.port}"
            target = f"127.0.0.1:{self.port}"
            self.wait_until(f"GetModelStatus at {target}", lambda: grpc_model_available(target, self.model.name), 60)

    def _own_shm(self) -> set[str]:
        if self.server is None or self.server.proc is None:
            return set()
        mine = f"sgserve_{self.server.proc.pid}_"
        return {os.path.join(SHM, n) for n in C.sgserve_segments() if n.startswith(mine)}

    def _terminate(self) -> None:
        if self.server is not None and self.server.proc is not None:
            self.server.stop()  # SIGTERM, wait, SIGKILL the group, /dev/shm check

    def stop(self, grace: float = 20.0) -> dict[str, Any]:
        r = super().stop(grace)
        if self.server is not None:
            r["server_warnings"] = self.server.problems[:20]
            r["leftover_shm"] = sorted(set(r["leftover_shm"]) | set(self.server.leftovers))
        return r


class ThreadsSystem(System):
    """One process, one private tf.saved_model.load, N threads, over the sgserve protocol."""

    key = "tf_threads"
    protocol = "sgserve"

    def __init__(self, layout: Layout, model: ModelRef) -> None:
        super().__init__(layout, model)
        n = layout.workers
        self.cores = layout.all_cores()
        self.intra = len(self.cores)
        self.inter_threads = n * layout.inter
        self.label = f"1 process, {n} threads, 1 TF runtime on {len(self.cores)} cores"

    def _launch(self, timeout: float) -> None:
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.spawn([sys.executable, os.path.join(PEERS_DIR, "zmq_server.py"), "--base-path", self.model.base,
                    "--model-name", self.model.name, "--endpoint", self.endpoint,
                    "--threads", str(self.layout.workers), "--cores", ",".join(map(str, self.cores)),
                    "--intra-op-threads", str(self.intra), "--inter-op-threads", str(self.inter_threads)], "server")
        self.wait_until("ping + status", lambda: sgserve_ready(self.endpoint), timeout)
        self.notes.append(f"cores {self.cores}, intra-op {self.intra}, inter-op {self.inter_threads}")


class NaiveSystem(System):
    """N processes with a private model copy each, behind a ZeroMQ round-robin proxy."""

    key = "naive_procs"
    protocol = "sgserve"

    def __init__(self, layout: Layout, model: ModelRef) -> None:
        super().__init__(layout, model)
        self.label = f"{layout.workers} processes x {layout.cpus_per_worker} cores, private copies, round-robin proxy"

    def _launch(self, timeout: float) -> None:
        backends = []
        for i in range(self.layout.workers):
            ep = f"ipc://{self.tmp}/s{i}"
            backends.append(ep)
            self.spawn([sys.executable, os.path.join(PEERS_DIR, "zmq_server.py"), "--base-path", self.model.base,
                        "--model-name", self.model.name, "--endpoint", ep, "--threads", "1", "--index", str(i),
                        "--cores", ",".join(map(str, self.layout.cores(i))),
                        "--intra-op-threads", str(self.layout.cpus_per_worker),
                        "--inter-op-threads", str(self.layout.inter)], f"s{i}")
        t0 = time.monotonic()
        for ep in backends:
            self.wait_until(f"{ep} ready", lambda ep=ep: sgserve_ready(ep), max(1.0, timeout - (time.monotonic() - t0)))
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.spawn([sys.executable, os.path.join(PEERS_DIR, "zmq_balancer.py"), "--endpoint", self.endpoint] + backends,
                   "proxy")
        self.wait_until("proxy ping", lambda: sgserve_ready(self.endpoint), 30)

    def _terminate(self) -> None:
        for p in reversed(self.procs):  # the proxy first, so no request reaches a stopping server
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)


class GunicornSystem(System):
    """gunicorn + Flask, N sync workers, each loading its own copy after the fork."""

    key = "gunicorn_flask"
    protocol = "rest"

    def __init__(self, layout: Layout, model: ModelRef) -> None:
        super().__init__(layout, model)
        self.label = f"gunicorn + Flask, {layout.workers} sync workers x {layout.cpus_per_worker} cores, REST"

    def _launch(self, timeout: float) -> None:
        for mod in ("gunicorn", "flask"):
            if importlib.util.find_spec(mod) is None:
                raise Skipped(f"{mod} is not installed (pip install flask gunicorn)")
        n = self.layout.workers
        env = sgserve_env()
        env.update(PEER_BASE_PATH=self.model.base, PEER_MODEL_NAME=self.model.name, PEER_SLOTS=str(n),
                   PEER_SLOT_DIR=self.tmp, PEER_CPUS_PER_WORKER=str(self.layout.cpus_per_worker),
                   PEER_INTRA_OP_THREADS=str(self.layout.cpus_per_worker),
                   PEER_INTER_OP_THREADS=str(self.layout.inter))
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.spawn([sys.executable, "-m", "gunicorn", "--chdir", PEERS_DIR, "--workers", str(n),
                    "--worker-class", "sync", "--bind", f"127.0.0.1:{self.port}", "--backlog", "2048",
                    "--timeout", "120", "--graceful-timeout", "5", "--log-level", "warning", "flask_app:app"],
                   "gunicorn", env)
        url = f"{self.endpoint}/v1/models/{self.model.name}"
        self.wait_until(f"{n} workers loaded + GET {url}",
                        lambda: len(tfmodel.ready_pids(self.tmp, n)) == n and _http_ok(url), timeout)


class RayServeSystem(System):
    """Ray Serve, N replicas each loading its own copy, behind Serve's HTTP proxy."""

    key = "ray_serve"
    protocol = "rest"

    def __init__(self, layout: Layout, model: ModelRef) -> None:
        super().__init__(layout, model)
        self.label = f"Ray Serve, {layout.workers} replicas x {layout.cpus_per_worker} cores, REST"
        self.ray_tmp: str | None = None

    def _launch(self, timeout: float) -> None:
        if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
            raise Skipped("ray[serve] is not installed (pip install 'ray[serve]')")
        n = self.layout.workers
        ready = os.path.join(self.tmp, "ready")
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = sgserve_env()
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only; no token written to ~/.ray
        self.spawn([sys.executable, os.path.join(PEERS_DIR, "ray_app.py"), "--base-path", self.model.base,
                    "--model-name", self.model.name, "--port", str(self.port), "--replicas", str(n),
                    "--cpus-per-worker", str(self.layout.cpus_per_worker), "--slot-dir", self.tmp,
                    "--ready-file", ready], "ray", env)
        url = f"{self.endpoint}/v1/models/{self.model.name}"
        self.wait_until(f"serve.run + GET {url}", lambda: os.path.exists(ready) and _http_ok(url), timeout)
        with open(ready) as f:
            self.ray_tmp = f.read().split()[1]

    def pids(self) -> list[int]:
        """The launcher's tree, plus any process that runs from this cluster's own temp dir (Ray's
        daemons are the launcher's descendants, but a safety net costs nothing)."""
        import psutil  # noqa: PLC0415

        pids = set(super().pids())
        if self.ray_tmp:
            for q in psutil.process_iter(["pid", "cmdline", "create_time"]):
                with contextlib.suppress(psutil.Error, TypeError):
                    if q.info["pid"] not in pids and any(self.ray_tmp in a for a in q.info["cmdline"] or []):
                        if q.status() != psutil.STATUS_ZOMBIE:
                            pids.add(q.info["pid"])
                            self.seen.setdefault(q.info["pid"], q.info["create_time"])
        return sorted(pids)

    def stop(self, grace: float = 30.0) -> dict[str, Any]:
        r = super().stop(grace)
        if self.ray_tmp:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return r


def _http_ok(url: str) -> bool:
    try:
        return http_get(url)[0] == 200
    except OSError:
        return False


_HELP_CACHE: dict[str, str] = {}


def cli_help(*sub: str) -> str:
    key = " ".join(sub)
    if key not in _HELP_CACHE:
        out = subprocess.run([sys.executable, "-m", "sgserve.cli", *sub, "--help"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=sgserve_env(), cwd=C.REPO, check=False)
        _HELP_CACHE[key] = out.stdout
    return _HELP_CACHE[key]


def sgserve_has_batching() -> bool:
    return "--enable-batching" in cli_help("start")


SYSTEMS: dict[str, Any] = {
    "sgserve": lambda layout, model: SgserveSystem(layout, model),
    "sgserve_batching": lambda layout, model: SgserveSystem(layout, model, batching=True),
    "sgserve_rest": lambda layout, model: SgserveSystem(layout, model, front_door="rest"),
    "sgserve_grpc": lambda layout, model: SgserveSystem(layout, model, front_door="grpc"),
    "tf_threads": ThreadsSystem,
    "naive_procs": NaiveSystem,
    "gunicorn_flask": GunicornSystem,
    "ray_serve": RayServeSystem,
}
