"""sgserve.client.Client against a real broker and echo workers."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from sgserve.client import Client, PredictResult
from sgserve.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable


def test_predict_metadata_status_ping(start_broker) -> None:
    server = start_broker(workers=2)
    with Client(server.endpoint, timeout=5) as client:
        assert client.ping()
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        s = np.array([b"a", b"bb"], dtype=object)
        out = client.predict("demo", {"x": x, "s": s})
        assert np.array_equal(out["x"], x) and out["x"].dtype == np.float32
        assert list(out["s"]) == [b"a", b"bb"]
        result = client.predict_full("demo", {"x": x}, version=1, routing_key="k", output_filter=["x"])
        assert isinstance(result, PredictResult)
        assert result.model == "demo" and result.version == 1 and result.worker in (0, 1)
        assert 0 < result.latency_s < 5
        meta = client.metadata("demo")
        assert meta["versions"] == [1, 2] and meta["version"] == 2 and "serving_default" in meta["signatures"]
        status = client.status()
        assert len(status["workers"]) == 2 and status["server"]["endpoint"] == server.endpoint


def test_typed_errors(start_broker) -> None:
    server = start_broker(workers=1)
    with Client(server.endpoint, timeout=5) as client:
        with pytest.raises(NotFound, match="available models: demo, other") as info:
            client.predict("nope", {"x": np.zeros(1, np.float32)})
        assert info.value.code == 404
        with pytest.raises(NotFound, match="available versions: 1, 2"):
            client.metadata("demo", version=5)
        with pytest.raises(InvalidArgument):
            client.predict("demo", {"x": np.zeros(1, np.float32)}, routing_key=1.5)  # type: ignore[arg-type]


def test_timeout_travels_and_late_reply_is_discarded(start_broker) -> None:
    server = start_broker(workers=1, worker_pipeline=1)
    with Client(server.endpoint) as client:
        with pytest.raises(DeadlineExceeded) as info:
            client.predict("demo", {"sleep_s": np.float32(0.6)}, timeout=0.2)
        assert info.value.code == 504
        # the next call on the same thread gets its own answer, not the late one
        out = client.predict("demo", {"x": np.ones(2, np.float32)}, timeout=5)
        assert np.array_equal(out["x"], np.ones(2, np.float32))


def test_many_threads_each_get_their_own_answer(start_broker) -> None:
    server = start_broker(workers=2, worker_pipeline=2)
    client = Client(server.endpoint, timeout=10)
    errors: list[BaseException] = []
    workers_seen: set[int] = set()

    def run(t: int) -> None:
        try:
            for i in range(40):
                x = np.full(4, t * 1000 + i, dtype=np.int64)
                result = client.predict_full("demo", {"x": x})
                assert np.array_equal(result.outputs["x"], x), (t, i, result.outputs)
                workers_seen.add(result.worker)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    client.close()
    assert not errors, errors[0]
    assert workers_seen == {0, 1}


def test_shutdown_then_unavailable(start_broker) -> None:
    server = start_broker(workers=1)
    client = Client(server.endpoint, timeout=2)
    client.shutdown()
    server.thread.join(10)
    assert server.rc == 0
    assert client.ping(timeout=0.3) is False
    with pytest.raises(DeadlineExceeded, match=server.endpoint):
        client.status(timeout=0.3)
    client.close()
    assert Unavailable.code == 503
