#!/usr/bin/env python
"""Issue 13's yardstick: one big predict request against sgserve 2 workers x 1 core, one worker
holding both cores, and gunicorn+Flask, on a text CNN, in one run; with the split server as an
extra system once `sgserve start` has the flags for it.

Model ``text_cnn`` (built once into bench/.cache/models/split_text_cnn/1, in a child process):
tokens int64[None, 64] -> Embedding(20000, 64) -> Conv1D(64, k) + global max-pool for k = 3, 4, 5
-> concat -> Dense 10 -> softmax; serving_default -> logits, probs. About 3 MFLOP a row, so a
1000-row request is about 75 ms on one core.

Systems, all started first and kept up together (each pinned to the same 2 cores as it would be
alone; idle ones cost only heartbeats):

  sgserve_2x1        `sgserve start --workers 2 --cpus-per-worker 1` (+ --nosplit-flags)
  sgserve_1x2        `--workers 1 --cpus-per-worker 2 --intra-op-threads 2`: what one request could
                     get from both cores; the split server's 1000-row target is 1.15x of this
  gunicorn_flask     bench/peers' gunicorn + Flask, 2 sync workers, TF Serving's REST API, JSON;
                     each worker's TF uses both cores (intra-op 2), as a new user's does: the
                     baseline the issue's table and targets use
  gunicorn_flask_pinned  the same, each worker pinned to 1 core (bench_peers' layout; not run
                     unless named in --systems)
  sgserve_2x1_split  the 2x1 server plus --split-flags (only when given)

Phases:
  1. latency: for each rows in --rows, one sequential client; the systems take turns request by
     request (order rotated each round), so they share the machine's noise. Inputs are the same for
     every system; each system's outputs are checked against sgserve_2x1's first.
  2. sizing: sgserve_2x1 (one request = one worker x 1 core), sgserve_1x2 and the split server
     at --sizing-rows, the data for choosing --split-min-rows.
  3. QPS: `sgserve bench -c 8` at each --qps-rows against sgserve_2x1 and, when given, the split
     server, interleaved in slices (--endpoint A,B).

Timing is the load generator's own (sgserve.bench.targets): a request is encoded once, and the
clock runs from send to a decoded answer.

    python bench/bench_split.py --quick                 # ~3 min: 30 requests a point
    python bench/bench_split.py                         # ~8 min: 150 requests a point
    python bench/bench_split.py --split-flags "--split-min-rows 64"
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
import _common as C  # noqa: E402
import systems as S  # noqa: E402  (bench/peers/systems.py)

MODEL = "text_cnn"
SEQ_LEN, VOCAB, EMBED, FILTERS, KERNELS, CLASSES, SEED = 64, 20000, 64, 64, (3, 4, 5), 10, 7
REF = "sgserve_2x1"
SPLIT = "sgserve_2x1_split"
TARGETS = {1: 0.5, 10: 0.5, 100: 0.6, 1000: 0.8}  # p50 / Flask's p50, issue 13
TARGET_VS_1X2, TARGET_QPS = 1.15, 0.95
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


# ------------------------------------------------------------------------------------------- model
def build_text_cnn(out: str) -> dict[str, Any]:
    """The issue's text_cnn (embedding, conv1d 3/4/5, max-pool, softmax), random seeded weights."""
    import keras  # noqa: PLC0415

    keras.utils.set_random_seed(SEED)
    tokens = keras.Input(shape=(SEQ_LEN,), dtype="int64", name="tokens")
    x = keras.layers.Embedding(VOCAB, EMBED)(tokens)
    pools = [keras.layers.GlobalMaxPooling1D()(keras.layers.Conv1D(FILTERS, k, activation="relu")(x))
             for k in KERNELS]
    logits = keras.layers.Dense(CLASSES, name="logits")(keras.layers.Concatenate()(pools))
    probs = keras.layers.Softmax(name="probs")(logits)
    model = keras.Model(tokens, {"logits": logits, "probs": probs}, name=MODEL)
    model.export(out, verbose=False)
    flops = 2 * sum((SEQ_LEN - k + 1) * k * EMBED * FILTERS for k in KERNELS) + 2 * len(KERNELS) * FILTERS * CLASSES
    return {"variable_bytes": int(sum(int(w.numpy().size) * 4 for w in model.weights)), "flops_per_row": flops,
            "seq_len": SEQ_LEN, "vocab": VOCAB, "embed": EMBED, "filters": FILTERS, "kernels": list(KERNELS)}


