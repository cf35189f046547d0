"""Model lifecycle through the real CLI: versions appear and vanish on disk while clients send requests.

Every server here watches a base path that the test edits the way deploy tools do (copy, then
rename), polls it every 0.2 s, and runs 2 workers x 1 core. Responses name the version that
computed them and carry its bias (= the version number), so each check is on real values.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest

from sgserve.errors import NotFound, ServeError
from tests import lifecycle_models as lm
from tests.conftest import sgserve_segments
from tests.test_faults import cli

FAST = ["--workers", "2", "--cpus-per-worker", "1", "--file-system-poll-wait-seconds", "0.2"]
IDS = np.array([1, 5, 9, 19_999], dtype=np.int64)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("versions"))
    for v in (1, 2, 3):
        lm.build_version(d, v)
    return d


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every)


def versions(srv, model: str = "m") -> dict[int, dict[str, Any]]:
    with srv.client(5.0) as c:
        st = c.status()
    for m in st["model_status"]:
        if m["name"] == model:
            return {v["version"]: v for v in m["versions"]}
    return {}


def model_status(srv, model: str = "m") -> dict[str, Any]:
    with srv.client(5.0) as c:
        return next(m for m in c.status()["model_status"] if m["name"] == model)


def states(srv, model: str = "m") -> dict[int, str]:
    return {v: info["state"] for v, info in versions(srv, model).items()}


def own_segments(srv) -> set[str]:
    return {n for n in sgserve_segments() if n.startswith(f"sgserve_{srv.proc.pid}_")}


class Traffic:
    """Clients sending requests without a version, recording every answer, until stopped."""

    def __init__(self, srv, threads: int = 2, **predict_kw: Any) -> None:
        self.srv, self.kw = srv, predict_kw
        self.answers: list[tuple[float, int, int]] = []  # (time, version, worker)
        self.errors: list[str] = []
        self.wrong: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self) -> None:
        with self.srv.client(timeout=20.0) as c:
            while not self._stop.is_set():
                try:
                    r = c.predict_full("m", {"ids": IDS}, **self.kw)
                except ServeError as exc:
                    self.errors.append(str(exc))
                    continue
                if not np.allclose(r.outputs["y"], lm.expected(IDS, r.version), rtol=1e-6):
                    self.wrong.append(f"version {r.version}: {r.outputs['y']}")
                self.answers.append((time.monotonic(), r.version, r.worker))

    def versions_in_order(self) -> list[int]:
        return [v for _, v, _ in sorted(self.answers)]


def test_hot_swap_under_load_loses_nothing_and_shares_unchanged_tensors(start_server, store, tmp_path):
    base = str(tmp_path / "m")
    lm.publish(store, base, 1)
    srv = start_server(["--model-base-path", base] + FAST)
    v1_segments = set(versions(srv)[1]["segments"])
    with Traffic(srv) as traffic:
        wait_for("traffic", lambda: len(traffic.answers) > 20)
        lm.publish(store, base, 2)
        wait_for("version 2 AVAILABLE and version 1 END", lambda: states(srv) == {2: "AVAILABLE", 1: "END"})
        seen = len(traffic.answers)
        wait_for("more traffic", lambda: len(traffic.answers) > seen + 20)
    assert traffic.errors == [] and traffic.wrong == []
    order = traffic.versions_in_order()
    assert order[0] == 1 and order[-1] == 2
    # The switch is atomic: once version 2 answered, version 1 never did again (sorted by completion,
    # so allow only requests that were already in flight at the switch).
    first2 = order.index(2)
    assert order[first2:].count(1) <= 2 * 2, order[first2 - 5:first2 + 20]
    v2 = versions(srv)[2]
    # Incremental: the embedding table did not change, so version 2 maps version 1's bytes for it.
    assert v2["shared_bytes"] == lm.EMB_BYTES, v2
    assert v2["own_bytes"] < 4096, v2
    assert v2["workers"] == [0, 1]
    # Version 1 is END, but its segment still holds the table version 2 uses: exactly that stays.
    assert set(v2["segments"]) >= v1_segments
    assert own_segments(srv) == {s.lstrip("/") for s in v2["segments"]}


def test_corrupt_new_version_fails_old_keeps_serving_nothing_leaks(start_server, store, tmp_path):
    base = str(tmp_path / "m")
    lm.publish(store, base, 1)
    srv = start_server(["--model-base-path", base, "--max-num-load-retries", "0"] + FAST)
    before = own_segments(srv)
    bad = os.path.join(tmp_path, "bad")
    shutil.copytree(os.path.join(store, "2"), bad)
    data = os.path.join(bad, "variables", "variables.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with Traffic(srv) as traffic:
        wait_for("traffic", lambda: len(traffic.answers) > 10)
        os.rename(bad, os.path.join(base, "2"))
        wait_for("version 2 FAILED", lambda: states(srv).get(2) == "FAILED")
        seen = len(traffic.answers)
        wait_for("more traffic", lambda: len(traffic.answers) > seen + 10)
    assert traffic.errors == [] and traffic.wrong == []
    assert set(traffic.versions_in_order()) == {1}
    v = versions(srv)
    assert v[1]["state"] == "AVAILABLE" and v[1]["serving"]
    assert "corrupt or truncated checkpoint data" in v[2]["error"], v[2]
    assert own_segments(srv) == before  # the failed load left nothing in /dev/shm
    r = cli("status", "--endpoint", srv.endpoint)
    assert "FAILED" in r.stdout and "AVAILABLE" in r.stdout


def test_version_still_being_copied_is_retried_not_loaded_half_done(start_server, store, tmp_path):
    base = str(tmp_path / "m")
    lm.publish(store, base, 1)
    srv = start_server(["--model-base-path", base, "--max-num-load-retries", "20", "--load-retry-interval", "0.3"]
                       + FAST)
    half = os.path.join(base, "2")
    os.makedirs(half)
    shutil.copy(os.path.join(store, "2", "saved_model.pb"), half)  # variables/ not copied yet
    info = wait_for("a failed attempt", lambda: (versions(srv).get(2) or {}).get("error"))
    assert "retrying" in info and states(srv)[2] == "LOADING"
    with srv.client(10.0) as c:
        assert c.predict_full("m", {"ids": IDS}).version == 1
    shutil.copytree(os.path.join(store, "2", "variables"), os.path.join(half, "variables"))
    wait_for("version 2 AVAILABLE", lambda: states(srv).get(2) == "AVAILABLE")
    with srv.client(10.0) as c:
        r = c.predict_full("m", {"ids": IDS})
    assert r.version == 2 and np.allclose(r.outputs["y"], lm.expected(IDS, 2))


def test_removed_version_drains_then_unloads(start_server, store, tmp_path):
    base = str(tmp_path / "m")
    for v in (1, 2):
        lm.publish(store, base, v)
    srv = start_server(["--model-base-path", base, "--model-version-policy", "all"] + FAST)
    assert states(srv) == {1: "AVAILABLE", 2: "AVAILABLE"}
    with Traffic(srv, threads=1) as latest, Traffic(srv, threads=1, version=1) as pinned_v1:
        wait_for("traffic", lambda: len(latest.answers) > 10 and len(pinned_v1.answers) > 10)
        shutil.rmtree(os.path.join(base, "2"))
        wait_for("version 2 END", lambda: states(srv).get(2) == "END")
        seen = len(latest.answers)
        wait_for("more traffic", lambda: len(latest.answers) > seen + 10)
    assert pinned_v1.errors == [] and latest.errors == [] and latest.wrong == []
    order = latest.versions_in_order()
    assert order[0] == 2 and order[-1] == 1
    assert versions(srv)[1]["serving"]
    assert own_segments(srv) == {s.lstrip("/") for s in versions(srv)[1]["segments"]}
    with srv.client(5.0) as c, pytest.raises(NotFound, match="no available version 2"):
        c.predict("m", {"ids": IDS}, version=2)


def test_rollback_pins_an_older_version_and_unpin_returns(start_server, store, tmp_path):
    base = str(tmp_path / "m")
    for v in (1, 2):
        lm.publish(store, base, v)
    srv = start_server(["--model-base-path", base] + FAST)
    assert states(srv) == {2: "AVAILABLE"}
    with Traffic(srv) as traffic:
        wait_for("traffic", lambda: len(traffic.answers) > 10)
        r = cli("rollback", "m", "--to", "1", "--endpoint", srv.endpoint)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["serving_version"] == 1
        # The policy's version stays loaded (rolling forward again is instant) but does not serve.
        assert states(srv) == {1: "AVAILABLE", 2: "AVAILABLE"} and model_status(srv)["pinned"] == 1
        # A newer version arriving replaces the policy's version, not the pin.
        lm.publish(store, base, 3)
        wait_for("version 3 AVAILABLE, 2 END", lambda: states(srv) == {1: "AVAILABLE", 2: "END", 3: "AVAILABLE"})
        assert model_status(srv)["serving_version"] == 1
        r = cli("unpin", "m", "--endpoint", srv.endpoint)
        assert r.returncode == 0, r.stderr
        wait_for("version 3 serving", lambda: model_status(srv)["serving_version"] == 3)
        wait_for("version 1 END", lambda: states(srv).get(1) == "END")
    assert traffic.errors == [] and traffic.wrong == []
    order = traffic.versions_in_order()
    assert order[0] == 2 and 1 in order and order[-1] == 3
    r = cli("rollback", "m", "--to", "9", "--endpoint", srv.endpoint)
    assert r.returncode == 1 and "no version 9 on disk" in r.stderr


def test_worker_killed_during_swap_comes_back_with_the_new_version(start_server, store, tmp_path):
    base = str(tmp_path / "m")
    lm.publish(store, base, 1)
    srv = start_server(["--model-base-path", base, "--policy", "rr"] + FAST)
    lm.publish(store, base, 2)
    wait_for("version 2's segment written", lambda: versions(srv).get(2, {}).get("bytes", 0) > 0, every=0.02)
    victim = srv.worker_pids()[1]
    os.kill(victim, signal.SIGKILL)
    wait_for("version 2 AVAILABLE", lambda: states(srv).get(2) == "AVAILABLE")
    wait_for("worker 1 replaced", lambda: victim not in srv.worker_pids() and all(
        w["state"] == "READY" for w in _workers(srv)))
    with srv.client(10.0) as c:
        answers = {(r.version, r.worker) for r in (c.predict_full("m", {"ids": IDS}) for _ in range(8))}
    assert answers == {(2, 0), (2, 1)}
    wait_for("version 1 END", lambda: states(srv).get(1) == "END")


def _workers(srv) -> list[dict[str, Any]]:
    with srv.client(5.0) as c:
        return c.status()["workers"]


def test_resource_preserving_unloads_before_loading(start_server, store, tmp_path):
    base = str(tmp_path / "m")
    lm.publish(store, base, 1)
    srv = start_server(["--model-base-path", base, "--version-transition", "resource-preserving",
                        "--no-incremental-updates"] + FAST)
    lm.publish(store, base, 2)
    both = []

    def done() -> bool:
        s = states(srv)
        if s.get(1) == "AVAILABLE" and s.get(2) == "AVAILABLE":
            both.append(s)
        return s.get(2) == "AVAILABLE" and s.get(1) == "END"

    wait_for("version 2 AVAILABLE, 1 END", done, every=0.02)
    assert not both
    assert versions(srv)[2]["shared_bytes"] == 0  # --no-incremental-updates: a full copy


def warmup_of(srv, version: int) -> dict:
    """A version's warmup report, less its duration (checked here: it ran, so it took time)."""
    warmup = dict(versions(srv)[version]["warmup"])
    assert warmup.pop("seconds") > 0
    return warmup


