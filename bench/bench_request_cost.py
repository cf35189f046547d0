#!/usr/bin/env python
"""CPU cost per request of each process (client, broker, each worker), next to the floors, in one run.

sgserve (started through the real CLI: `sgserve start --workers 2 --cpus-per-worker 1`), for
  tiny   bench/_models.py half_plus_two (y = 0.5 x + 2), x float32 [1]
  demo   the built-in demo model (no --model-base-path), user_id/item_id int64 [rows], 1 and 16 rows
each with one sequential client and with 8 concurrent clients (8 threads of one client process, one
sgserve.Client, a socket per thread), N requests in total. The load runs in a child process
(`bench_request_cost.py _client ...`) so that its CPU is its own. For each window the benchmark reads
the CPU time of every process (the process CPU clock: all threads, ns resolution) right before and
right after the N requests, and divides:
  broker   the server's main pid, by N
  worker   each worker pid (status()["workers"]), by the requests it served (status "served"
           deltas); "workers" is the sum over workers / N
  client   the load child's own CPU (all its threads) over the timed requests, by N
The loader service (status()["loader"]) is idle and left out; any other process of the server's
tree is reported as "unattributed".

Floors, in the same run, with the same N and the frames of a tiny sgserve request (MAGIC, msgpack
header, one 4-byte payload frame), from bench/_minimal_echo.py:
  minimal echo  Python ROUTER/ROUTER forwarder process + DEALER echo worker pinned to core 1 +
                minimal DEALER client (msgpack header packed per request, reply header unpacked)
  C proxy       zmq.proxy(ROUTER, DEALER) in its own process (its I/O threads included), same worker
                and client
  TF floor      the cheapest complete call of the same graph in a child pinned to core 0 with 1
                intra-op and 1 inter-op thread, result read back as numpy: the SavedModel signature
                called with tf.constant; ConcreteFunction._call_flat + .numpy(); TF1
                Session.make_callable; and the same session graph run in the calling thread
                (inter-op pool -1, a callable with run_options.inter_op_thread_pool = -1), the path
                sgserve's rewritten runtime takes. The cheapest CPU per call is the "TF floor".
                Next to it, the sgserve worker's own call path
                (ModelRuntime over the live server's segment: SignatureRunner.run, and run_wire when
                the runtime has it).

--baseline REF also starts the same servers from a `git worktree add --detach` of REF (same venv,
PYTHONPATH and cwd = the worktree) and drives them with this tree's client, side by side.

    python bench/bench_request_cost.py [--requests 3000] [--models tiny,demo] [--baseline REF]
                                       [--quick] [--no-floors] [--name bench_request_cost]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

SELF = os.path.abspath(__file__)
ECHO = os.path.join(C.BENCH_DIR, "_minimal_echo.py")
MAGIC = b"SGS1"
CONCURRENCIES = (1, 8)
TINY_NAME = "half_plus_two"
DEMO_NAME = "demo"
MODEL_ROWS = {"tiny": (1,), "demo": (1, 16)}
TF_CORE = 0  # the TF floor and runtime children: pinned like sgserve's worker 0
ECHO_CORE = 1  # the minimal echo worker

TARGETS = {  # issue 8
    "broker_us_8": 50.0, "broker_us_1": 120.0, "worker_us_tiny_1": 150.0, "client_us": 60.0,
    "p50_over_echo": 1.5, "qps_over_baseline": 2.5,
}


# ------------------------------------------------------------------------------------ CPU clocks
def proc_cpu_ns(pid: int) -> int | None:
    """CPU time of a whole process (every thread, dead ones included), in ns, read through its
    process CPU clock (clock_getcpuclockid(pid) = (~pid << 3) | CPUCLOCK_SCHED); psutil's
    tick-resolution times if the clock cannot be read."""
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2)
    except OSError:
        pass
    try:
        import psutil  # noqa: PLC0415
        t = psutil.Process(pid).cpu_times()
        return int((t.user + t.system) * 1e9)
    except Exception:  # noqa: BLE001 - gone
        return None


def cpu_snapshot(pids: dict[str, int]) -> dict[str, int | None]:
    return {k: proc_cpu_ns(p) for k, p in pids.items()}


def cpu_delta_us(a: dict[str, int | None], b: dict[str, int | None]) -> dict[str, float | None]:
    return {k: (None if a.get(k) is None or b.get(k) is None else (b[k] - a[k]) / 1e3) for k in a}


# ------------------------------------------------------------------------------ the load (child)
def model_inputs(kind: str, rows: int):
    import numpy as np  # noqa: PLC0415

    if kind == "tiny":
        return {"x": np.full(rows, 3.0, dtype=np.float32)}
    ids = np.arange(rows, dtype=np.int64)
    return {"user_id": ids * 7 + 1, "item_id": ids * 13 + 5}


def sgserve_caller_factory(endpoint: str, model: str, kind: str, rows: int) -> tuple[Callable, Callable]:
    from sgserve.client import Client  # noqa: PLC0415

    client = Client(endpoint, timeout=30.0)
    inputs = model_inputs(kind, rows)

    def make():
        def call():
            return client.predict(model, inputs)
        out = call()
        if kind == "tiny" and abs(float(out["y"][0]) - 3.5) > 1e-6:
            raise RuntimeError(f"y(3.0) = {out['y'][0]}, expected 3.5")
        return call
    return make, client.close


def raw_caller_factory(endpoint: str, model: str) -> tuple[Callable, Callable]:
    """The minimal DEALER client: packs the header of a tiny sgserve request per call (fresh id),
    sends MAGIC + header + a 4-byte payload, and unpacks the reply's header to match the id."""
    import msgpack  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import zmq  # noqa: PLC0415

    ctx = zmq.Context()
    socks: list = []
    lock = threading.Lock()
    payload = np.array([3.0], dtype=np.float32).tobytes()
    inputs_meta = [{"name": "x", "dtype": "float32", "shape": [1]}]
    pid = os.getpid()

    def make():
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        with lock:
            socks.append(sock)
        counter = iter(range(1, 1 << 62))
        packb, unpackb = msgpack.packb, msgpack.unpackb
        send, recv, poll = sock.send_multipart, sock.recv_multipart, sock.poll

        def call():
            rid = [pid, next(counter)]
            send([MAGIC, packb({"type": "predict", "model": model, "timeout_ms": 30000.0, "id": rid,
                                "inputs": inputs_meta}), payload], copy=False)
            if not poll(30000):
                raise RuntimeError("no reply in 30 s")
            frames = recv(copy=False)
            if unpackb(frames[1].bytes)["id"] != rid:
                raise RuntimeError("reply with another id")
            return frames
        return call

    def close():
        for s in socks:
            s.close(0)
        ctx.term()
    return make, close


