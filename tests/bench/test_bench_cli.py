"""`sgserve bench` through the real CLI: against a real demo server, and against a small real HTTP
server in this process that speaks TF Serving's REST API for a fake model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from sgserve.bench import loadgen
from tests.conftest import free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sgserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def bench_json(*args: str) -> tuple[dict, subprocess.CompletedProcess]:
    """Runs `sgserve bench ... --json -` and returns the parsed report (stdout is pure JSON then)."""
    r = run_cli("bench", *args, "--json", "-")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r


def assert_sane(p: dict) -> None:
    assert p["ok"] > 0 and p["errors"] == 0 and p["error_codes"] == {}, p
    assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] <= p["p999_ms"] <= p["max_ms"], p
    assert p["qps"] > 0 and p["mean_ms"] > 0


# --------------------------------------------------------------------------- against sgserve
def test_concurrency_sweep_writes_one_point_per_value(demo_server, tmp_path):
    out = tmp_path / "sweep.json"
    r = run_cli("bench", "demo", "--endpoint", demo_server.endpoint, "-c", "1,4", "-d", "1", "--warmup", "0.2",
                "--json", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["config"]["concurrency"] == [1, 4] and rep["config"]["mode"] == "closed"
    assert rep["machine"]["cpu_count"] >= 1 and rep["machine"]["platform"]
    assert [p["concurrency"] for p in rep["points"]] == [1, 4]
    for p in rep["points"]:
        assert_sane(p)
        assert p["mode"] == "closed" and p["batch_size"] == 1 and p["offered_rate"] is None
        assert set(p["workers_seen"]) == {"0", "1"}
    lines = r.stdout.strip().splitlines()
    assert "QPS" in lines[0] and "p99 ms" in lines[0] and len(lines) == 3
    assert "c=1" in lines[1] and "c=4" in lines[2]
    assert "[bench]" in r.stderr


def test_open_loop_keeps_the_offered_rate(demo_server):
    rep, r = bench_json("demo", "--endpoint", demo_server.endpoint, "--rate", "100", "-d", "2", "--warmup", "0.3")
    (p,) = rep["points"]
    assert_sane(p)
    assert p["mode"] == "open" and p["offered_rate"] == 100 and p["schedule"] == "uniform"
    assert 80 <= p["achieved_rate"] <= 120 and 160 <= p["sent"] <= 240, p
    assert p["late"] <= 0.1 * p["sent"] and p["unsent"] == 0, p
    assert "sent/s" in r.stderr and "late" in r.stderr  # the table went to stderr, stdout is JSON


def test_batch_size_sweep_reports_rows_per_second(demo_server):
    rep, _ = bench_json("demo", "--endpoint", demo_server.endpoint, "-c", "2", "-b", "1,8", "-d", "1",
                        "--warmup", "0.2", "-q")
    assert [p["batch_size"] for p in rep["points"]] == [1, 8]
    for p in rep["points"]:
        assert_sane(p)
    big = rep["points"][1]
    assert big["rows_per_s"] == pytest.approx(8 * big["qps"], rel=0.01)


def test_plot_writes_a_png(demo_server, tmp_path):
    png = tmp_path / "lat.png"
    r = run_cli("bench", "demo", "--endpoint", demo_server.endpoint, "-c", "1,2", "-d", "0.5", "--warmup", "0.1",
                "--plot", str(png), "-q")
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_compare_a_server_with_itself_interleaved(demo_server):
    ep = demo_server.endpoint
    rep, r = bench_json("demo", "--endpoint", ep, "--compare", ep, "-c", "2", "-d", "2", "--slice", "0.5",
                        "--warmup", "0.2")
    assert [p["endpoint_index"] for p in rep["points"]] == [0, 1]
    for p in rep["points"]:
        assert_sane(p)
    (c,) = rep["comparisons"]
    assert c["label"] == "B/A" and c["concurrency"] == 2
    for k in ("qps_ratio", "p50_ratio", "p99_ratio"):
        assert 0.5 <= c[k] <= 2.0, c
    assert "B/A at c=2" in r.stderr


def test_down_sgserve_endpoint_fails_fast():
    t0 = time.monotonic()
    r = run_cli("bench", "demo", "-d", "1", "--timeout", "1", "--endpoint", f"tcp://127.0.0.1:{free_port()}")
    assert r.returncode == 1
    assert "no server answering at tcp://127.0.0.1:" in r.stderr
    assert time.monotonic() - t0 < 15


# --------------------------------------------------------------------------- against TF Serving REST
FAKE_METADATA = {
    "model_spec": {"name": "fake", "signature_name": "", "version": "3"},
    "metadata": {"signature_def": {"signature_def": {"serving_default": {
        "inputs": {
            "x": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1", "name": ""}, {"size": "3", "name": ""}],
                                                       "unknown_rank": False}, "name": "serving_default_x:0"},
            "ids": {"dtype": "DT_INT64", "tensor_shape": {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False},
                    "name": "serving_default_ids:0"}},
        "outputs": {"y": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1", "name": ""}],
                                                               "unknown_rank": False}, "name": "Identity:0"}},
        "method_name": "tensorflow/serving/predict"}}}},
}


class FakeTFServing(BaseHTTPRequestHandler):
    """TF Serving's two REST routes for models "fake" (always answers) and "busy" (429 every other time)."""

    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving
    disable_nagle_algorithm = True
    server: "FakeServer"

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path in ("/v1/models/fake/metadata", "/v1/models/busy/metadata"):
            self.reply(200, FAKE_METADATA)
        else:
            self.reply(404, {"error": f"Servable not found for request: {self.path}"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path not in ("/v1/models/fake:predict", "/v1/models/busy:predict"):
            return self.reply(404, {"error": "not found"})
        with self.server.lock:
            self.server.predicts += 1
            n = self.server.predicts
        if self.path.startswith("/v1/models/busy") and n % 2:
            return self.reply(429, {"error": "busy"})
        inp = body.get("inputs", {})
        x, ids = inp.get("x"), inp.get("ids")
        if body.get("signature_name") != "serving_default" or set(inp) != {"x", "ids"} or len(x) != len(ids) \
                or any(len(row) != 3 for row in x) or not all(isinstance(i, int) for i in ids):
            return self.reply(400, {"error": "bad request"})
        self.reply(200, {"outputs": {"y": [sum(row) + i for row, i in zip(x, ids)]}})


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeTFServing)
        self.lock = threading.Lock()
        self.connections = 0
        self.predicts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def tf_serving() -> Iterator[FakeServer]:
    srv = FakeServer()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_http_endpoint_speaks_tf_serving_rest(tf_serving):
    rep, _ = bench_json("fake", "--endpoint", tf_serving.url, "-c", "1,2", "-b", "4", "-d", "1", "--warmup", "0.2")
    assert [p["concurrency"] for p in rep["points"]] == [1, 2]
    for p in rep["points"]:
        assert_sane(p)
        assert p["workers_seen"] == {} and p["rows_per_s"] == pytest.approx(4 * p["qps"], rel=0.01)
    # one keep-alive connection per sender thread (1, then 2) plus the metadata request
    assert tf_serving.connections <= 4 and tf_serving.predicts > 100


def test_http_refusals_are_counted_and_the_schedule_kept(tf_serving):
    rep, _ = bench_json("busy", "--endpoint", tf_serving.url, "--rate", "100", "-d", "1.5", "--warmup", "0.2",
                        "--schedule", "poisson")
    (p,) = rep["points"]
    assert p["schedule"] == "poisson" and 80 <= p["achieved_rate"] <= 120, p
    assert p["ok"] > 0 and p["error_codes"].keys() == {"429"}
    assert p["error_codes"]["429"] == pytest.approx(p["sent"] / 2, abs=2)


def test_down_http_endpoint_fails_fast():
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = run_cli("bench", "fake", "-d", "1", "--timeout", "2", "--endpoint", url)
    assert r.returncode == 1
    assert f"no server answering at {url} (connection refused)" in r.stderr
    assert time.monotonic() - t0 < 10


def test_python_api_against_http(tf_serving):
    cfg = loadgen.BenchConfig(endpoint=tf_serving.url, model="fake", concurrency=2, requests=50, duration=None,
                              warmup=0.0, batch_size=[1, 3])
    results = loadgen.run_points(cfg, progress=False)
    assert [(r.batch_size, r.ok) for r in results] == [(1, 50), (3, 50)]
    with pytest.raises(ValueError):
        loadgen.run_bench(cfg, progress=False)  # two points: run_points' job
    one = loadgen.run_bench(loadgen.BenchConfig(endpoint=tf_serving.url, model="fake", concurrency=1,
                                                requests=20, duration=None, warmup=0.0), progress=False)
    assert one.ok == 20 and one.errors == 0
    report = loadgen.make_report(cfg, results)
    assert json.loads(json.dumps(report))["points"][1]["batch_size"] == 3


def test_tf_serving_metadata_becomes_a_signature():
    meta = json.loads(json.dumps(FAKE_METADATA))
    meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["s"] = {
        "dtype": "DT_STRING", "tensor_shape": {"unknown_rank": True}}
    sig = loadgen.signature_from_tfserving(meta, "serving_default")
    assert sig["inputs"] == {"x": {"dtype": "float32", "shape": [-1, 3]}, "ids": {"dtype": "int64", "shape": [-1]},
                             "s": {"dtype": "string", "shape": None}}
    with pytest.raises(KeyError):
        loadgen.signature_from_tfserving(meta, "other")


# --------------------------------------------------------------------------- progress display
def test_progress_is_plain_lines_off_a_terminal():
    import io

    from sgserve.bench.progress import BenchProgress

    out = io.StringIO()
    show = BenchProgress(True, stream=out)
    assert not show.tty
    show.update("1/1 tcp://h:1 c=1 b=1", 0.5, 2.0, "warmup 0.5/2 s")
    show.update("1/1 tcp://h:1 c=1 b=1", 0.6, 2.0, "warmup 0.6/2 s")  # within PROGRESS_LOG_S: not shown
    show.update("1/1 tcp://h:1 c=1 b=1", 1.0, 1.0, "done, 100 QPS", final=True)
    show.note("warning: slow")
    show.close()
    assert out.getvalue().splitlines() == ["[bench] 1/1 tcp://h:1 c=1 b=1: warmup 0.5/2 s",
                                           "[bench] 1/1 tcp://h:1 c=1 b=1: done, 100 QPS", "[bench] warning: slow"]
    quiet = io.StringIO()
    BenchProgress(False, stream=quiet).update("x", 1, 1, "done", final=True)
    assert quiet.getvalue() == ""


def test_progress_draws_bars_that_keep_the_final_numbers_on_a_terminal():
    import io

    from rich.console import Console

    from sgserve.bench.progress import BenchProgress

    out = io.StringIO()
    show = BenchProgress(True, console=Console(file=out, force_terminal=True, width=120, color_system=None))
    assert show.tty
    for head in ("1/2 A: tcp://h:1 c=1 b=1", "1/2 B: tcp://h:2 c=1 b=1"):
        show.update(head, 0.5, 1.0, "0.5/1 s, 10 answers")
        show.update(head, 1.0, 1.0, f"done, {len(head)} QPS", final=True)
    show.close()
    text = out.getvalue()
    assert "[bench] 1/2 A: tcp://h:1 c=1 b=1" in text and "done, 24 QPS" in text  # markup-like text kept verbatim
    assert "[bench] 1/2 B: tcp://h:2 c=1 b=1" in text
    assert "\x1b[" in text  # drawn in place with cursor moves, not as log lines