def test_warmup_sources(start_server, store, tmp_path):
    base = str(tmp_path / "m")
    lm.publish(store, base, 1)
    lm.write_warmup(os.path.join(base, "1"), n=3)
    srv = start_server(["--model-base-path", base] + FAST)
    assert warmup_of(srv, 1) == {"requests": 3, "source": lm.write_warmup.__doc__ and os.path.join(
        base, "1", "assets.extra", "tf_serving_warmup_requests")}
    # A new version without a warmup file uses --warmup-file when given, else synthetic inputs.
    lm.publish(store, base, 2)
    wait_for("version 2 AVAILABLE", lambda: states(srv).get(2) == "AVAILABLE")
    # One synthetic request per batch size (the signature's first dimension is the batch).
    assert warmup_of(srv, 2) == {"requests": 4, "source": "synthetic inputs"}
    srv.stop()

    wfile = tmp_path / "warmup.jsonl"
    wfile.write_text('{"inputs": {"ids": [1, 2, 3]}}\n# comment\n{"model": "other", "inputs": {"x": [1]}}\n'
                     '{"model": "m", "inputs": {"ids": [4]}}\n')
    srv = start_server(["--model-base-path", str(tmp_path / "m"), "--warmup-file", str(wfile)] + FAST)
    assert warmup_of(srv, 2) == {"requests": 2, "source": str(wfile)}
    srv.stop()
    srv = start_server(["--model-base-path", str(tmp_path / "m"), "--no-model-warmup"] + FAST)
    assert versions(srv)[2]["warmup"]["requests"] == 0