def client_child(a: argparse.Namespace) -> int:
    """Warms up, says READY, waits for "go" on stdin, runs the timed requests, prints RESULT json."""
    if a.kind == "sgserve":
        factory, close = sgserve_caller_factory(a.endpoint, a.model, a.model_kind, a.rows)
    else:
        factory, close = raw_caller_factory(a.endpoint, a.model)
    conc, n = a.concurrency, a.requests
    shares = [n // conc + (1 if i < n % conc else 0) for i in range(conc)]
    warm = max(10, a.warmup // conc)
    lats: list[list[float]] = [[] for _ in range(conc)]
    errors: list[str] = []
    pc = time.perf_counter

    def timed(i: int, call: Callable) -> None:
        out = lats[i]
        app = out.append
        for _ in range(shares[i]):
            t0 = pc()
            call()
            app(pc() - t0)

    try:
        if conc == 1:
            call = factory()
            for _ in range(warm):
                call()
            print("READY", flush=True)
            if sys.stdin.readline().strip() != "go":
                return 1
            c0, t0 = time.process_time_ns(), pc()
            timed(0, call)
            t1, c1 = pc(), time.process_time_ns()
        else:
            ready = threading.Barrier(conc + 1)
            go = threading.Barrier(conc + 1)

            def body(i: int) -> None:
                try:
                    call = factory()
                    for _ in range(warm):
                        call()
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"thread {i} warmup: {exc!r}")
                    ready.abort()
                    return
                try:
                    ready.wait()
                    go.wait()
                    timed(i, call)
                except threading.BrokenBarrierError:
                    pass
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"thread {i}: {exc!r}")

            threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(conc)]
            for t in threads:
                t.start()
            try:
                ready.wait(120)
            except threading.BrokenBarrierError:
                print("RESULT " + json.dumps({"errors": errors or ["warmup failed"]}), flush=True)
                return 1
            print("READY", flush=True)
            if sys.stdin.readline().strip() != "go":
                go.abort()
                return 1
            c0, t0 = time.process_time_ns(), pc()
            go.wait()
            for t in threads:
                t.join()
            t1, c1 = pc(), time.process_time_ns()
        all_lat = [v * 1e6 for lst in lats for v in lst]
        wall = t1 - t0
        res = {"requests": len(all_lat), "wall_s": round(wall, 4), "qps": round(len(all_lat) / wall, 1) if wall else None,
               "client_cpu_us": (c1 - c0) / 1e3, "p50_us": round(C.pct(all_lat, 50), 1),
               "p90_us": round(C.pct(all_lat, 90), 1), "p99_us": round(C.pct(all_lat, 99), 1),
               "mean_us": round(sum(all_lat) / len(all_lat), 1) if all_lat else None, "errors": errors}
        print("RESULT " + json.dumps(res), flush=True)
        return 0 if not errors else 1
    finally:
        close()


# --------------------------------------------------------------------------- TF floor (child)
def tf_child_setup():
    from sgserve.worker import pinning  # noqa: PLC0415

    pinning.pin([TF_CORE])
    os.environ.update(pinning.thread_env(1, 1))
    import tensorflow as tf  # noqa: PLC0415

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def time_block(fn: Callable[[], Any], n: int, warmup: int) -> dict[str, float]:
    """us per call (mean wall, p50 of single calls) and CPU us per call of this whole process."""
    for _ in range(warmup):
        fn()
    pc = time.perf_counter
    lat = []
    app = lat.append
    c0, t0 = time.process_time_ns(), pc()
    for _ in range(n):
        s = pc()
        fn()
        app(pc() - s)
    t1, c1 = pc(), time.process_time_ns()
    lat_us = [v * 1e6 for v in lat]
    return {"calls": n, "us_per_call": round((t1 - t0) * 1e6 / n, 1), "p50_us": round(C.pct(lat_us, 50), 1),
            "p99_us": round(C.pct(lat_us, 99), 1), "cpu_us_per_call": round((c1 - c0) / 1e3 / n, 1)}