def ensure_text_cnn() -> tuple[str, dict[str, Any]]:
    """(base path, build info); builds in a child process so this driver never imports TensorFlow."""
    base = os.path.join(C.CACHE_DIR, "models", "split_text_cnn")
    info_path = os.path.join(base, "build.json")
    if os.path.isfile(os.path.join(base, "1", "saved_model.pb")) and os.path.isfile(info_path):
        with open(info_path) as f:
            return base, json.load(f)
    tmp = os.path.join(base, ".building")
    os.makedirs(base, exist_ok=True)
    C.log(f"building {MODEL} into {os.path.relpath(base)} ...")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--build-model", tmp], stdout=subprocess.PIPE,
                         text=True, check=False, env=S.sgserve_env())
    if out.returncode != 0:
        raise RuntimeError(f"building {MODEL} failed (exit {out.returncode})")
    os.rename(tmp, os.path.join(base, "1"))
    info = json.loads(out.stdout.strip().splitlines()[-1])
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    return base, info


def tokens(rows: int) -> dict[str, Any]:
    import numpy as np  # noqa: PLC0415

    return {"tokens": np.random.default_rng(rows).integers(0, VOCAB, (rows, SEQ_LEN)).astype("int64")}


# ----------------------------------------------------------------------------------------- systems
class SgserveVariant(S.SgserveSystem):
    """`sgserve start` with a layout of its own and extra flags (the split flags, say)."""

    def __init__(self, key: str, layout: S.Layout, model: S.ModelRef, extra: list[str]) -> None:
        super().__init__(layout, model)
        self.key, self.extra = key, list(extra)
        self.label = f"sgserve {layout.workers} x {layout.cpus_per_worker} core" + \
            (f" {' '.join(extra)}" if extra else "")

    def _launch(self, timeout: float) -> None:
        args = ["--model-base-path", self.model.base, "--model-name", self.model.name, "--workers",
                str(self.layout.workers), "--cpus-per-worker", str(self.layout.cpus_per_worker)] + self.extra
        self.server = C.Server(args, label=self.key)
        self.endpoint = self.server.endpoint
        try:
            self.server.start(timeout)
        except C.ServerError as exc:
            raise S.StartError(str(exc)) from None
        finally:
            self.procs = [self.server.proc] if self.server.proc is not None else []
            self.logs = [self.server.log_file.name]


def make_systems(model: S.ModelRef, args: argparse.Namespace) -> dict[str, S.System]:
    """The systems named in --systems (sgserve_2x1 always), in the order the tables show them."""
    def flask(cpus: int, key: str, label: str) -> S.System:
        s = S.GunicornSystem(S.Layout(2, cpus, allow_oversubscribe=True), model)
        s.key, s.label = key, label
        return s

    factories: dict[str, Any] = {
        REF: lambda: SgserveVariant(REF, S.Layout(2, 1), model, shlex.split(args.nosplit_flags)),
        "sgserve_1x2": lambda: SgserveVariant("sgserve_1x2", S.Layout(1, 2), model, ["--intra-op-threads", "2"]),
        "gunicorn_flask": lambda: flask(2, "gunicorn_flask", "gunicorn + Flask, 2 sync workers, each TF on both "
                                        "cores (as a new user runs it)"),
        "gunicorn_flask_pinned": lambda: flask(1, "gunicorn_flask_pinned", "gunicorn + Flask, 2 sync workers x 1 core"),
    }
    if args.split_flags:
        factories[SPLIT] = lambda: SgserveVariant(SPLIT, S.Layout(2, 1), model, shlex.split(args.split_flags))
    return {k: f() for k, f in factories.items() if k in args.systems or k == REF}