def test_resolve_error_messages_name_what_exists(start_server, store, tmp_path):
    base = str(tmp_path / "m")
    lm.publish(store, base, 1)
    srv = start_server(["--model-base-path", base] + FAST)
    with srv.client(5.0) as c:
        with pytest.raises(NotFound, match=r"has no version 7; available versions: 1"):
            c.predict("m", {"ids": IDS}, version=7)
        with pytest.raises(NotFound, match=r"no version label 'canary'; labels: \(none\)"):
            c.predict("m", {"ids": IDS}, version_label="canary")
        with pytest.raises(NotFound, match=r"model 'x' is not served here; available models: m"):
            c.predict("x", {"ids": IDS})


def config_text(models: list[tuple[str, str, str, dict[str, int]]]) -> str:
    """TF Serving's ModelServerConfig text, as people write it by hand."""
    out = ["model_config_list {"]
    for name, base, policy, labels in models:
        out += ["  config {", f"    name: '{name}'", f'    base_path: "{base}"', "    model_platform: 'tensorflow'"]
        if policy:
            out.append(f"    model_version_policy {{ {policy} }}")
        for label, v in labels.items():
            out.append(f"    version_labels {{ key: '{label}' value: {v} }}")
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def test_config_file_models_labels_and_live_edits(start_server, store, models_dir, tmp_path):
    base = str(tmp_path / "m")
    for v in (1, 2):
        lm.publish(store, base, v)
    hpt = os.path.join(models_dir, "hpt")
    cfg = tmp_path / "models.config"
    cfg.write_text(config_text([("m", base, "specific { versions: 1 versions: 2 }", {"stable": 1, "canary": 2}),
                                ("hpt", hpt, "", {})]))
    srv = start_server(["--model-config-file", str(cfg), "--model-config-file-poll-wait-seconds", "0.2"] + FAST)
    st = {m["name"]: m for m in model_status_all(srv)}
    assert set(st) == {"m", "hpt"}
    assert {v["version"]: v["labels"] for v in st["m"]["versions"]} == {1: ["stable"], 2: ["canary"]}
    # Every worker serves every model; memory is one segment per version.
    assert all(v["workers"] == [0, 1] for m in st.values() for v in m["versions"])
    segs = {s.lstrip("/") for m in st.values() for v in m["versions"] for s in v["segments"]}
    assert own_segments(srv) == segs and len(segs) == 3
    with srv.client(10.0) as c:
        assert c.predict_full("m", {"ids": IDS}, version_label="stable").version == 1
        r = c.predict_full("m", {"ids": IDS}, version_label="canary")
        assert r.version == 2 and np.allclose(r.outputs["y"], lm.expected(IDS, 2))
        assert c.predict_full("m", {"ids": IDS}).version == 2
        assert np.allclose(c.predict("hpt", {"x": np.array([2.0], np.float32)})["y"], [3.0])
        with pytest.raises(NotFound, match=r"no version label 'beta'; labels: canary -> 2, stable -> 1"):
            c.predict("m", {"ids": IDS}, version_label="beta")

    # A label moved to a version that is not loaded: refused, the running config stays.
    cfg.write_text(config_text([("m", base, "specific { versions: 1 versions: 2 }", {"stable": 1, "canary": 3}),
                                ("hpt", hpt, "", {})]))
    err = wait_for("the config error", lambda: status_all(srv).get("config_error"))
    assert "version label 'canary' points at version 3" in err, err
    with srv.client(10.0) as c:
        assert c.predict_full("m", {"ids": IDS}, version_label="canary").version == 2
    # A malformed file: an error in status naming the line; still serving.
    cfg.write_text("model_config_list {\n  config {\n    name: 'm'\n    bogus_field: 1\n  }\n}\n")
    err = wait_for("the parse error", lambda: "bogus_field" in (status_all(srv).get("config_error") or "")
                   and status_all(srv)["config_error"])
    assert ":4:" in err
    r = cli("status", "--endpoint", srv.endpoint)
    assert "model config NOT applied" in r.stdout
    # A good edit: hpt removed, another model added; m keeps serving throughout.
    other = str(tmp_path / "other")
    lm.publish(store, other, 3)
    cfg.write_text(config_text([("m", base, "specific { versions: 1 versions: 2 }", {"stable": 1, "canary": 2}),
                                ("other", other, "latest { num_versions: 1 }", {})]))
    wait_for("other AVAILABLE, hpt gone",
             lambda: {m["name"] for m in model_status_all(srv)} == {"m", "other"} and
             model_status_all(srv)[1]["versions"][0]["state"] == "AVAILABLE")
    assert status_all(srv)["config_error"] is None
    with srv.client(10.0) as c:
        assert c.predict_full("other", {"ids": IDS}).version == 3
        with pytest.raises(NotFound, match="model 'hpt' is not served here; available models: m, other"):
            c.predict("hpt", {"x": np.array([2.0], np.float32)})
    # other shares nothing with m (a different model), hpt's segment is gone.
    segs = {s.lstrip("/") for m in model_status_all(srv) for v in m["versions"] for s in v["segments"]}
    wait_for("hpt's segment unlinked", lambda: own_segments(srv) == segs)


