#!/usr/bin/env python
"""Issue 10's front-door targets, measured in one run: what the gRPC and REST gateway costs next to
the native ZeroMQ path, and whether the native path is unchanged with the front doors on.

Two servers run side by side through the real CLI, each `--workers 2 --cpus-per-worker 1` with the
same ModelServerConfig (half_plus_two, "tiny", and bench/peers/models.py's Keras wide & deep):
  doors   `sgserve start --model_config_file F --port=P --rest_api_port=R ...` (TF Serving's flags)
  plain   the same without --port / --rest_api_port (no gateway process)
Each window is one load child (`bench_front_doors.py _client ...`) that warms up, waits for "go",
then sends for --seconds with C clients (threads, one session each) through the same stock clients
`sgserve bench` uses: sgserve.Client (tcp://), TF Serving's PredictionServiceStub (grpc://, one
channel per client) and http.client keep-alive JSON (http://). Around the timed part the benchmark
reads the CPU clock of every process (client child, gateway(s), broker, each worker) and the
workers' served counts, so each window gives p50/p90/p99, QPS and CPU us per request per process.

Windows (a "case" is model x clients): for each repeat, for each case, every door in turn, the order
rotated each repeat (A B C, B C A, C A B, ...):
  tiny x1 and x8     doors/native, doors/grpc, doors/rest, plain/native
  widedeep x1, x8    doors/native, doors/grpc, doors/rest (--widedeep-batch rows, default 16)
Reported: per (case, door) the median over repeats; paired ratios per repeat (gRPC p50 / native p50
in the same repeat; doors-native / plain-native) and their medians; other load on the machine per
window (bench/_common.py system_busy_seconds) and each process's idle CPU before measuring.

Targets (issue 10): gRPC Predict p50 <= 1.3x native p50 (tiny, batch 1, one client); native p50 and
8-client QPS with the doors on within noise of the plain server's. The REST QPS target (>= 3x
gunicorn + Flask on wide & deep) is bench_peers.py's:
    python bench/bench_peers.py --models widedeep --systems sgserve_rest,gunicorn_flask,sgserve -c 8

--echo adds the floors: a bare grpcio server (grpc.aio, and the sync server with 8 threads) whose
Predict answers a fixed PredictResponse without forwarding, driven by the same stub and windows.
--profile S records the gateway with py-spy for S seconds under gRPC and then REST load (one
client, tiny) and splits its samples by where they are (grpcio, asyncio, zmq, aiohttp, protobuf,
sgserve's own code, ...): bench/results/<name>_profile_<door>.txt holds the folded stacks.

    python bench/bench_front_doors.py                 # 3 repeats, 3 s windows (about 6 min)
    python bench/bench_front_doors.py --quick         # 3 repeats, 1 s windows, tiny only
    python bench/bench_front_doors.py --echo --profile 20
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
import _common as C  # noqa: E402
import bench_request_cost as RC  # noqa: E402  (CPU clocks, child plumbing)

SELF = os.path.abspath(__file__)
MODEL_NAMES = {"tiny": "half_plus_two", "widedeep": "widedeep"}
TARGET_GRPC_OVER_NATIVE = 1.3
TINY_INPUTS = {"x": ("float32", [1])}  # the floor servers have no metadata


# ------------------------------------------------------------------------------ the load (child)
def client_child(a: argparse.Namespace) -> int:
    """Warms up, says READY, waits for "go", sends for a.seconds, prints RESULT json."""
    import numpy as np  # noqa: PLC0415

    from sgserve.bench.config import BenchConfig  # noqa: PLC0415
    from sgserve.bench.targets import open_endpoint, synth_inputs  # noqa: PLC0415

    ep = open_endpoint(a.endpoint, BenchConfig(endpoint=a.endpoint, model=a.model, timeout=30.0))
    if a.fixed_tiny:
        inputs = {k: np.full(shape, 3.0, dtype=dt) for k, (dt, shape) in TINY_INPUTS.items()}
    else:
        inputs = synth_inputs(ep.signature(), a.rows, np.random.default_rng(0))
    sessions = [ep.session() for _ in range(a.concurrency)]
    reqs = [s.prepare(inputs) for s in sessions]
    for s, r in zip(sessions, reqs):
        for _ in range(a.warmup):
            code, _w = s.send(r)
            if code != "200":
                print("RESULT " + json.dumps({"errors": [f"warmup answered {code}"]}), flush=True)
                return 1
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    lats: list[list[float]] = [[] for _ in sessions]
    codes: list[Counter] = [Counter() for _ in sessions]
    pc = time.perf_counter
    start = threading.Barrier(len(sessions) + 1)

    def loop(i: int) -> None:
        send, req, out, cnt = sessions[i].send, reqs[i], lats[i], codes[i]
        start.wait()
        end = pc() + a.seconds
        while True:
            t0 = pc()
            if t0 >= end:
                return
            code, _w = send(req)
            out.append(pc() - t0)
            cnt[code] += 1

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(len(sessions))]
    for t in threads:
        t.start()
    c0, t0 = time.process_time_ns(), pc()
    start.wait()
    for t in threads:
        t.join()
    t1, c1 = pc(), time.process_time_ns()
    all_lat = sorted(v * 1e6 for lst in lats for v in lst)
    total = sum(codes, Counter())
    n = len(all_lat)
    res = {"requests": n, "ok": total.get("200", 0), "codes": dict(total), "wall_s": round(t1 - t0, 4),
           "qps": round(total.get("200", 0) / (t1 - t0), 1), "client_cpu_us": (c1 - c0) / 1e3,
           "p50_us": round(C.pct(all_lat, 50), 1), "p90_us": round(C.pct(all_lat, 90), 1),
           "p99_us": round(C.pct(all_lat, 99), 1), "errors": [] if total.get("200", 0) == n else [dict(total)]}
    for s in sessions:
        s.close()
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# ------------------------------------------------------------------------ the gRPC floor (child)
def echo_child(a: argparse.Namespace) -> int:
    """A bare grpcio PredictionService whose Predict answers a fixed reply (y = 3.5): grpcio's and
    protobuf's own cost per call, with nothing forwarded. --mode aio (grpc.aio, as the gateway) or
    sync (grpc.server with 8 threads)."""
    import asyncio  # noqa: PLC0415
    from concurrent import futures  # noqa: PLC0415

    import grpc  # noqa: PLC0415

    from sgserve.frontdoor import protos  # noqa: PLC0415

    protos.load()
    import numpy as np  # noqa: PLC0415
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: PLC0415

    from sgserve.frontdoor.tensors import from_numpy  # noqa: PLC0415

    reply = predict_pb2.PredictResponse()
    reply.outputs["y"].CopyFrom(from_numpy(np.array([3.5], dtype=np.float32)))
    reply.model_spec.name = "half_plus_two"

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802, ANN001, ANN201 - grpc's names
            return reply

    class AioServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        async def Predict(self, request, context):  # noqa: N802, ANN001, ANN201
            return reply

    address = f"127.0.0.1:{a.port}"
    if a.mode == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
        server.add_insecure_port(address)
        server.start()
        print("READY", flush=True)
        server.wait_for_termination()
        return 0

    async def serve() -> None:
        server = grpc.aio.server()
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(AioServicer(), server)
        server.add_insecure_port(address)
        await server.start()
        print("READY", flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())
    return 0


# ------------------------------------------------------------------------------------- windows
def window(opts, endpoint: str, model: str, rows: int, clients: int, pids: dict[str, int],
           status: Callable[[], dict] | None, what: str, fixed_tiny: bool = False) -> dict[str, Any]:
    """One timed window: a load child, the CPU clocks of the serving processes around it."""
    args = ["_client", "--endpoint", endpoint, "--model", model, "--rows", str(rows), "--concurrency",
            str(clients), "--seconds", str(opts.seconds), "--warmup", str(opts.warmup_requests)]
    with C.child_group([sys.executable, SELF] + args + (["--fixed-tiny"] if fixed_tiny else []),
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=RC.child_env(),
                       cwd=C.REPO) as p:
        line = RC.read_line(p, 300, what)
        if line != "READY":
            raise RuntimeError(f"{what}: load child failed before the timed part: {line[:500]}")
        if opts.quiet_wait > 0:
            C.wait_quiet(opts.max_other_load, opts.quiet_wait)
        st0 = status() if status else None
        b0, c0 = C.system_busy_seconds(), RC.cpu_snapshot(pids)
        p.stdin.write("go\n")
        p.stdin.flush()
        line = RC.read_line(p, opts.seconds + 120, what)
        c1, b1 = RC.cpu_snapshot(pids), C.system_busy_seconds()
        st1 = status() if status else None
    res = json.loads(line[7:])
    if res.get("errors") or not res.get("ok"):
        raise RuntimeError(f"{what}: the load failed: {res.get('errors')}")
    n = res["ok"]
    d = RC.cpu_delta_us(c0, c1)
    ours = sum(v for v in d.values() if v is not None) + res["client_cpu_us"]
    cpu = {"client": res["client_cpu_us"] / n}
    for key in ("broker", "gateway", "workers", "server"):
        vals = [v for k, v in d.items() if k.startswith(key) and v is not None]
        if vals:
            cpu[key] = sum(vals) / n
    cpu = {k: round(v, 1) for k, v in cpu.items()}
    cpu["total"] = round(sum(cpu.values()), 1)
    row = {"what": what, "qps": res["qps"], "p50_us": res["p50_us"], "p90_us": res["p90_us"],
           "p99_us": res["p99_us"], "requests": n, "cpu_us_per_request": cpu,
           "other_load_cores": round(max(0.0, (b1 - b0 - ours / 1e6) / res["wall_s"]), 2)}
    if st0 and st1:
        served = sum(w["served"] for w in st1["workers"]) - sum(w["served"] for w in st0["workers"])
        row["served"] = served
        if st0.get("gateways") != st1.get("gateways"):
            row["note"] = f"gateway pids changed: {st0.get('gateways')} -> {st1.get('gateways')}"
    C.log(f"{what}: {row['qps']:.0f} req/s, p50 {row['p50_us']:.0f} us, p99 {row['p99_us']:.0f} us; CPU us/req "
          + ", ".join(f"{k} {v}" for k, v in cpu.items()) + f"; other load {row['other_load_cores']} cores")
    return row


# ------------------------------------------------------------------------------------- servers
def config_file(tmp: str, bases: dict[str, str]) -> str:
    path = os.path.join(tmp, "models.config")
    with open(path, "w") as f:
        f.write("model_config_list {\n" + "".join(
            f"  config {{ name: '{MODEL_NAMES[k]}' base_path: '{b}' model_platform: 'tensorflow' }}\n"
            for k, b in bases.items()) + "}\n")
    return path


class DoorServer:
    """One sgserve server, with or without the gRPC and REST front doors."""

    def __init__(self, label: str, cfg: str, doors: bool) -> None:
        self.label = label
        self.grpc_port = C.free_port() if doors else 0
        self.rest_port = C.free_port() if doors else 0
        args = [f"--model_config_file={cfg}", "--workers", "2", "--cpus-per-worker", "1"]
        if doors:
            args += [f"--port={self.grpc_port}", f"--rest_api_port={self.rest_port}"]
        self.server = C.Server(args, label=label)
        self.endpoints = {"native": self.server.endpoint}
        if doors:
            self.endpoints.update(grpc=f"grpc://127.0.0.1:{self.grpc_port}", rest=f"http://127.0.0.1:{self.rest_port}")
        self.pids: dict[str, int] = {}

    def start(self, models: list[str]) -> None:
        import systems as S  # noqa: PLC0415 - bench/peers/systems.py: the front doors' readiness checks

        self.server.start(600)
        deadline = time.monotonic() + 60
        for kind in models:
            name = MODEL_NAMES[kind]
            while "rest" in self.endpoints and not (
                    S._http_ok(f"{self.endpoints['rest']}/v1/models/{name}")
                    and S.grpc_model_available(self.endpoints["grpc"][7:], name)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.label}: front doors not answering for {name} after 60 s")
                time.sleep(0.3)
        st = RC.settle(self.server)
        self.pids = {"broker": self.server.pid}
        for w in st["workers"]:
            self.pids[f"workers{w['index']}"] = int(w["pid"])
        for i, g in enumerate(st.get("gateways") or []):
            self.pids[f"gateway{i}"] = int(g)
        C.log(f"{self.label}: processes {self.pids}")


# ------------------------------------------------------------------------------------- the run
def cases(opts) -> list[tuple[str, int, list[tuple[str, str]]]]:
    """(model, clients, [(server, door), ...]) in the order they run."""
    out = []
    for kind in opts.models:
        for clients in opts.clients:
            doors = [("doors", "native"), ("doors", "grpc"), ("doors", "rest")]
            if kind == "tiny":
                doors.append(("plain", "native"))
            out.append((kind, clients, doors))
    return out


def run_windows(opts, servers: dict[str, DoorServer]) -> list[dict[str, Any]]:
    rows = []
    plan = cases(opts)
    total = opts.repeats * sum(len(d) for _, _, d in plan)
    k = 0
    for rep in range(opts.repeats):
        for kind, clients, doors in plan:
            turn = rep % len(doors)
            for srv, door in doors[turn:] + doors[:turn]:
                k += 1
                s = servers[srv]
                batch = 1 if kind == "tiny" else opts.widedeep_batch
                what = f"[{k}/{total}] r{rep} {kind} b{batch} x{clients} {srv}/{door}"
                row = window(opts, s.endpoints[door], MODEL_NAMES[kind], batch, clients, s.pids, s.server.status,
                             what)
                row.update(repeat=rep, model=kind, batch=batch, clients=clients, server=srv, door=door)
                rows.append(row)
    return rows


def run_echo(opts) -> list[dict[str, Any]]:
    rows = []
    for mode in ("aio", "sync"):
        port = C.free_port()
        with C.child_group([sys.executable, SELF, "_echo", "--mode", mode, "--port", str(port)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=RC.child_env(),
                           cwd=C.REPO) as p:
            RC.read_line(p, 60, f"echo {mode}")
            for rep in range(max(1, opts.repeats)):
                for clients in opts.clients:
                    row = window(opts, f"grpc://127.0.0.1:{port}", "half_plus_two", 1, clients, {"server": p.pid},
                                 None, f"r{rep} grpc floor ({mode}) x{clients}", fixed_tiny=True)
                    row.update(repeat=rep, model="tiny", batch=1, clients=clients, server=f"echo_{mode}", door="grpc")
                    rows.append(row)
    return rows


# --------------------------------------------------------------------------------------- profile
CATEGORIES = (  # the innermost frame that is not libc nor the gateway's top level decides
    ("zmq (pyzmq, libzmq)", ("zmq/", "libzmq", "zmq.backend", "_zmq")),
    ("protobuf (upb)", ("google/protobuf", "upb", "_message")),
    ("grpcio (cython + core)", ("grpc/", "cygrpc", "libgrpc", "grpc_core", "grpc::")),
    ("aiohttp + multidict + yarl", ("aiohttp", "multidict", "yarl", "_http_parser", "llhttp")),
    ("json", ("json/", "_json")),
    ("msgpack", ("msgpack", "unpack_", "pack_template")),
    ("numpy", ("numpy",)),
    ("sgserve code", ("sgserve/",)),
    ("event loop (asyncio, uvloop)", ("asyncio/", "_asyncio", "selectors.py", "uvloop", "loop.c", "uv_", "uv__")),
)
WAITS = ("epoll_wait", "epoll_pwait", "pthread_cond", "futex", "nanosleep", "sem_wait", "poll (libc", "select (libc")
SKIP = ("libc.so", "libpthread", "sgserve/frontdoor/gateway.py")


def classify(stack: str) -> str:
    """Where a sample's CPU went; "idle wait" for a thread blocked in the kernel (py-spy --native
    reports those; without --native it leaves idle threads out)."""
    frames = stack.split(";")
    if any(w in frames[-1] for w in WAITS):
        return "idle wait"
    for frame in reversed(frames):
        if any(k in frame for k in SKIP):
            continue
        for name, keys in CATEGORIES:
            if any(k in frame for k in keys):
                return name
    return "kernel/libc/CPython (no library frame)"


def own_code(stack: str) -> str | None:
    """The innermost sgserve frame of a stack below the gateway's top level (inclusive time)."""
    for frame in reversed(stack.split(";")):
        if "sgserve/" in frame and "sgserve/frontdoor/gateway.py" not in frame:
            return frame.split(" (")[0] + " (" + frame.split("sgserve/")[-1].rstrip(")")[:60] + ")"
    return None