@contextlib.contextmanager
def running(systems: dict[str, S.System], timeout: float, stops: dict[str, Any]):
    """Starts every system (one that cannot start is dropped, with a note, unless it is the
    reference); stops every one and checks for leftovers, whatever happens."""
    started: dict[str, S.System] = {}
    try:
        for key, s in list(systems.items()):
            C.log(f"== starting {key}: {s.label}")
            started[key] = s
            try:
                C.log(f"{key}: up in {s.start(timeout)} s at {s.endpoint}")
            except (S.StartError, S.Skipped) as exc:
                if key == REF:
                    raise
                C.log(f"{key}: DROPPED, it did not start: {str(exc).splitlines()[0]}")
                stops[key] = {"dropped": str(exc)[-2000:]}
                del systems[key]
        yield
    finally:
        for key, s in started.items():
            stops[key] = dict(stops.get(key, {}), **s.stop())


# ----------------------------------------------------------------------------------------- measure
class Probe:
    """One system's load-generator session plus the request it sends, encoded once."""

    def __init__(self, system: S.System, rows: int, timeout: float) -> None:
        from sgserve.bench.config import BenchConfig  # noqa: PLC0415
        from sgserve.bench.targets import open_endpoint  # noqa: PLC0415

        self.endpoint = open_endpoint(system.endpoint, BenchConfig(endpoint=system.endpoint, model=MODEL,
                                                                   timeout=timeout))
        self.session = self.endpoint.session()
        self.request = self.session.prepare(tokens(rows))
        self.ms: list[float] = []
        self.errors: dict[str, int] = {}

    def send(self, record: bool = True) -> None:
        t0 = time.perf_counter()
        status, _ = self.session.send(self.request)
        ms = (time.perf_counter() - t0) * 1000.0
        if status != "200":
            self.errors[status] = self.errors.get(status, 0) + 1
        elif record:
            self.ms.append(ms)

    def close(self) -> None:
        self.session.close()
        self.endpoint.close()

    def stats(self) -> dict[str, Any]:
        ms = self.ms
        return {"n": len(ms), "p50_ms": rnd(C.pct(ms, 50)), "p90_ms": rnd(C.pct(ms, 90)),
                "p99_ms": rnd(C.pct(ms, 99)), "mean_ms": rnd(sum(ms) / len(ms)) if ms else None,
                "min_ms": rnd(min(ms)) if ms else None, "errors": self.errors}


def rnd(x: float | None, nd: int = 3) -> float | None:
    return None if x is None or x != x else round(x, nd)


def check_outputs(systems: dict[str, S.System], rows: int) -> dict[str, Any]:
    """Each system's answer to the same request against sgserve_2x1's; the split server's parts."""
    import numpy as np  # noqa: PLC0415
    from sgserve.client import Client  # noqa: PLC0415

    inputs, ref, out = tokens(rows), None, {}
    for key, s in systems.items():
        got = S.predict_once(s.endpoint, MODEL, inputs)
        if ref is None:
            ref = got
        diff = max(float(np.max(np.abs(got[k].astype("float64") - ref[k].astype("float64")))) for k in ref)
        ok = set(got) == set(ref) and all(np.allclose(got[k], ref[k], **TOLERANCE) for k in ref)
        out[key] = {"match": bool(ok), "max_abs_diff": diff}
        if s.protocol == "sgserve":
            with contextlib.closing(Client(s.endpoint, timeout=60.0)) as c:
                res = c.predict_full(MODEL, inputs)
            out[key]["parts"] = getattr(res, "parts", None)  # set once replies say how many parts ran
        if not ok:
            C.log(f"WARNING: {key} at {rows} rows: outputs differ from {REF}'s (max abs diff {diff:.3g})")
    return out


def interleaved(systems: dict[str, S.System], rows: int, n: int, warmup: int, timeout: float) -> dict[str, Any]:
    """n rounds; in each, every system answers one request, in an order rotated every round."""
    probes = {k: Probe(s, rows, timeout) for k, s in systems.items()}
    keys = list(probes)
    meter = OtherLoad(systems)
    try:
        for p in probes.values():
            for _ in range(warmup):
                p.send(record=False)
        last = time.monotonic()
        for i in range(n):
            for j in range(len(keys)):
                probes[keys[(i + j) % len(keys)]].send()
            if time.monotonic() - last > 5 or i == n - 1:
                last = time.monotonic()
                C.log(f"  rows {rows}: {i + 1}/{n} rounds; p50 so far " + ", ".join(
                    f"{k} {C.pct(p.ms, 50):.2f}" for k, p in probes.items() if p.ms) + " ms")
        return {"systems": {k: p.stats() for k, p in probes.items()}, "other_load_cores": meter.cores()}
    finally:
        for p in probes.values():
            p.close()