def status_all(srv) -> dict[str, Any]:
    with srv.client(5.0) as c:
        return c.status()


def model_status_all(srv) -> list[dict[str, Any]]:
    return status_all(srv)["model_status"]


@pytest.mark.parametrize("text,fragment", [
    ("model_config_list { config { name: 'badcfg' base_path: '/nonexistent' } ", "syntax"),
    ("model_config_list { config { name: 'badcfg' base_path: 'BASE' version_labels { key: 'old' value: 1 } "
     "model_version_policy { specific { versions: 2 } } } }", "version label 'old' points at version 1"),
    ("model_config_list { config { name: 'badcfg' base_path: '/nonexistent/m' } }", "does not exist"),
    ("model_config_list { config { name: 'badcfg' base_path: 'BASE' version_labels { key: 'old' value: 1 } } }",
     "version label 'old' points at version 1, which is not available (not loaded)"),
])
def test_bad_config_file_at_start_is_a_clear_error(store, tmp_path, text, fragment):
    base = str(tmp_path / "m")
    for v in (1, 2):
        lm.publish(store, base, v)
    cfg = tmp_path / "bad.config"
    cfg.write_text(text.replace("BASE", base))
    before = sgserve_segments()
    r = cli("start", "--model-config-file", str(cfg), "--endpoint", "tcp://127.0.0.1:1")
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr.lower() or fragment in r.stderr, r.stderr
    assert {n for n in sgserve_segments() - before if "_badcfg_" in n} == set()
