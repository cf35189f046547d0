"""Scatter-gather through the real CLI: a big request split across the idle workers of a real
server answers what the rows answer one by one, and a worker killed during a split request leaves
one answer, never two and never none."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import numpy as np

from sgserve.client import Client
from sgserve.errors import ServeError
from tests import split_models
from tests.conftest import demo_inputs

SPLIT = ["--workers", "2", "--cpus-per-worker", "1", "--split-min-rows", "8"]


def test_split_answers_equal_the_rows_run_alone_and_status_counts_them(start_server) -> None:
    server = start_server(SPLIT)
    inputs = demo_inputs(64, seed=3)
    with Client(server.endpoint, timeout=30) as c:
        split = c.predict_full("demo", inputs)
        alone = [c.predict_full("demo", {k: v[i:i + 1] for k, v in inputs.items()}) for i in range(0, 64, 7)]
        small = c.predict_full("demo", {k: v[:7] for k, v in inputs.items()})
        status = c.status()
    assert split.parts == 2 and all(r.parts == 1 for r in alone) and small.parts == 1
    for name, got in split.outputs.items():
        assert got.shape[0] == 64
        want = np.concatenate([r.outputs[name] for r in alone])
        np.testing.assert_allclose(got[::7], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[:7], small.outputs[name], rtol=1e-5, atol=1e-6)
    assert status["split"] == {"min_rows": 8, "requests": 1, "parts": 2}
    [version] = [v for m in status["model_status"] for v in m["versions"]]
    assert version["split"] and all(why is None for why in version["split"].values())


def test_sgserve_bench_shows_which_batch_sizes_were_split(start_server) -> None:
    server = start_server(SPLIT)
    r = subprocess.run([sys.executable, "-m", "sgserve.cli", "bench", "demo", "--endpoint", server.endpoint,
                        "-c", "1", "-b", "1,128", "-d", "1", "--warmup", "0.2", "-q"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(ln for ln in lines if "split %" in ln)
    rows = [ln.split() for ln in lines[lines.index(header) + 1:] if ln.strip()]
    assert [(row[2], row[-1]) for row in rows] == [("1", "0"), ("128", "100")], r.stdout


def test_a_cross_row_signature_is_detected_at_load_and_served_unsplit(start_server, tmp_path) -> None:
    base = split_models.build_cross_row(str(tmp_path / "cross"))
    server = start_server(SPLIT + ["--model-base-path", base])
    x = np.arange(32, dtype=np.float32).reshape(16, 2)
    with Client(server.endpoint, timeout=30) as c:
        centered = c.predict_full("cross", {"x": x}, signature="centered")
        doubled_only = c.predict_full("cross", {"x": x}, signature="batch_softmax")
        [version] = [v for m in c.status()["model_status"] for v in m["versions"]]
    assert centered.parts == 1 and doubled_only.parts == 1
    h = x @ np.array([[1.0, -1.0], [0.5, 2.0]], np.float32)
    np.testing.assert_allclose(centered.outputs["centered"], h - h.mean(axis=0), rtol=1e-5, atol=1e-5)
    verdicts = version["split"]
    assert "output 'centered'" in verdicts["centered"] and "output 'p'" in verdicts["batch_softmax"]
    assert "no leading batch dimension" in verdicts["row_count"] or "scalar" in verdicts["row_count"]


def test_a_worker_killed_during_split_requests_leaves_exactly_one_answer_each(start_server) -> None:
    server = start_server(SPLIT)
    inputs = demo_inputs(4096, seed=1)
    answers: list[object] = []

    def client() -> None:
        with Client(server.endpoint, timeout=30) as c:
            for _ in range(20):
                try:
                    answers.append(c.predict_full("demo", inputs, timeout=20).parts)
                except ServeError as exc:
                    answers.append(exc.code)

    thread = threading.Thread(target=client)
    thread.start()
    with Client(server.endpoint, timeout=10) as admin:
        pid = admin.status()["workers"][1]["pid"]
        while len(answers) < 3 and thread.is_alive():
            thread.join(0.05)
        os.kill(pid, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive() and len(answers) == 20, answers
    assert all(a in (1, 2, 503) for a in answers), answers  # retried part, or 503; never hung or doubled


def test_parts_join_batches_with_server_side_batching(start_server, tmp_path) -> None:
    params = tmp_path / "batching.txt"
    params.write_text("max_batch_size { value: 256 }\nbatch_timeout_micros { value: 0 }\n")
    server = start_server(SPLIT + ["--enable-batching", "--batching-parameters-file", str(params)])
    inputs = demo_inputs(64, seed=5)
    with Client(server.endpoint, timeout=30) as c:
        split = c.predict_full("demo", inputs)
        alone = c.predict_full("demo", {k: v[:7] for k, v in inputs.items()})
    assert split.parts == 2 and alone.parts == 1
    for name, got in split.outputs.items():
        np.testing.assert_allclose(got[:7], alone.outputs[name], rtol=1e-5, atol=1e-6)