def profile(opts, s: DoorServer) -> dict[str, Any]:
    """py-spy record of gateway 0 while one client sends tiny requests over gRPC, then REST."""
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    gw = s.pids.get("gateway0")
    if not gw or not os.path.exists(spy):
        return {"error": "no gateway pid or no py-spy"}
    out: dict[str, Any] = {}
    for door in ("grpc", "rest"):
        raw = os.path.join(C.RESULTS_DIR, f"{opts.name}_profile_{door}.txt")
        with contextlib.suppress(OSError):
            os.unlink(raw)
        # 200 Hz: py-spy falls behind at 500 Hz on a busy 2-core machine; idle threads are left out.
        cmd = [spy, "record", "-p", str(gw), "-f", "raw", "-o", raw, "-r", "200", "-d", str(opts.profile)] + \
            (["--native"] if opts.native else ["--nonblocking"])  # --native must pause the process
        o = argparse.Namespace(**dict(vars(opts), seconds=opts.profile + 2.0, quiet_wait=0))
        spy_log = os.path.join(C.CACHE_DIR, "logs", f"py-spy-{door}.log")
        try:
            with open(spy_log, "w") as logf, C.child_group(cmd, stdout=logf, stderr=subprocess.STDOUT) as spy_proc:
                row = window(o, s.endpoints[door], MODEL_NAMES["tiny"], 1, 1, s.pids, s.server.status,
                             f"profile {door} (py-spy on gateway {gw})")
                spy_proc.wait(opts.profile + 60)
            out[door] = dict(summarize_profile(raw), window=row, folded=os.path.relpath(raw, C.REPO))
        except Exception as exc:  # noqa: BLE001 - a failed profile must not lose the measured windows
            with open(spy_log, errors="replace") as f:
                out[door] = {"error": f"{exc!r}; py-spy said: {f.read()[-1500:]}"}
            C.log(f"profile {door}: FAILED: {out[door]['error']}")
    return out