class OtherLoad:
    """Cores used by processes other than ours (the benchmark, its children, the systems) meanwhile."""

    def __init__(self, systems: dict[str, S.System]) -> None:
        self.systems = systems
        self.t0, self.busy0, self.own0 = time.monotonic(), C.system_busy_seconds(), self._own()

    def _own(self) -> float:
        pids = [os.getpid()] + [p for s in self.systems.values() for p in s.pids()]
        return C.cpu_of(pids) + sum(os.times()[2:4])

    def cores(self) -> float:
        wall = time.monotonic() - self.t0
        other = (C.system_busy_seconds() - self.busy0) - (self._own() - self.own0)
        return round(max(other, 0.0) / wall, 2) if wall > 0 else 0.0


def qps_point(systems: dict[str, S.System], rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """`sgserve bench -c 8` against sgserve_2x1 and the split server, interleaved in slices."""
    keys = [k for k in (REF, SPLIT) if k in systems]
    fd, path = tempfile.mkstemp(suffix=".json", prefix="split-qps-")
    os.close(fd)
    cmd = [sys.executable, "-m", "sgserve.cli", "bench", MODEL, "--endpoint", ",".join(systems[k].endpoint for k in keys),
           "-c", str(args.qps_clients), "-b", str(rows), "-d", str(args.qps_duration), "--warmup", str(args.qps_warmup),
           "--slice", str(args.qps_slice), "--timeout", str(args.request_timeout), "--json", path, "-q"]
    C.log(f"QPS at {rows} rows, c={args.qps_clients}: {', '.join(keys)} ({args.qps_duration:g} s each)")
    if args.quiet_wait > 0:
        C.wait_quiet(max_cores=args.max_other_load, timeout=args.quiet_wait)
    meter = OtherLoad(systems)
    try:
        with C.child_group(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=S.sgserve_env(), cwd=C.REPO) as p:
            _, err = p.communicate(timeout=len(keys) * (args.qps_duration + args.qps_warmup) + 180)
        with open(path) as f:
            text = f.read()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if not text.strip():
        return {"error": f"sgserve bench exit {p.returncode}: {err.decode(errors='replace')[-800:]}"}
    by_ep = {pt["endpoint"]: pt for pt in json.loads(text)["points"]}
    out: dict[str, Any] = {"other_load_cores": meter.cores(), "systems": {}}
    for k in keys:
        pt = by_ep.get(systems[k].endpoint, {})
        out["systems"][k] = {f: pt.get(f) for f in ("qps", "rows_per_s", "p50_ms", "p90_ms", "p99_ms", "ok", "errors",
                                                     "error_codes", "seconds")}
        C.log(f"  {k}: {pt.get('qps')} QPS, p50/p99 {pt.get('p50_ms')}/{pt.get('p99_ms')} ms, errors {pt.get('errors')}")
    if SPLIT in out["systems"]:
        a, b = out["systems"][REF].get("qps"), out["systems"][SPLIT].get("qps")
        out["split_qps_ratio"] = rnd(b / a) if a and b else None
    return out


# ----------------------------------------------------------------------------------------- report
def ratio(a: float | None, b: float | None) -> float | None:
    return rnd(a / b) if a and b else None


def latency_table(result: dict[str, Any]) -> str:
    lat, keys = result["latency"], result["params"]["systems"]
    heads = ["rows"] + [f"{k} p50/p90 ms" for k in keys]
    for k in (REF, SPLIT):
        if k in keys:
            heads += [f"{k} / Flask", f"{k} / 1x2"]
    heads.append("target vs Flask")
    rows = []
    for r, point in lat.items():
        st = point["systems"]
        row = [r] + [f"{st[k]['p50_ms']:.2f} / {st[k]['p90_ms']:.2f}" if st.get(k, {}).get("n") else "-" for k in keys]
        for k in (REF, SPLIT):
            if k in keys:
                row += [fmt_x(point["ratios"].get(f"{k}/flask")), fmt_x(point["ratios"].get(f"{k}/1x2"))]
        rows.append(row + [f"<= {TARGETS[int(r)]}" if int(r) in TARGETS else "-"])
    return C.table(heads, rows)


def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def add_ratios(point: dict[str, Any]) -> None:
    st = point["systems"]
    p50 = {k: v.get("p50_ms") for k, v in st.items()}
    point["ratios"] = {}
    for k in (REF, SPLIT):
        if k in p50:
            point["ratios"][f"{k}/flask"] = ratio(p50[k], p50.get("gunicorn_flask"))
            point["ratios"][f"{k}/1x2"] = ratio(p50[k], p50.get("sgserve_1x2"))


def verdicts(result: dict[str, Any]) -> list[str]:
    """Issue 13's targets, judged on the split server when there is one, else on sgserve_2x1."""
    who = SPLIT if SPLIT in result["params"]["systems"] else REF
    out = []
    for r, t in TARGETS.items():
        x = result["latency"].get(str(r), {}).get("ratios", {}).get(f"{who}/flask")
        out.append(f"{who} {r} rows: p50 {fmt_x(x)}x Flask (target <= {t}): {met(x, t)}")
    x = result["latency"].get("1000", {}).get("ratios", {}).get(f"{who}/1x2")
    out.append(f"{who} 1000 rows: p50 {fmt_x(x)}x sgserve_1x2 (target <= {TARGET_VS_1X2}): {met(x, TARGET_VS_1X2)}")
    for r, q in result.get("qps", {}).items():
        x = q.get("split_qps_ratio")
        out.append(f"QPS c={result['params']['qps_clients']} at {r} rows, split / unsplit: {fmt_x(x)} "
                   f"(target >= {TARGET_QPS}): " + ("not measured (no --split-flags)" if x is None
                                                    else ("met" if x >= TARGET_QPS else "NOT met")))
    return out


def met(x: float | None, t: float) -> str:
    return "not measured" if x is None else ("met" if x <= t else "NOT met")


def sizing_table(result: dict[str, Any]) -> str:
    """t(n) on one 1-core worker, t(n) on both cores, and t(n/2): what a 2-way split could reach."""
    sz = result["sizing"]
    p50 = {int(r): {k: v["p50_ms"] for k, v in pt["systems"].items()} for r, pt in sz.items()}
    rows = []
    for n in sorted(p50):
        half = p50.get(n // 2, {}).get(REF) or p50.get((n + 1) // 2, {}).get(REF)
        one, two, split = p50[n].get(REF), p50[n].get("sgserve_1x2"), p50[n].get(SPLIT)
        rows.append([n, fmt_x(one), fmt_x(two), fmt_x(ratio(two, one)), fmt_x(split), fmt_x(half),
                     fmt_x(rnd(one - half) if one and half else None),
                     f"{sz[str(n)]['other_load_cores']}" + (" NOISY" if sz[str(n)].get("noisy") else "")])
    return C.table(["rows", "1 worker x 1 core p50 ms", "1 worker x 2 cores p50 ms", "2 cores / 1 core",
                    "split server p50 ms", "t(n/2) on 1 core", "t(n) - t(n/2): a 2-way split's room",
                    "other load, cores"], rows)


def plot(result: dict[str, Any], name: str) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {REF: "tab:green", "sgserve_1x2": "tab:gray", "gunicorn_flask": "tab:red", SPLIT: "tab:blue"}
    rows = [int(r) for r in result["latency"]]
    for k in result["params"]["systems"]:
        pts = [(r, result["latency"][str(r)]["systems"].get(k, {})) for r in rows]
        pts = [(r, p) for r, p in pts if p.get("n")]
        ax.plot([r for r, _ in pts], [p["p50_ms"] for _, p in pts], "-o", color=colors.get(k), label=f"{k} p50")
        ax.fill_between([r for r, _ in pts], [p["p50_ms"] for _, p in pts], [p["p90_ms"] for _, p in pts],
                        color=colors.get(k), alpha=0.15)
        for peer, style in (("flask", "-o"), ("1x2", "--s")) if k in (REF, SPLIT) else ():
            xs = [(r, result["latency"][str(r)]["ratios"].get(f"{k}/{peer}")) for r in rows]
            axr.plot([r for r, x in xs if x], [x for _, x in xs if x], style, color=colors[k], label=f"{k} / {peer}")
    tr = sorted(TARGETS)
    axr.step(tr, [TARGETS[r] for r in tr], where="mid", color="k", ls=":", label="target vs Flask")
    axr.plot([1000], [TARGET_VS_1X2], "k*", label="target vs 1x2 (1000 rows)")
    for a, title in ((ax, "latency vs rows per request (band: p50..p90), one client"),
                     (axr, "p50 ratios: against gunicorn+Flask (solid), against sgserve 1 x 2 cores (dashed)")):
        a.set_xscale("log")
        a.set_xlabel("rows per request (log)")
        a.set_title(title, fontsize=9)
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    axr.set_ylabel("ratio")
    C.save_figure(fig, name, f"bench_split ({MODEL}, 2 workers x 1 core vs peers)", result["machine"])


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,10,100,1000", help="rows per request in the latency phase")
    ap.add_argument("--requests", type=int, default=150, help="measured requests per system and rows (default 150)")
    ap.add_argument("--warmup-requests", type=int, default=5, help="unmeasured requests per system and rows first")
    ap.add_argument("--sizing-rows", default="25,50,100,125,250,500,1000",
                    help="rows of the split-size phase: sgserve_2x1, sgserve_1x2, split ('' skips it)")
    ap.add_argument("--qps-rows", default="100,1000", help="rows per request of the 8-client QPS points ('' skips)")
    ap.add_argument("--qps-clients", type=int, default=8)
    ap.add_argument("--qps-duration", type=float, default=10.0, help="measured seconds per system and QPS point")
    ap.add_argument("--qps-warmup", type=float, default=2.0)
    ap.add_argument("--qps-slice", type=float, default=1.0, help="seconds per turn when systems alternate")
    ap.add_argument("--split-flags", default="", help='`sgserve start` flags that turn splitting on, e.g. '
                    '"--split-min-rows 64"; adds the sgserve_2x1_split system')
    ap.add_argument("--nosplit-flags", default="", help="flags for sgserve_2x1, e.g. to turn splitting off once it "
                    "is on by default")
    ap.add_argument("--systems", default=f"{REF},sgserve_1x2,gunicorn_flask,{SPLIT}",
                    help="subset of the systems (sgserve_2x1 always runs: it is the reference)")
    ap.add_argument("--quiet-wait", type=float, default=20.0,
                    help="before each point, wait up to this long for other work to calm down (0: don't)")
    ap.add_argument("--max-other-load", type=float, default=0.3,
                    help="'calm' = other processes use <= this many cores; a point above it is measured again once")
    ap.add_argument("--request-timeout", type=float, default=30.0)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="30 requests a point, sizing 125,250,500,1000, "
                    "QPS at 1000 rows for 4 s")
    ap.add_argument("--name", default=None, help="results name (default bench_split, or bench_split_quick)")
    ap.add_argument("--build-model", metavar="DIR", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        given = {x.split("=")[0] for x in (argv if argv is not None else sys.argv[1:])}
        for flag, attr, value in (("--requests", "requests", 30), ("--sizing-rows", "sizing_rows", "125,250,500,1000"),
                                  ("--qps-rows", "qps_rows", "1000"), ("--qps-duration", "qps_duration", 4.0),
                                  ("--warmup-requests", "warmup_requests", 3),
                                  ("--quiet-wait", "quiet_wait", 5.0)):
            if flag not in given:
                setattr(a, attr, value)
    a.name = a.name or ("bench_split_quick" if a.quick else "bench_split")
    a.rows = [int(x) for x in str(a.rows).split(",") if x.strip()]
    a.sizing_rows = [int(x) for x in str(a.sizing_rows).split(",") if x.strip()]
    a.qps_rows = [int(x) for x in str(a.qps_rows).split(",") if x.strip()]
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    return a


def measured(systems: dict[str, S.System], rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """One interleaved point, after waiting for the machine to calm down; measured once more when
    other processes used more than --max-other-load cores meanwhile (the calmer try is kept)."""
    best: dict[str, Any] | None = None
    for attempt in range(2):
        quiet = C.wait_quiet(max_cores=args.max_other_load, timeout=args.quiet_wait) if args.quiet_wait > 0 else None
        point = interleaved(systems, rows, args.requests, args.warmup_requests, args.request_timeout)
        point["other_load_before"], point["attempt"] = quiet, attempt + 1
        if best is None or point["other_load_cores"] < best["other_load_cores"]:
            best = point
        if best["other_load_cores"] <= args.max_other_load:
            break
        C.log(f"  rows {rows}: other processes used {point['other_load_cores']} cores meanwhile"
              + ("; measuring again" if attempt == 0 else "; keeping the calmer try"))
    best["noisy"] = best["other_load_cores"] > args.max_other_load
    return best


def run_phases(systems: dict[str, S.System], args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Latency, sizing, QPS; the JSON is rewritten after every point, so a stopped run keeps its data."""
    for rows in args.rows:
        C.log(f"== latency at {rows} rows: {', '.join(systems)}")
        check = check_outputs(systems, rows)
        point = measured(systems, rows, args)
        point["outputs_check"] = check
        add_ratios(point)
        result["latency"][str(rows)] = point
        C.write_json(args.name, result)
    pair = {k: systems[k] for k in (REF, "sgserve_1x2", SPLIT) if k in systems}
    for rows in args.sizing_rows:
        C.log(f"== sizing at {rows} rows: {', '.join(pair)}")
        result["sizing"][str(rows)] = measured(pair, rows, args)
        C.write_json(args.name, result)
    for rows in args.qps_rows:
        result["qps"][str(rows)] = qps_point(systems, rows, args)
        C.write_json(args.name, result)


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{MODEL}, one sequential client, p50 / p90 ms over {args.requests} requests per point; "
          f"ratios of p50 (lower is better)")
    print(latency_table(result))
    for r, pt in result["latency"].items():
        bad = [k for k, v in pt["outputs_check"].items() if not v["match"]]
        errs = {k: v["errors"] for k, v in pt["systems"].items() if v["errors"]}
        if bad or errs:
            print(f"  rows {r}: outputs differ: {bad or '-'}; errors: {errs or '-'}")
        print(f"  rows {r}: other load {pt['other_load_cores']} cores{' (NOISY)' if pt.get('noisy') else ''}" +
              (f"; split parts {pt['outputs_check'][SPLIT].get('parts')}" if SPLIT in pt["outputs_check"] else ""))
    if result["sizing"]:
        print("\nsplit sizing (sgserve, end to end, one client):")
        print(sizing_table(result))
    for r, q in result["qps"].items():
        sysq = q.get("systems", {})
        print(f"\nQPS, {args.qps_clients} clients, {r} rows: " + (q.get("error") or ", ".join(
            f"{k} {v.get('qps')} (p99 {v.get('p99_ms')} ms)" for k, v in sysq.items())) +
            f"; other load {q.get('other_load_cores')} cores")
    print("\nissue 13 targets:")
    for line in verdicts(result):
        print(f"  {line}")


def main() -> int:
    args = parse_args()
    if args.build_model:
        print(json.dumps(build_text_cnn(args.build_model)))
        return 0
    C.sigterm_as_exit()
    base, info = ensure_text_cnn()
    model = S.ModelRef(kind=MODEL, name=MODEL, base=base, batch=1, info=info)
    systems = make_systems(model, args)
    result: dict[str, Any] = {
        "benchmark": "bench_split", "machine": C.machine_info(),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "params": {"model": dict(info, name=MODEL), "systems": list(systems),
                   "labels": {k: s.label for k, s in systems.items()}, "rows": args.rows,
                   "requests": args.requests, "warmup_requests": args.warmup_requests,
                   "sizing_rows": args.sizing_rows, "qps_rows": args.qps_rows, "qps_clients": args.qps_clients,
                   "qps_duration": args.qps_duration, "split_flags": args.split_flags,
                   "nosplit_flags": args.nosplit_flags, "tolerance": TOLERANCE},
        "latency": {}, "sizing": {}, "qps": {},
    }
    t0 = time.monotonic()
    C.wait_quiet(max_cores=0.3, timeout=10.0)
    stops: dict[str, Any] = {}
    try:
        with running(systems, args.start_timeout, stops):
            result["params"]["systems"] = list(systems)
            run_phases(systems, args, result)
    except KeyboardInterrupt:
        C.log("interrupted: writing what was measured")
        result["interrupted"] = True
    result["stops"] = stops
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["targets"] = verdicts(result)
    C.write_json(args.name, result)
    report(result, args)
    plot(result, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
