"""Logs a person can read: every sgserve process logs in one format (time, level, role, pid,
message), or JSON lines with --log-format json, and TensorFlow's start-up chatter shows only at
--log-level debug. Real servers started through the real CLI."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from sgserve import process
from tests.conftest import demo_inputs

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                       r"(broker|zygote|loader|worker \d+) \[(\d+)\] \S")
ROLE = re.compile(r"^(broker|zygote|loader|worker \d+)$")
# What TensorFlow writes at start-up when nothing hides it.
CHATTER = ("absl::InitializeLog", "oneDNN custom operations", "port.cc", "cpu_feature_guard", "deprecat")


@pytest.fixture
def tf_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment a person has: no TF_CPP_MIN_LOG_LEVEL (conftest sets one for the suite), no
    inherited sgserve log settings."""
    for name in ("TF_CPP_MIN_LOG_LEVEL", "SGSERVE_LOG_LEVEL", "SGSERVE_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)


def serve_once(start_server, args: list[str], env: dict[str, str] | None = None) -> tuple[list[str], dict]:
    """Start a demo server, answer one request, stop it; its stderr lines and its status."""
    srv = start_server(args, env=env)
    with srv.client(30.0) as c:
        c.predict("demo", demo_inputs(2))
        status = c.status()
    assert srv.stop() == 0, srv.output
    return [ln for ln in srv.output.splitlines() if ln.strip()], status


@pytest.mark.usefixtures("tf_defaults")
def test_plain_start_logs_one_format_and_no_tensorflow_chatter(start_server) -> None:
    lines, _ = serve_once(start_server, [])
    chatter = [ln for ln in lines if any(c in ln for c in CHATTER)]
    assert not chatter, "\n".join(chatter)
    bad = [ln for ln in lines if not TEXT_LINE.match(ln)]
    assert not bad, "lines not in the log format:\n" + "\n".join(bad)
    assert any("serving 'demo' version 1" in ln and " broker " in ln for ln in lines), "\n".join(lines)


@pytest.mark.usefixtures("tf_defaults")
def test_json_lines_carry_role_and_pid_of_broker_and_workers(start_server) -> None:
    # The format through its environment variable, the level through its flag.
    lines, status = serve_once(start_server, ["--log-level", "info"], env={"SGSERVE_LOG_FORMAT": "json"})
    records = []
    for ln in lines:
        try:
            records.append(json.loads(ln))
        except ValueError:
            pytest.fail(f"not a JSON line: {ln!r}\nall lines:\n" + "\n".join(lines))
    for r in records:
        assert set(r) >= {"time", "level", "role", "pid", "logger", "message"}, r
        assert ROLE.match(r["role"]) and isinstance(r["pid"], int), r
    broker_pids = {r["pid"] for r in records if r["role"] == "broker"}
    assert broker_pids == {status["server"]["pid"]}
    worker_pids = {r["role"]: r["pid"] for r in records if r["role"].startswith("worker ")}
    assert worker_pids == {f"worker {w['index']}": w["pid"] for w in status["workers"]}, records


@pytest.mark.usefixtures("tf_defaults")
def test_debug_shows_tensorflow_start_up_messages(start_server) -> None:
    lines, _ = serve_once(start_server, ["--log-level", "debug", "--workers", "1"])
    assert any("oneDNN custom operations" in ln or "absl::InitializeLog" in ln for ln in lines), "\n".join(lines)
    assert any(TEXT_LINE.match(ln) and " DEBUG " in ln for ln in lines)


def test_child_env_quiets_tensorflow_unless_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.setenv("SGSERVE_LOG_LEVEL", "warning")
    assert process.child_env()["TF_CPP_MIN_LOG_LEVEL"] == "2"
    monkeypatch.setenv("SGSERVE_LOG_LEVEL", "debug")
    assert process.child_env()["TF_CPP_MIN_LOG_LEVEL"] == "0"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")  # a person's own choice wins
    assert process.child_env()["TF_CPP_MIN_LOG_LEVEL"] == "1"


def test_chatter_filter_applies_the_tensorflow_level() -> None:
    data = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            b"I0000 00:00:1796168583.102744   17007 port.cc:153] oneDNN custom operations are on.\n"
            b"W0601 12:00:01.123456   17007 x.cc:1] a warning\n"
            b"E0601 12:00:01.123456   17007 x.cc:2] an error\n"
            b"Traceback (most recent call last):\n")
    assert process.without_tensorflow_chatter(data, 2) == (b"E0601 12:00:01.123456   17007 x.cc:2] an error\n"
                                                           b"Traceback (most recent call last):\n")
    assert process.without_tensorflow_chatter(data, 1).count(b"\n") == 3
    assert process.without_tensorflow_chatter(data, 3) == b"Traceback (most recent call last):\n"


def test_quiet_import_of_tensorflow_prints_nothing() -> None:
    code = ("import sys\nfrom sgserve import process\nwith process.tensorflow_import_quiet():\n"
            "    import tensorflow\nprint('in stderr', file=sys.stderr)\n")
    env = {**process.child_env(), "TF_CPP_MIN_LOG_LEVEL": "2"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "in stderr\n"