def summarize_profile(path: str) -> dict[str, Any]:
    """Shares of the busy samples (idle waits left out) by library, and sgserve's own frames."""
    by_cat: Counter = Counter()
    by_own: Counter = Counter()
    idle = total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            cat = classify(stack)
            if cat == "idle wait":
                idle += n
                continue
            total += n
            by_cat[cat] += n
            own = own_code(stack)
            if own:
                by_own[own] += n
    share = {k: round(v / total, 3) for k, v in by_cat.most_common()} if total else {}
    return {"busy_samples": total, "idle_samples": idle, "share": share,
            "sgserve_inclusive": round(sum(by_own.values()) / total, 3) if total else None,
            "sgserve_frames": {k: round(v / total, 3) for k, v in by_own.most_common(12)} if total else {}}


# --------------------------------------------------------------------------------------- summary
def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['model']} x{r['clients']} {r['server']}/{r['door']}", []).append(r)
    out: dict[str, Any] = {}
    for key, rs in groups.items():
        cpu_keys = sorted({k for r in rs for k in r["cpu_us_per_request"]})
        out[key] = {"windows": len(rs), **{m: round(C.median([r[m] for r in rs]), 1)
                                           for m in ("qps", "p50_us", "p90_us", "p99_us", "other_load_cores")},
                    "cpu_us_per_request": {k: round(C.median([r["cpu_us_per_request"].get(k, 0.0) for r in rs]), 1)
                                           for k in cpu_keys},
                    "p50_us_all": [r["p50_us"] for r in rs], "qps_all": [r["qps"] for r in rs]}
    return out