def tf_floor_child(a: argparse.Namespace) -> int:
    """For each model and row count: the three TF call paths, result read back as numpy."""
    tf = tf_child_setup()
    import numpy as np  # noqa: PLC0415
    from tensorflow.core.protobuf import config_pb2  # noqa: PLC0415

    spec = json.loads(a.spec)
    out: list[dict[str, Any]] = []
    for item in spec:
        d, kind = item["dir"], item["kind"]
        loaded = tf.saved_model.load(d)
        sig = loaded.signatures["serving_default"]
        n_args = len(sig.inputs) - len(sig.captured_inputs)
        arg_names = [t.name.split(":")[0] for t in sig.inputs[:n_args]]
        g = tf.Graph()
        cfg = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
        with g.as_default():
            sess = tf.compat.v1.Session(graph=g, config=cfg)
            mg = tf.compat.v1.saved_model.loader.load(sess, [tf.saved_model.SERVING], d)
        sdef = mg.signature_def["serving_default"]
        in_names, out_names = sorted(sdef.inputs), sorted(sdef.outputs)
        callable_ = sess.make_callable([sdef.outputs[o].name for o in out_names],
                                       [sdef.inputs[i].name for i in in_names])
        # The same session graph run in the calling thread: a session whose inter-op pool size is
        # negative, and a callable whose run options pick no pool (inter_op_thread_pool = -1), so no
        # hop to a pool thread and back (what sgserve's rewritten runtime does).
        g2 = tf.Graph()
        cfg2 = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=-1)
        with g2.as_default():
            sess2 = tf.compat.v1.Session(graph=g2, config=cfg2)
            mg2 = tf.compat.v1.saved_model.loader.load(sess2, [tf.saved_model.SERVING], d)
        sdef2 = mg2.signature_def["serving_default"]
        copts = config_pb2.CallableOptions(feed=[sdef2.inputs[i].name for i in in_names],
                                           fetch=[sdef2.outputs[o].name for o in out_names])
        copts.run_options.inter_op_thread_pool = -1
        inline_ = sess2._make_callable_from_options(copts)
        for rows in item["rows"]:
            inputs = model_inputs(kind, rows)
            captured = sig.captured_inputs
            feeds = [inputs[i] for i in in_names]

            def signature_call():
                r = sig(**{k: tf.constant(v) for k, v in inputs.items()})
                return {k: v.numpy() for k, v in r.items()}

            def call_flat():
                r = sig._call_flat([tf.constant(inputs[nm]) for nm in arg_names], captured)
                if isinstance(r, dict):
                    return {k: v.numpy() for k, v in r.items()}
                return [t.numpy() for t in tf.nest.flatten(r)]

            def session_call():
                return dict(zip(out_names, callable_(*feeds)))

            def inline_call():
                return dict(zip(out_names, inline_(*feeds)))

            ref = signature_call()
            for label, got in (("Session", session_call()), ("calling-thread Session", inline_call())):
                for k in ref:
                    if not np.allclose(ref[k], got[k], rtol=1e-5, atol=1e-6):
                        raise RuntimeError(f"{kind}: {label} output {k} differs from the signature's")
            methods = {"signature(tf.constant)": signature_call, "_call_flat + .numpy()": call_flat,
                       "TF1 Session.make_callable": session_call,
                       "TF1 Session callable, calling thread": inline_call}
            res = {}
            for name, fn in methods.items():
                res[name] = time_block(fn, a.calls, a.warmup)
                sys.stderr.write(f"  TF floor {kind} rows {rows}: {name}: {res[name]['us_per_call']} us/call, "
                                 f"{res[name]['cpu_us_per_call']} CPU us/call\n")
            best = min(res, key=lambda k: res[k]["cpu_us_per_call"])
            out.append({"model": kind, "rows": rows, "methods": res, "floor_method": best,
                        "floor_cpu_us": res[best]["cpu_us_per_call"], "floor_us": res[best]["us_per_call"]})
        sess.close()
        sess2.close()
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def runtime_child(a: argparse.Namespace) -> int:
    """The sgserve worker's own call path over a live server's segment: ModelRuntime +
    SignatureRunner.run (and run_wire, when the runtime has it), pinned like a worker."""
    tf_child_setup()
    from sgserve import protocol  # noqa: PLC0415
    from sgserve.worker import runtime as rtmod  # noqa: PLC0415

    rt = rtmod.ModelRuntime(a.segment)
    rt.warmup()
    runner = rt.signatures["serving_default"]
    out: dict[str, Any] = {"has_run_wire": hasattr(runner, "run_wire"), "rows": {}}
    for rows in json.loads(a.rows):
        inputs = model_inputs(a.model_kind, rows)
        res = {"SignatureRunner.run": time_block(lambda: runner.run(inputs), a.calls, a.warmup)}
        if out["has_run_wire"]:
            res["SignatureRunner.run_wire"] = time_run_wire(runner, protocol, inputs, a.calls, a.warmup)
        out["rows"][str(rows)] = res
        for k, v in res.items():
            if "error" in v:
                sys.stderr.write(f"  runtime {a.model_kind} rows {rows}: {k}: {v['error']}\n")
            else:
                sys.stderr.write(f"  runtime {a.model_kind} rows {rows}: {k}: {v['us_per_call']} us/call, "
                                 f"{v['cpu_us_per_call']} CPU us/call\n")
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def time_run_wire(runner, protocol, inputs, calls: int, warmup: int) -> dict[str, Any]:
    """run_wire's calling convention was being written while this benchmark was: try the plausible
    ones with the request's wire pieces (header tensor list / header, payload frames)."""
    import inspect  # noqa: PLC0415

    import zmq  # noqa: PLC0415

    frames = protocol.pack({"type": "predict", "model": "m", "id": [1, 1]}, inputs)
    header, payload = protocol.unpack_header(frames)
    zframes = [zmq.Frame(bytes(p)) for p in payload]
    metas = header["inputs"]
    attempts = [("(metas, payload)", lambda: runner.run_wire(metas, payload)),
                ("(metas, zmq frames)", lambda: runner.run_wire(metas, zframes)),
                ("(header, payload)", lambda: runner.run_wire(header, payload)),
                ("(header, zmq frames)", lambda: runner.run_wire(header, zframes))]
    try:
        sig = str(inspect.signature(runner.run_wire))
    except (TypeError, ValueError):
        sig = "?"
    errs = []
    for label, fn in attempts:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            errs.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        r = time_block(fn, calls, warmup)
        r["called_as"] = label
        r["signature"] = sig
        return r
    return {"error": f"run_wire{sig}: no calling convention worked: " + " | ".join(errs)}


# ------------------------------------------------------------------------------- child plumbing
def read_line(proc: subprocess.Popen, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{what}: no answer in {timeout:.0f} s")
        r, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
        if r:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{what}: the child exited (code {proc.wait()})")
            line = line.strip()
            if line in ("READY",) or line.startswith("RESULT "):
                return line
            C.log(f"{what}: {line[:300]}")  # something else on stdout: pass it on
        elif proc.poll() is not None:
            raise RuntimeError(f"{what}: the child exited (code {proc.returncode})")


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=C.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_result_child(args: list[str], timeout: float, what: str) -> Any:
    with C.child_group([sys.executable, SELF] + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                       env=child_env(), cwd=C.REPO) as p:
        line = read_line(p, timeout, what)
        if not line.startswith("RESULT "):
            raise RuntimeError(f"{what}: unexpected output {line[:200]!r}")
        return json.loads(line[7:])


# ------------------------------------------------------------------------------------- windows
class Window:
    """One measured window: a load child, the CPU clocks of the serving processes around it."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts

    def run(self, client_args: list[str], pids: dict[str, int], what: str,
            before: Callable[[], Any] | None = None, after: Callable[[], Any] | None = None) -> dict[str, Any]:
        """Measures the window; again (up to --retries times) while other processes used more than
        --retry-load cores during it, keeping the attempt with the least other load."""
        best: dict[str, Any] | None = None
        loads = []
        for attempt in range(1 + max(0, self.opts.retries)):
            res = self._once(client_args, pids, what, before, after)
            loads.append(res["other_load_cores"])
            if best is None or (res["other_load_cores"] or 0) < (best["other_load_cores"] or 0):
                best = res
            if (res["other_load_cores"] or 0) <= self.opts.retry_load:
                break
            if attempt < self.opts.retries:
                C.log(f"{what}: other processes used {res['other_load_cores']} cores during the window; measuring "
                      f"it again")
        assert best is not None
        best["other_load_attempts"] = loads
        return best

    def _once(self, client_args: list[str], pids: dict[str, int], what: str,
              before: Callable[[], Any] | None, after: Callable[[], Any] | None) -> dict[str, Any]:
        o = self.opts
        with C.child_group([sys.executable, SELF, "_client"] + client_args + ["--requests", str(o.requests),
                                                                           "--warmup", str(o.warmup)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(),
                           cwd=C.REPO) as p:
            line = read_line(p, 300, what)
            if line != "READY":
                raise RuntimeError(f"{what}: load child failed before the timed requests: {line[:500]}")
            if o.quiet_wait > 0:
                C.wait_quiet(o.max_other_load, o.quiet_wait)
            st0 = before() if before else None
            b0, c0 = C.system_busy_seconds(), cpu_snapshot(pids)
            p.stdin.write("go\n")
            p.stdin.flush()
            line = read_line(p, max(300.0, o.requests * 0.05), what)
            c1, b1 = cpu_snapshot(pids), C.system_busy_seconds()
            st1 = after() if after else None
        res = json.loads(line[7:])
        if res.get("errors"):
            raise RuntimeError(f"{what}: the load failed: {res['errors'][:3]}")
        d = cpu_delta_us(c0, c1)
        ours = sum(v for v in d.values() if v is not None) / 1e6 + res["client_cpu_us"] / 1e6
        res["other_load_cores"] = round(max(0.0, (b1 - b0 - ours) / res["wall_s"]), 2) if res["wall_s"] else None
        res["cpu_us"] = d
        res["status_before"], res["status_after"] = st0, st1
        res["client_us"] = round(res["client_cpu_us"] / res["requests"], 1)
        return res


# ------------------------------------------------------------------------------------- servers
class TreeServer(C.Server):
    """_common.Server, but `python -m sgserve.cli start` from another source tree (a worktree):
    PYTHONPATH and cwd are that tree, the interpreter is this venv's."""

    def __init__(self, args: list[str], label: str, root: str) -> None:
        super().__init__(args, label)
        self.root = root

    def start(self, timeout: float = 600.0) -> "TreeServer":
        cmd = [sys.executable, "-m", "sgserve.cli", "start", "--endpoint", self.endpoint] + self.args
        C.log(f"{self.label}: starting from {self.root}: {' '.join(cmd[1:])}")
        env = dict(os.environ, PYTHONPATH=self.root)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env, cwd=self.root)
        self.wait_ready(timeout)
        return self


