"""The short live fuzz: >= 10,000 generated messages over the native, REST and gRPC front doors of
one server started with the real CLI (tests/fuzz/live.py says what is sent and what counts as an
answer). The long form is bench/fuzz_server.py.
"""
from __future__ import annotations

import http.client
import os
from typing import Any, Iterator

import pytest

from tests.conftest import ServerProcess, free_port, group_alive, wait_until
from tests.fuzz import live

MESSAGES = int(os.environ.get("SGSERVE_FUZZ_MESSAGES", "10000"))
MEMORY_BOUND = 64 * 1024 * 1024  # RSS growth of the whole server over the run (measured: see the report)


def model_config(models_dir: str) -> str:
    entries = "".join(f'  config {{ name: "{m}" base_path: "{os.path.join(models_dir, m)}" '
                      f'model_platform: "tensorflow" }}\n' for m in live.MODELS)
    return f"model_config_list {{\n{entries}}}\n"


def start_fuzz_server(config_path: str, cache_dir: str) -> ServerProcess:
    grpc_port, rest_port = free_port(), free_port()
    s = ServerProcess([f"--model_config_file={config_path}", "--port", str(grpc_port), "--rest-api-port",
                       str(rest_port), "--workers", "2", "--cpus-per-worker", "1", "--split-min-rows", "0",
                       "--max-request-bytes", str(8 * 1024 * 1024)], cache_dir=cache_dir)
    s.grpc_port, s.rest_port = grpc_port, rest_port
    return s


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, models_dir) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("fuzz")
    config = d / "models.config"
    config.write_text(model_config(models_dir))
    s = start_fuzz_server(str(config), str(d / "cache"))
    s.drain = live.PipeDrain(s.proc)
    try:
        s.wait_ready(240)
        wait_until(lambda: _doors(s), 30, "the REST and gRPC front doors to answer")
        yield s
    finally:
        s.stop()
    assert not group_alive(s.proc.pid)


def _doors(s: ServerProcess) -> bool:
    doors = live.Doors(s.endpoint, s.rest_port, s.grpc_port, reply_timeout=2.0)
    try:
        doors.canaries(live.FuzzReport())
        return True
    finally:
        doors.close()


@pytest.fixture(scope="module")
def fuzz_report(fuzz_server) -> live.FuzzReport:
    doors = live.Doors(fuzz_server.endpoint, fuzz_server.rest_port, fuzz_server.grpc_port)
    try:
        report = live.run(doors, fuzz_server.proc.pid, MESSAGES, seed=11)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nserver log tail:\n{fuzz_server.drain.tail()}") from None
    finally:
        doors.close()
    report.log_lines = fuzz_server.drain.count
    return report


def test_every_malformed_message_gets_a_specific_error_and_the_server_keeps_serving(fuzz_report) -> None:
    r = fuzz_report
    print("fuzz:", r.summary())
    assert r.total >= MESSAGES and all(r.tried[d] > MESSAGES // 10 for d in ("zmq", "rest", "grpc")), r.tried
    assert not r.bad, f"{len(r.bad)} messages got no specific error; first: {r.bad[:5]}"
    assert r.canaries >= 3 * (MESSAGES // 500)


def test_no_process_is_replaced_and_memory_stays_bounded(fuzz_report) -> None:
    r = fuzz_report
    assert r.pids_before and r.pids_after == r.pids_before, (r.pids_before, r.pids_after)
    assert r.memory_delta < MEMORY_BOUND, f"the server grew {r.memory_delta / 2**20:.1f} MiB"


def _known(report: live.FuzzReport, bug: str) -> dict[Any, int]:
    """Answer label -> count of the messages that hit ``bug``."""
    return {label: n for (b, label), n in report.known.items() if b == bug}


def test_shapes_numpy_cannot_hold_get_a_4xx(fuzz_report) -> None:
    answers = _known(fuzz_report, live.HUGE_EMPTY)
    assert answers and set(answers) <= {400, "INVALID_ARGUMENT"}, answers


def test_undecodable_grpc_requests_get_invalid_argument(fuzz_report) -> None:
    """Corrupted bytes that no longer parse are INVALID_ARGUMENT, never grpc's UNKNOWN; corruptions
    that still parse (protobuf is lenient) get whatever the request they became deserves."""
    answers = _known(fuzz_report, live.GRPC_UNDECODABLE)
    assert answers.get("INVALID_ARGUMENT") and "UNKNOWN" not in answers, answers


def test_string_elements_that_are_not_bytes_get_a_400(fuzz_report) -> None:
    answers = _known(fuzz_report, live.STRING_REPR)
    assert answers and 200 not in answers, answers


@pytest.mark.parametrize("path", ["/v1/models/hpt/versions/99999999999999999999",
                                  "/v1/models/hpt/versions/99999999999999999999/metadata"])
def test_rest_version_past_int64_is_a_4xx(fuzz_server, path: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", fuzz_server.rest_port, timeout=10)
    try:
        conn.request("GET", path)
        status = conn.getresponse().status
    finally:
        conn.close()
    assert status in (400, 404), status