def paired(rows: list[dict[str, Any]], model: str, clients: int, a: tuple[str, str], b: tuple[str, str],
           metric: str) -> dict[str, Any] | None:
    """b / a of a metric, per repeat (the two windows of the same repeat), and the median."""
    per = []
    for rep in sorted({r["repeat"] for r in rows}):
        got = {(r["server"], r["door"]): r[metric] for r in rows
               if r["repeat"] == rep and r["model"] == model and r["clients"] == clients}
        if a in got and b in got and got[a]:
            per.append(round(got[b] / got[a], 3))
    return {"per_repeat": per, "median": round(C.median(per), 3)} if per else None


def targets(rows: list[dict[str, Any]], clients_list: list[int]) -> dict[str, Any]:
    t: dict[str, Any] = {}
    g = paired(rows, "tiny", 1, ("doors", "native"), ("doors", "grpc"), "p50_us")
    if g:
        t["grpc_p50_over_native_tiny_x1"] = dict(g, target=TARGET_GRPC_OVER_NATIVE,
                                                 met=g["median"] <= TARGET_GRPC_OVER_NATIVE)
    r = paired(rows, "tiny", 1, ("doors", "native"), ("doors", "rest"), "p50_us")
    if r:
        t["rest_p50_over_native_tiny_x1"] = r
    n1 = paired(rows, "tiny", 1, ("plain", "native"), ("doors", "native"), "p50_us")
    if n1:
        t["native_p50_doors_over_plain_tiny_x1"] = n1
    for c in clients_list:
        if c > 1:
            q = paired(rows, "tiny", c, ("plain", "native"), ("doors", "native"), "qps")
            if q:
                t[f"native_qps_doors_over_plain_tiny_x{c}"] = q
            for door in ("grpc", "rest"):
                q = paired(rows, "widedeep", c, ("doors", "native"), ("doors", door), "qps")
                if q:
                    t[f"{door}_qps_over_native_widedeep_x{c}"] = q
    return t