def source_digest(root: str) -> str:
    """sha1 of the sgserve package's .py files in a tree, as they are now: the code a server
    started now runs (others may be editing the tree while this benchmark runs)."""
    import hashlib  # noqa: PLC0415

    h = hashlib.sha1()
    pkg = os.path.join(root, "sgserve")
    for dirpath, dirnames, files in os.walk(pkg):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:12]


def settle(s: C.Server, timeout: float = 120.0) -> dict[str, Any]:
    """Waits until the loader service (pre-started once the workers are READY) is no longer booting."""
    deadline = time.monotonic() + timeout
    while True:
        st = s.status()
        state = str((st.get("loader") or {}).get("state") or "none").lower()
        if state not in ("starting", "loading") or time.monotonic() > deadline:
            if state in ("starting", "loading"):
                C.log(f"{s.label}: loader still '{state}' after {timeout:.0f} s; measuring anyway")
            return st
        time.sleep(0.5)


def server_pids(s: C.Server, st: dict[str, Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """The processes to read: broker, each worker, the loader, and anything else in the server's tree."""
    pids = {"broker": s.pid}
    info: dict[str, Any] = {"broker_pid": s.pid, "status_server_pid": (st.get("server") or {}).get("pid")}
    for w in st.get("workers", []):
        pids[f"worker{w['index']}"] = int(w["pid"])
    loader = (st.get("loader") or {}).get("pid")
    if loader:
        pids["loader"] = int(loader)
    known = set(pids.values())
    for pid in C.tree_pids(s.pid):
        if pid not in known:
            pids[f"other{pid}"] = pid
    try:
        import psutil  # noqa: PLC0415
        info["processes"] = {k: " ".join(psutil.Process(p).cmdline())[:160] for k, p in pids.items()}
        info["cwd"] = {k: psutil.Process(p).cwd() for k, p in pids.items()}
    except Exception:  # noqa: BLE001
        pass
    return pids, info


def idle_rates(pids: dict[str, int], seconds: float) -> dict[str, float | None]:
    """CPU us per second of each process while nothing is sent: TF pools or loops that spin."""
    a = cpu_snapshot(pids)
    t0 = time.monotonic()
    time.sleep(seconds)
    b = cpu_snapshot(pids)
    dt = time.monotonic() - t0
    return {k: (None if v is None else round(v / dt, 1)) for k, v in cpu_delta_us(a, b).items()}


def sgserve_window(win: Window, s: C.Server, pids: dict[str, int], tree: str, model_kind: str, model: str,
                   rows: int, conc: int) -> dict[str, Any]:
    what = f"{tree} {model_kind} rows {rows} x{conc}"
    res = win.run(["--kind", "sgserve", "--endpoint", s.endpoint, "--model", model, "--model-kind", model_kind,
                   "--rows", str(rows), "--concurrency", str(conc)], pids, what, before=s.status, after=s.status)
    n = res["requests"]
    d = res["cpu_us"]
    w0 = {w["index"]: w for w in res["status_before"]["workers"]}
    w1 = {w["index"]: w for w in res["status_after"]["workers"]}
    workers = []
    wsum = 0.0
    served_total = 0
    for idx in sorted(w1):
        served = w1[idx]["served"] - w0.get(idx, {}).get("served", 0)
        cpu = d.get(f"worker{idx}")
        same = w0.get(idx, {}).get("pid") == w1[idx]["pid"]
        workers.append({"index": idx, "pid": w1[idx]["pid"], "served": served, "cpu_us": cpu, "same_pid": same,
                        "us_per_served": round(cpu / served, 1) if cpu is not None and served else None})
        wsum += cpu or 0.0
        served_total += served
    others = {k: round(v, 1) for k, v in d.items() if k.startswith("other") and v is not None}
    row = {"tree": tree, "model": model_kind, "rows": rows, "clients": conc, "requests": n, "qps": res["qps"],
           "p50_us": res["p50_us"], "p90_us": res["p90_us"], "p99_us": res["p99_us"], "mean_us": res["mean_us"],
           "broker_us": round(d["broker"] / n, 1) if d.get("broker") is not None else None,
           "workers_us": round(wsum / n, 1), "workers": workers, "served_total": served_total,
           "client_us": res["client_us"], "loader_cpu_us": round(d["loader"], 1) if d.get("loader") else d.get("loader"),
           "unattributed_cpu_us": others, "other_load_cores": res["other_load_cores"],
           "other_load_attempts": res["other_load_attempts"], "wall_s": res["wall_s"]}
    if served_total != n:
        row["note"] = f"workers served {served_total} requests in the window, the client sent {n}"
    C.log(f"{what}: {row['qps']:.0f} req/s, p50 {row['p50_us']:.0f} us; CPU us/request: broker "
          f"{row['broker_us']}, workers {row['workers_us']} "
          f"({'/'.join(str(w['us_per_served']) for w in workers)} per served), client {row['client_us']}; "
          f"other load {row['other_load_cores']} cores")
    return row


def run_sgserve(opts, result: dict[str, Any], tiny_base: str,
                baseline_root: str | None, baseline_label: str) -> dict[str, Any]:
    """Per model: this tree's server (and the baseline's), every (rows, clients) window for each,
    alternating the trees; then the worker's own call path over the live segment."""
    win = Window(opts)
    rows_out: list[dict[str, Any]] = []
    servers_info: dict[str, Any] = {}
    runtime: dict[str, Any] = {}
    base_paths: dict[str, str] = {}
    for kind in opts.models:
        common = ["--workers", "2", "--cpus-per-worker", "1"]
        args = common + (["--model-base-path", tiny_base] if kind == "tiny" else [])
        model = TINY_NAME if kind == "tiny" else DEMO_NAME
        with contextlib.ExitStack() as ms:
            trees: list[tuple[str, C.Server]] = []
            digests = {"this tree": source_digest(C.REPO)}
            s = C.Server(args, label=f"this-{kind}")
            ms.callback(s.stop)
            s.start()
            trees.append(("this tree", s))
            if baseline_root:
                digests[baseline_label] = source_digest(baseline_root)
                b = TreeServer(args, label=f"baseline-{kind}", root=baseline_root)
                ms.callback(b.stop)
                b.start()
                trees.append((baseline_label, b))
            pids_of = {}
            for tree, srv in trees:
                st = settle(srv)
                pids, info = server_pids(srv, st)
                pids_of[tree] = pids
                if kind not in base_paths:
                    for m in st.get("model_status", []):
                        if m.get("name") == model and m.get("base_path"):
                            base_paths[kind] = m["base_path"]
                info["idle_cpu_us_per_s"] = idle_rates(pids, opts.idle_s)
                C.log(f"{tree} {kind}: processes {pids}; idle CPU us/s {info['idle_cpu_us_per_s']}")
                info["segment"] = (st.get("models") or [{}])[0].get("segment")
                info["source_digest"] = digests[tree]
                servers_info[f"{tree} / {kind}"] = info
            k = 0
            for rows in MODEL_ROWS[kind]:
                for conc in CONCURRENCIES:
                    # The trees take turns going first, so neither always follows the other's load.
                    for tree, srv in (trees if k % 2 == 0 else trees[::-1]):
                        rows_out.append(sgserve_window(win, srv, pids_of[tree], tree, kind, model, rows, conc))
                    k += 1
            # The worker's call path over this tree's live segment (the server is idle now).
            seg = servers_info[f"this tree / {kind}"]["segment"]
            if seg and not opts.no_floors:
                C.log(f"worker call path ({kind}): ModelRuntime over {seg}, pinned to core {TF_CORE}")
                try:
                    runtime[kind] = run_result_child(
                        ["_runtime", "--segment", seg, "--model-kind", kind, "--rows", json.dumps(MODEL_ROWS[kind]),
                         "--calls", str(opts.requests), "--warmup", str(opts.warmup)], 600, f"runtime {kind}")
                except Exception as exc:  # noqa: BLE001 - the runtime is being rewritten: report, go on
                    C.log(f"runtime {kind}: FAILED: {exc}")
                    runtime[kind] = {"error": str(exc)[:2000]}
            for tree, srv in trees:
                servers_info[f"{tree} / {kind}"]["final_workers"] = srv.status()["workers"]
        for tree, srv in trees:
            servers_info[f"{tree} / {kind}"].update(warnings=srv.problems, leftover_segments=srv.leftovers)
    result["servers"] = servers_info
    result["worker_runtime"] = runtime
    return {"rows": rows_out, "base_paths": base_paths}


# --------------------------------------------------------------------------------------- floors
def wait_echo(endpoint: str, timeout: float = 30.0) -> None:
    import zmq  # noqa: PLC0415

    ctx = zmq.Context()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            s.send_multipart([MAGIC, b"\x80", b"ping"])
            ok = s.poll(500)
            s.close(0)
            if ok:
                return
        raise RuntimeError(f"echo broker at {endpoint} did not answer in {timeout:.0f} s")
    finally:
        ctx.term()


def run_floor(opts, kind: str) -> list[dict[str, Any]]:
    """kind "router" (minimal Python forwarder) or "proxy" (libzmq's zmq.proxy): both concurrencies."""
    label = {"router": "minimal echo", "proxy": "C proxy"}[kind]
    tmp = tempfile.mkdtemp(prefix="sgserve-bench-floor-")
    ep = f"tcp://127.0.0.1:{C.free_port()}"
    backend = f"ipc://{tmp}/backend"
    out = []
    try:
        with contextlib.ExitStack() as st:
            C.log(f"{label}: broker on {ep}, echo worker pinned to core {ECHO_CORE}")
            br = st.enter_context(C.child_group([sys.executable, ECHO, kind, "--frontend", ep, "--backend", backend]))
            time.sleep(0.2)
            wargs = [sys.executable, ECHO, "worker", "--backend", backend, "--core", str(ECHO_CORE)]
            wk = st.enter_context(C.child_group(wargs + (["--ready"] if kind == "router" else [])))
            wait_echo(ep)
            pids = {"broker": br.pid, "worker": wk.pid}
            idle = idle_rates(pids, opts.idle_s)
            win = Window(opts)
            for conc in CONCURRENCIES:
                what = f"{label} x{conc}"
                res = win.run(["--kind", "raw", "--endpoint", ep, "--model", TINY_NAME, "--concurrency", str(conc)],
                              pids, what)
                n = res["requests"]
                d = res["cpu_us"]
                row = {"tree": label, "model": "echo", "rows": 1, "clients": conc, "requests": n, "qps": res["qps"],
                       "p50_us": res["p50_us"], "p90_us": res["p90_us"], "p99_us": res["p99_us"],
                       "mean_us": res["mean_us"], "broker_us": round(d["broker"] / n, 1),
                       "workers_us": round(d["worker"] / n, 1),
                       "workers": [{"index": 0, "pid": wk.pid, "served": n, "cpu_us": d["worker"],
                                    "us_per_served": round(d["worker"] / n, 1)}],
                       "client_us": res["client_us"], "other_load_cores": res["other_load_cores"],
                       "other_load_attempts": res["other_load_attempts"], "wall_s": res["wall_s"],
                       "idle_cpu_us_per_s": idle}
                C.log(f"{what}: {row['qps']:.0f} req/s, p50 {row['p50_us']:.0f} us; CPU us/request: broker "
                      f"{row['broker_us']}, worker {row['workers_us']}, client {row['client_us']}; other load "
                      f"{row['other_load_cores']} cores")
                out.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_tf_floor(opts, base_paths: dict[str, str]) -> list[dict[str, Any]]:
    spec = []
    for kind in opts.models:
        base = base_paths.get(kind)
        if not base:
            C.log(f"TF floor: no base path known for {kind}; skipped")
            continue
        versions = sorted((int(v) for v in os.listdir(base) if v.isdigit()), reverse=True)
        spec.append({"kind": kind, "dir": os.path.join(base, str(versions[0])), "rows": list(MODEL_ROWS[kind])})
    if not spec:
        return []
    C.log(f"TF floor: one child pinned to core {TF_CORE}, 1 intra + 1 inter thread, {opts.requests} calls per path")
    return run_result_child(["_tf_floor", "--spec", json.dumps(spec), "--calls", str(opts.requests),
                             "--warmup", str(opts.warmup)], 900, "TF floor")


# ------------------------------------------------------------------------------------- baseline
@contextlib.contextmanager
def baseline_tree(ref: str):
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=C.REPO, check=True,
                         stdout=subprocess.PIPE, text=True).stdout.strip()
    path = tempfile.mkdtemp(prefix="sgserve-baseline-")
    os.rmdir(path)
    C.log(f"baseline: git worktree add --detach {path} {ref} ({sha[:12]})")
    subprocess.run(["git", "worktree", "add", "--detach", path, sha], cwd=C.REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield path, sha
    finally:
        r = subprocess.run(["git", "worktree", "remove", "--force", path], cwd=C.REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            C.log(f"baseline: git worktree remove failed ({r.stderr.strip()}); removing the directory and pruning")
            shutil.rmtree(path, ignore_errors=True)
            subprocess.run(["git", "worktree", "prune"], cwd=C.REPO, check=False)
        else:
            C.log(f"baseline: removed worktree {path}")


# --------------------------------------------------------------------------------------- report
def verdict(value: float | None, target: float, higher_is_better: bool = False) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "MISSED"


def find(items: list[dict[str, Any]], **kw) -> dict[str, Any] | None:
    for r in items:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def build_report(result: dict[str, Any], baseline_label: str | None) -> tuple[list[str], dict[str, Any]]:
    sg, floors = result["sgserve"], result.get("floors", [])
    tf_floor = {(f["model"], f["rows"]): f for f in result.get("tf_floor", [])}
    lines: list[str] = []
    rep: dict[str, Any] = {"targets": []}

    def target(name: str, value, goal: float, unit: str, higher: bool = False, note: str = "") -> None:
        v = verdict(value, goal, higher)
        rep["targets"].append({"target": name, "value": value, "goal": goal, "unit": unit, "verdict": v, "note": note})
        cmp = ">=" if higher else "<="
        lines.append(f"TARGET {name}: {value if value is not None else 'n/a'} {unit} (target {cmp} {goal:g}) "
                     f"-> {v}{(' (' + note + ')') if note else ''}")

    for conc in CONCURRENCIES:
        echo = find(floors, tree="minimal echo", clients=conc)
        proxy = find(floors, tree="C proxy", clients=conc)
        for kind in ("tiny", "demo"):
            r = find(sg, tree="this tree", model=kind, rows=1, clients=conc)
            if not r:
                continue
            b = r["broker_us"]
            parts = [f"broker CPU/request ({kind}, {conc} client{'s' if conc > 1 else ''}): {b} us"]
            if echo:
                parts.append(f"minimal forwarder {echo['broker_us']} us ({ratio(b, echo['broker_us'])}x)")
            if proxy:
                parts.append(f"C proxy {proxy['broker_us']} us ({ratio(b, proxy['broker_us'])}x)")
            idle = (result["servers"].get(f"this tree / {kind}") or {}).get("idle_cpu_us_per_s", {}).get("broker")
            if idle is not None and r.get("wall_s"):
                parts.append(f"of which the idle loop's background ~{idle * r['wall_s'] / r['requests']:.1f} us")
            parts.append(f"projected broker ceiling 1 s / {b} us = {1e6 / b:,.0f} req/s" if b else "")
            lines.append("; ".join(p for p in parts if p))
            rep[f"broker_{kind}_{conc}"] = {"us": b, "minimal_forwarder_us": echo and echo["broker_us"],
                                           "c_proxy_us": proxy and proxy["broker_us"],
                                           "ceiling_req_s": round(1e6 / b) if b else None}
    for kind in ("tiny", "demo"):
        for rows in MODEL_ROWS[kind]:
            for conc in CONCURRENCIES:
                r = find(sg, tree="this tree", model=kind, rows=rows, clients=conc)
                f = tf_floor.get((kind, rows))
                if not r:
                    continue
                per_served = [w["us_per_served"] for w in r["workers"]]
                echo_w = find(floors, tree="minimal echo", clients=conc)
                msg = (f"worker CPU/request ({kind}, {rows} row{'s' if rows > 1 else ''}, {conc} client"
                       f"{'s' if conc > 1 else ''}): {r['workers_us']} us (per served: {per_served})")
                if f:
                    msg += (f"; TF floor {f['floor_cpu_us']} us ({f['floor_method']}); worker - TF floor = "
                            f"{round(r['workers_us'] - f['floor_cpu_us'], 1)} us")
                    if echo_w:
                        msg += (f"; minus the echo worker too ({echo_w['workers_us']} us): "
                                f"{round(r['workers_us'] - f['floor_cpu_us'] - echo_w['workers_us'], 1)} us")
                rt = ((result.get("worker_runtime") or {}).get(kind) or {}).get("rows", {}).get(str(rows), {})
                calls = [f"{m} {v['cpu_us_per_call']} us" for m, v in rt.items() if "cpu_us_per_call" in v]
                if calls:
                    msg += "; the worker's own TF call alone (pinned child): " + ", ".join(calls)
                lines.append(msg)
                rep[f"worker_{kind}_{rows}_{conc}"] = {"us": r["workers_us"], "tf_floor_us": f and f["floor_cpu_us"],
                                                        "minus_tf_floor_us": f and round(r["workers_us"] - f["floor_cpu_us"], 1)}
    for conc in CONCURRENCIES:
        r = find(sg, tree="this tree", model="tiny", rows=1, clients=conc)
        echo = find(floors, tree="minimal echo", clients=conc)
        if r and echo:
            lines.append(f"client CPU/request (tiny, {conc} client{'s' if conc > 1 else ''}): {r['client_us']} us; "
                         f"minimal DEALER client {echo['client_us']} us ({ratio(r['client_us'], echo['client_us'])}x)")
            lines.append(f"round trip p50 (tiny, {conc} client{'s' if conc > 1 else ''}): sgserve {r['p50_us']} us, "
                         f"minimal echo {echo['p50_us']} us: {ratio(r['p50_us'], echo['p50_us'])}x")
    if baseline_label:
        for kind in ("tiny", "demo"):
            for rows in MODEL_ROWS[kind]:
                for conc in CONCURRENCIES:
                    r = find(sg, tree="this tree", model=kind, rows=rows, clients=conc)
                    b = find(sg, tree=baseline_label, model=kind, rows=rows, clients=conc)
                    if r and b:
                        lines.append(f"QPS this tree / {baseline_label} ({kind}, {rows} row{'s' if rows > 1 else ''}, "
                                     f"{conc} client{'s' if conc > 1 else ''}): {r['qps']:.0f} / {b['qps']:.0f} = "
                                     f"{ratio(r['qps'], b['qps'])}x")
    # The targets.
    r8 = find(sg, tree="this tree", model="tiny", rows=1, clients=8)
    r1 = find(sg, tree="this tree", model="tiny", rows=1, clients=1)
    if r8:
        target("broker CPU/request, tiny, 8 clients", r8["broker_us"], TARGETS["broker_us_8"], "us")
    if r1:
        target("broker CPU/request, tiny, 1 client", r1["broker_us"], TARGETS["broker_us_1"], "us")
        target("worker CPU/request served, tiny, 1 client", r1["workers_us"], TARGETS["worker_us_tiny_1"], "us")
        target("client CPU/request, tiny, 1 client", r1["client_us"], TARGETS["client_us"], "us")
    if r8:
        target("client CPU/request, tiny, 8 clients", r8["client_us"], TARGETS["client_us"], "us")
    echo1 = find(floors, tree="minimal echo", clients=1)
    if r1 and echo1:
        target("round trip p50 / minimal echo p50, tiny, 1 client", ratio(r1["p50_us"], echo1["p50_us"]),
               TARGETS["p50_over_echo"], "x")
    if baseline_label and r8:
        b8 = find(sg, tree=baseline_label, model="tiny", rows=1, clients=8)
        if b8:
            target(f"closed-loop QPS / {baseline_label}, tiny, 8 clients", ratio(r8["qps"], b8["qps"]),
                   TARGETS["qps_over_baseline"], "x", higher=True)
    return lines, rep


def ordered(rows: list[dict[str, Any]], by_clients: bool = False) -> list[dict[str, Any]]:
    """Model, rows (clients), then this tree, the baseline, the minimal echo, the C proxy."""
    model_order = {"tiny": 0, "demo": 1, "echo": 2}
    tree_order = {"this tree": 0, "minimal echo": 2, "C proxy": 3}
    return sorted(rows, key=lambda r: (model_order.get(r["model"], 9), r["rows"], r["clients"] if by_clients else 0,
                                       tree_order.get(r["tree"], 1), r["tree"]))


def main_table(result: dict[str, Any]) -> str:
    rows = []
    for r in ordered(result["sgserve"] + result.get("floors", []), by_clients=True):
        per = "/".join("-" if w.get("us_per_served") is None else f"{w['us_per_served']:.0f}" for w in r["workers"])
        rows.append([r["tree"], r["model"], r["rows"], r["clients"], f"{r['qps']:.0f}", f"{r['p50_us']:.0f}",
                     f"{r['p99_us']:.0f}", r["broker_us"], r["workers_us"], per, r["client_us"],
                     f"{(r['broker_us'] or 0) + r['workers_us'] + r['client_us']:.0f}", r["other_load_cores"]])
    return C.table(["run", "model", "rows", "clients", "req/s", "p50 us", "p99 us", "broker us/req",
                    "workers us/req", "per worker us/served", "client us/req", "total us/req", "other load"], rows)


def tf_table(result: dict[str, Any]) -> str:
    rows = []
    for f in result.get("tf_floor", []):
        for m, v in f["methods"].items():
            rows.append([f["model"], f["rows"], m + (" (floor)" if m == f["floor_method"] else ""), v["us_per_call"],
                         v["p50_us"], v["cpu_us_per_call"]])
    for kind, rt in (result.get("worker_runtime") or {}).items():
        if "error" in rt:
            rows.append([kind, "", "sgserve ModelRuntime: FAILED", "", "", rt["error"][:80]])
            continue
        for rows_n, res in rt["rows"].items():
            for m, v in res.items():
                if "error" in v:
                    rows.append([kind, rows_n, f"sgserve {m}", "", "", "error: " + v["error"][:80]])
                else:
                    rows.append([kind, rows_n, f"sgserve {m}", v["us_per_call"], v["p50_us"], v["cpu_us_per_call"]])
    return C.table(["model", "rows", "call path (pinned, 1+1 threads)", "us/call", "p50 us", "CPU us/call"], rows)


def plot(result: dict[str, Any], name: str) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    import numpy as np  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    procs = ("broker", "workers", "client")
    tf_tiny = next((f for f in result.get("tf_floor", []) if f["model"] == "tiny" and f["rows"] == 1), None)
    def label_of(r: dict[str, Any]) -> str:
        if r["model"] == "echo":
            return f"{r['tree']} (floor)"
        return f"{r['tree']}: {r['model']}, {r['rows']} row{'s' if r['rows'] > 1 else ''}"

    # One order and one colour per series in both panels: model, rows, this tree before the baseline.
    every = ordered(result["sgserve"] + result.get("floors", []))
    keys = list(dict.fromkeys(label_of(r) for r in every))
    cmap = plt.get_cmap("tab10")
    for ax, conc in zip(axes, CONCURRENCIES):
        series = [(label_of(r), r) for r in every if r["clients"] == conc]
        if not series:
            continue
        width = 0.8 / len(series)
        x = np.arange(len(procs))
        for i, (label, r) in enumerate(series):
            vals = [r["broker_us"] or 0, r["workers_us"], r["client_us"]]
            bars = ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=label, color=cmap(keys.index(label) % 10),
                          hatch="//" if "floor" in label else None, edgecolor="white" if "floor" not in label else "k")
            for bar, v in zip(bars, vals):
                ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=6)
        if tf_tiny:
            echo = next((r for r in result.get("floors", []) if r["tree"] == "minimal echo" and r["clients"] == conc), None)
            floor_w = tf_tiny["floor_cpu_us"] + (echo["workers_us"] if echo else 0)
            ax.hlines(floor_w, 1 - 0.4, 1 + 0.4, colors="k", linestyles="--")
            ax.text(1 + 0.4, floor_w, f" echo worker + TF floor\n (tiny) {floor_w:.0f} us", fontsize=7, va="center")
        ax.set_xticks(x)
        ax.set_xticklabels(procs)
        ax.set_title(f"CPU per request, {conc} client{'s' if conc > 1 else ''}")
        ax.set_ylabel("CPU us per request")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    C.save_figure(fig, name, "bench_request_cost", result["machine"])


# ----------------------------------------------------------------------------------------- main
def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=None, help="requests per window (default 3000; 300 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed requests before each window (default 200)")
    ap.add_argument("--models", default="tiny,demo", help="comma list of: tiny, demo (default both)")
    ap.add_argument("--baseline", metavar="REF", default=None,
                    help="also measure servers started from a git worktree of REF, side by side")
    ap.add_argument("--quick", action="store_true", help="smoke run: few requests, short waits")
    ap.add_argument("--no-floors", action="store_true", help="skip the minimal echo, C proxy and TF floors")
    ap.add_argument("--name", default=None, help="results file stem (default bench_request_cost[_quick])")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="before each window, wait up to this many s for other work to calm down (default 10; 3 quick)")
    ap.add_argument("--max-other-load", type=float, default=0.3, help="'calm' = other processes use <= this many cores")
    ap.add_argument("--retries", type=int, default=None,
                    help="re-measure a window this many times at most while other load exceeded --retry-load "
                         "(default 2; 0 with --quick)")
    ap.add_argument("--retry-load", type=float, default=0.5, help="other load (cores) that makes a window noisy")
    ap.add_argument("--idle-s", type=float, default=None, help="seconds of idle CPU sampling per server (default 2)")
    a = ap.parse_args(argv)
    a.requests = a.requests or (300 if a.quick else 3000)
    a.warmup = a.warmup if a.warmup is not None else (50 if a.quick else 200)
    a.quiet_wait = a.quiet_wait if a.quiet_wait is not None else (3.0 if a.quick else 10.0)
    a.retries = a.retries if a.retries is not None else (0 if a.quick else 2)
    a.idle_s = a.idle_s if a.idle_s is not None else (0.5 if a.quick else 2.0)
    a.name = a.name or ("bench_request_cost_quick" if a.quick else "bench_request_cost")
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in a.models if m not in MODEL_ROWS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {sorted(MODEL_ROWS)}")
    return a