def print_report(result: dict[str, Any]) -> None:
    headers = ["case", "windows", "QPS", "p50 us", "p90 us", "p99 us", "client", "gateway", "broker", "workers",
               "total CPU us/req", "other load"]
    body = []
    for key, s in result["summary"].items():
        c = s["cpu_us_per_request"]
        body.append([key, s["windows"], s["qps"], s["p50_us"], s["p90_us"], s["p99_us"], c.get("client"),
                     c.get("gateway", c.get("server")), c.get("broker"), c.get("workers"), c.get("total"),
                     s["other_load_cores"]])
    print("\nmedians over windows; CPU us per answered request by process (echo floors: 'gateway' = the echo server)")
    print(C.table(headers, body))
    for k, v in result["targets"].items():
        print(f"  {k}: median {v['median']} (per repeat {v['per_repeat']})"
              + (f"; target <= {v['target']}: {'MET' if v['met'] else 'NOT MET'}" if "target" in v else ""))
    for door, p in (result.get("profile") or {}).items():
        if isinstance(p, dict) and "share" in p:
            print(f"  gateway profile under {door}: {p['busy_samples']} busy samples (sgserve frames inclusive "
                  f"{p['sgserve_inclusive']:.0%}): "
                  + ", ".join(f"{k} {v:.0%}" for k, v in p["share"].items()))


def plot(result: dict[str, Any], name: str) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    summ = result["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    procs = ("client", "gateway", "broker", "workers", "server")
    colors = {"client": "tab:gray", "gateway": "tab:orange", "broker": "tab:blue", "workers": "tab:green",
              "server": "tab:purple"}
    for ax, clients in zip(axes[:2], (1, max(result["params"]["clients"]))):
        keys = [k for k in summ if f" x{clients} " in k]
        for i, k in enumerate(keys):
            bottom = 0.0
            for p in procs:
                v = summ[k]["cpu_us_per_request"].get(p, 0.0)
                ax.bar(i, v, bottom=bottom, color=colors[p], label=p if i == 0 or p == "server" else None)
                bottom += v
            ax.plot([i] * len(summ[k]["p50_us_all"]), summ[k]["p50_us_all"], "k_", ms=14)
            ax.annotate(f"p50 {summ[k]['p50_us']:.0f}", (i, max(bottom, summ[k]["p50_us"])), ha="center",
                        fontsize=7, xytext=(0, 3), textcoords="offset points")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([k.replace(f" x{clients} ", "\n") for k in keys], fontsize=7, rotation=30)
        ax.set_ylabel("us (bars: CPU/request by process; ticks: window p50)", fontsize=8)
        ax.set_title(f"{clients} client(s)", fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    t = result["targets"]
    names = [k for k in t if "per_repeat" in t[k]]
    for i, k in enumerate(names):
        ax.plot([i] * len(t[k]["per_repeat"]), t[k]["per_repeat"], "o", color="tab:blue", alpha=0.5)
        ax.bar(i, t[k]["median"], color="tab:blue", alpha=0.3)
    ax.axhline(TARGET_GRPC_OVER_NATIVE, color="r", ls=":", lw=1, label="gRPC p50 target 1.3x")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("_", " ") for n in names], fontsize=6, rotation=25, ha="right")
    ax.set_title("paired ratios (dots: per repeat; bar: median)", fontsize=9)
    ax.legend(fontsize=7)
    C.save_figure(fig, name, "bench_front_doors (2 workers x 1 core)", result["machine"])


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,widedeep", help="tiny, widedeep (default both)")
    ap.add_argument("--clients", default="1,8", help="clients per window, comma list (default 1,8)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per window (default 3)")
    ap.add_argument("--warmup-requests", type=int, default=100, help="per client, before each window (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of windows, order rotated each (default 3)")
    ap.add_argument("--widedeep-batch", type=int, default=16, help="rows per wide & deep request (default 16)")
    ap.add_argument("--echo", action="store_true", help="also measure the bare grpcio floors (aio and sync)")
    ap.add_argument("--profile", type=int, default=0, help="py-spy the gateway this many s per door (0: no)")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames; slower sampling)")
    ap.add_argument("--quiet-wait", type=float, default=5.0, help="before each window, wait up to this for calm")
    ap.add_argument("--max-other-load", type=float, default=0.3, help="'calm' = other processes use <= this")
    ap.add_argument("--quick", action="store_true", help="tiny only, 1 s windows")
    ap.add_argument("--name", default=None, help="results name (default bench_front_doors[_quick])")
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.seconds, a.quiet_wait = "tiny", 1.0, min(a.quiet_wait, 2.0)
    a.name = a.name or ("bench_front_doors_quick" if a.quick else "bench_front_doors")
    a.models = [m for m in a.models.split(",") if m]
    a.clients = [int(c) for c in str(a.clients).split(",") if c]
    return a