def child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["_client", "_tf_floor", "_runtime"])
    ap.add_argument("--kind", choices=["sgserve", "raw"])
    ap.add_argument("--endpoint")
    ap.add_argument("--model")
    ap.add_argument("--model-kind", default="tiny")
    ap.add_argument("--rows", default="1")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--spec")
    ap.add_argument("--segment")
    ap.add_argument("--calls", type=int, default=3000)
    a = ap.parse_args(argv)
    if a.role == "_client":
        a.rows = int(a.rows)
        return client_child(a)
    if a.role == "_tf_floor":
        return tf_floor_child(a)
    return runtime_child(a)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("_client", "_tf_floor", "_runtime"):
        return child_main(sys.argv[1:])
    opts = parse(sys.argv[1:])
    C.sigterm_as_exit()
    import _models  # noqa: PLC0415

    t_start = time.monotonic()
    result: dict[str, Any] = {
        "benchmark": "bench_request_cost", "machine": C.machine_info(),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "params": {"requests": opts.requests, "warmup": opts.warmup, "models": opts.models,
                   "concurrencies": list(CONCURRENCIES), "workers": 2, "cpus_per_worker": 1,
                   "baseline": opts.baseline, "floors": not opts.no_floors,
                   "cpu_clock": "process CPU clock of each pid (all threads, ns), read before/after each window",
                   "tf_core": TF_CORE, "echo_worker_core": ECHO_CORE},
    }
    tiny_base = _models.ensure("half_plus_two")[0] if "tiny" in opts.models else ""
    with contextlib.ExitStack() as stack:
        baseline_root, baseline_label = None, None
        if opts.baseline:
            baseline_root, sha = stack.enter_context(baseline_tree(opts.baseline))
            baseline_label = f"baseline {opts.baseline}"
            result["baseline"] = {"ref": opts.baseline, "commit": sha}
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=C.REPO, stdout=subprocess.PIPE, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=C.REPO,
                               stdout=subprocess.PIPE, text=True).stdout.splitlines()
        result["this_tree"] = {"head": head, "modified_files": [d[3:] for d in dirty]}
        out = run_sgserve(opts, result, tiny_base, baseline_root, baseline_label)
        result["sgserve"] = out["rows"]
    if not opts.no_floors:
        result["floors"] = run_floor(opts, "router") + run_floor(opts, "proxy")
        result["tf_floor"] = run_tf_floor(opts, out["base_paths"])
    seen = {k: v.get("source_digest") for k, v in result["servers"].items() if k.startswith("this tree")}
    seen["at the end of the run"] = result["this_tree"]["source_digest_at_end"] = source_digest(C.REPO)
    if len(set(seen.values())) > 1:
        result["tree_changed_during_run"] = seen
        C.log(f"WARNING: this tree's sgserve sources changed during the run (digest per server: {seen}); "
              "its models were measured against different code")
    lines, rep = build_report(result, baseline_label)
    result["report"] = rep
    result["report_lines"] = lines
    result["seconds"] = round(time.monotonic() - t_start, 1)
    C.write_json(opts.name, result)
    print(f"\nCPU microseconds per request of each process ({opts.requests} requests per window; workers: "
          "sum over workers / requests; per worker: CPU / requests it served)")
    print(main_table(result))
    if result.get("tf_floor") or result.get("worker_runtime"):
        print("\nTensorFlow floor and the worker's own call path (one process pinned to one core, 1 intra + 1 inter "
              "thread; CPU of the whole process)")
        print(tf_table(result))
    print()
    for line in lines:
        print(line)
    if result.get("tree_changed_during_run"):
        print(f"WARNING: this tree's sgserve sources changed during the run: {result['tree_changed_during_run']}")
    for key, info in result["servers"].items():
        idle = info.get("idle_cpu_us_per_s") or {}
        print(f"idle CPU, nothing sent ({key}): " + ", ".join(f"{k} {v} us/s" for k, v in idle.items()))
    for key, info in result["servers"].items():
        if info.get("warnings"):
            print(f"NOTE {key}: the server logged {len(info['warnings'])} warning(s), e.g. {info['warnings'][0][:200]}")
    plot(result, opts.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