def child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    if argv[0] == "_client":
        for f in ("--endpoint", "--model"):
            ap.add_argument(f, required=True)
        for f in ("--rows", "--concurrency", "--warmup"):
            ap.add_argument(f, type=int, required=True)
        ap.add_argument("--seconds", type=float, required=True)
        ap.add_argument("--fixed-tiny", action="store_true")
        return client_child(ap.parse_args(argv[1:]))
    ap.add_argument("--mode", choices=["aio", "sync"], required=True)
    ap.add_argument("--port", type=int, required=True)
    return echo_child(ap.parse_args(argv[1:]))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("_client", "_echo"):
        return child_main(sys.argv[1:])
    opts = parse(sys.argv[1:])
    C.sigterm_as_exit()
    import _models  # noqa: PLC0415 - bench/_models.py
    import models as peer_models  # noqa: PLC0415 - bench/peers/models.py

    bases = {"tiny": _models.ensure("half_plus_two")[0]}
    if "widedeep" in opts.models:
        bases["widedeep"] = peer_models.ensure("widedeep")[0]
    result: dict[str, Any] = {"benchmark": "bench_front_doors", "machine": C.machine_info(),
                              "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                              "params": {k: v for k, v in vars(opts).items()},
                              "loadavg_start": os.getloadavg(), "packages": {
                                  p: C._pkg_version(p) for p in ("grpcio", "aiohttp", "protobuf", "pyzmq")}}
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="sgdoors-")
    cfg = config_file(tmp, bases)
    servers = {"doors": DoorServer("doors", cfg, doors=True), "plain": DoorServer("plain", cfg, doors=False)}
    rows: list[dict[str, Any]] = []
    try:
        with contextlib.ExitStack() as stack:
            for s in servers.values():
                stack.callback(s.server.stop)
                s.start(opts.models)
            result["idle_cpu_us_per_s"] = {k: RC.idle_rates(s.pids, 2.0) for k, s in servers.items()}
            C.log(f"idle CPU us/s: {result['idle_cpu_us_per_s']}")
            rows = run_windows(opts, servers)
            if opts.profile > 0:
                result["profile"] = profile(opts, servers["doors"])
            result["server_warnings"] = {}
        result["server_warnings"] = {k: s.server.problems[:20] for k, s in servers.items()}
        if opts.echo:
            rows += run_echo(opts)
    except KeyboardInterrupt:
        C.log("interrupted: writing what was measured")
        result["interrupted"] = True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(cfg)
            os.rmdir(tmp)
    result.update(seconds=round(time.monotonic() - t0, 1), loadavg_end=os.getloadavg(), windows=rows,
                  summary=summarize(rows), targets=targets(rows, opts.clients))
    C.write_json(opts.name, result)
    print_report(result)
    if rows:
        plot(result, opts.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
