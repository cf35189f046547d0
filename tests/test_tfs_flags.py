"""TF Serving's flag spellings on `sgserve start` (sgserve/tfs_flags.py): a tensorflow_model_server launch
line runs unchanged, with the same meaning; TF Serving's flags that mean nothing here are accepted with
one warning; a misspelled flag is refused with the nearest name. The label test at the end runs
--allow_version_labels_for_unavailable_models against a real server."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import click
import numpy as np
import pytest

from sgserve import settings, tfs_flags
from sgserve.config import ServerConfig
from sgserve.errors import NotFound
from tests import lifecycle_models as lm
from tests.conftest import ServerProcess, free_port, group_alive, sgserve_segments, wait_until
from tests.test_settings import start_params

IDS = np.array([1, 5, 9, 19_999], dtype=np.int64)


def config_of(args: list[str]) -> ServerConfig:
    """The ServerConfig `sgserve start ARGS` builds, through the real group and command."""
    return settings.config_from_options(start_params(args))


def run_start(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sgserve.cli", "start", *args], capture_output=True, text=True,
                          timeout=60)


# -- accepted spellings -------------------------------------------------------------------------------
def test_tfs_spellings_reach_server_config() -> None:
    c = config_of(["--port=8500", "--rest_api_port", "8501", "--rest_api_num_threads=2",
                   "--rest_api_timeout_in_ms=5000", "--model_name=ranker", "--model_base_path", "/models/ranker",
                   "--file_system_poll_wait_seconds=3", "--enable_batching", "--batching_parameters_file=/b.txt",
                   "--enable_model_warmup=false", "--max_num_load_retries=2", "--monitoring_config_file=/m.txt",
                   "--ssl_config_file", "/s.txt", "--allow_version_labels_for_unavailable_models=true"])
    assert (c.port, c.rest_api_port, c.rest_api_num_threads, c.rest_api_timeout_in_ms) == (8500, 8501, 2, 5000)
    assert (c.model_name, c.model_base_path, c.file_system_poll_wait_seconds) == ("ranker", "/models/ranker", 3.0)
    assert (c.enable_batching, c.batching_parameters_file, c.enable_model_warmup) == (True, "/b.txt", False)
    assert (c.max_num_load_retries, c.monitoring_config_file, c.ssl_config_file) == (2, "/m.txt", "/s.txt")
    assert c.allow_version_labels_for_unavailable_models is True


def test_tfs_units_and_zero_defaults_are_converted() -> None:
    c = config_of(["--load_retry_interval_micros=1500000", "--tensorflow_intra_op_parallelism=4",
                   "--tensorflow_inter_op_parallelism", "3"])
    assert (c.load_retry_interval, c.intra_op_threads, c.inter_op_threads) == (1.5, 4, 3)
    # TF Serving: a negative retry interval does not wait; 0 threads lets TensorFlow choose (sgserve's default).
    c = config_of(["--load_retry_interval_micros", "-1", "--tensorflow_intra_op_parallelism=0",
                   "--tensorflow_inter_op_parallelism=0", "--cpus-per-worker", "1"])
    assert (c.load_retry_interval, c.intra_op_threads, c.inter_op_threads) == (0.0, None, None)
    assert (c.intra_threads(), c.inter_threads()) == (1, 1)
    with pytest.raises(click.BadParameter, match="'1.5' is not an integer number of microseconds"):
        config_of(["--load_retry_interval_micros=1.5"])


@pytest.mark.parametrize("args, expected", [
    (["--enable_batching"], True), (["--enable_batching=true"], True), (["--enable_batching=TRUE"], True),
    (["--enable_batching=1"], True), (["--enable_batching=false"], False), (["--enable_batching=0"], False),
    (["--enable-batching=true"], True), (["--enable-batching=false"], False), (["--no-enable-batching"], False),
    (["--enable_batching", "--enable_batching=false"], False),  # the last one wins, as in TF Serving
])
def test_boolean_values(args: list[str], expected: bool) -> None:
    assert config_of(args).enable_batching is expected


def test_sgserve_booleans_take_values_and_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    c = config_of(["--enable-model-warmup=false", "--incremental-updates=0", "--allow-oversubscribe=true"])
    assert (c.enable_model_warmup, c.incremental_updates, c.allow_oversubscribe) == (False, False, True)
    assert config_of(["--no_model_warmup"]).enable_model_warmup is False
    monkeypatch.setenv("SGSERVE_ENABLE_BATCHING", "1")
    assert config_of([]).enable_batching is True
    assert config_of(["--enable_batching=false"]).enable_batching is False  # the command line wins


def test_underscore_spelling_of_any_sgserve_setting() -> None:
    c = config_of(["--cpus_per_worker=2", "--split_min_rows", "0", "--log_level=debug"])
    assert (c.cpus_per_worker, c.split_min_rows, c.log_level) == (2, 0, "debug")


def test_model_flags_follow_tf_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SGSERVE_MODEL_NAME", raising=False)
    monkeypatch.delenv("SGSERVE_START_MODEL_NAME", raising=False)
    # TF Serving serves --model_base_path alone as "default"; sgserve's own spelling keeps its own default.
    assert config_of(["--model_base_path=/models/ranker"]).resolved_model_name() == "default"
    assert config_of(["--model-base-path=/models/ranker"]).resolved_model_name() == "ranker"
    assert config_of(["--model_base_path=/m/ranker", "--model-name=r"]).resolved_model_name() == "r"
    monkeypatch.setenv("SGSERVE_MODEL_NAME", "from_env")
    assert config_of(["--model_base_path=/models/ranker"]).resolved_model_name() == "from_env"
    # --model_config_file makes --model_name and --model_base_path ignored, with a warning each.
    t = tfs_flags.translate(["--model_config_file=/c.txt", "--model_name=x", "--model_base_path", "/y"], env={})
    assert t.args == ["--model-config-file", "/c.txt"]
    assert t.warnings == [
        "sgserve: warning: --model_name is ignored: --model_config_file is set (as in TF Serving)",
        "sgserve: warning: --model_base_path is ignored: --model_config_file is set (as in TF Serving)"]


def test_meaningless_tfs_flags_are_accepted_with_one_warning_each() -> None:
    t = tfs_flags.translate(["--per_process_gpu_memory_fraction=0.5", "--saved_model_tags", "serve,gpu",
                             "--xla_cpu_compilation_enabled", "--grpc_channel_arguments",
                             "grpc.max_connection_age_ms=2000", "--workers", "3"], env={})
    assert t.args == ["--workers", "3"]  # each ignored flag's value is consumed with it
    assert [w.split(" is ignored: ")[0] for w in t.warnings] == [
        "sgserve: warning: TF Serving's --per_process_gpu_memory_fraction",
        "sgserve: warning: TF Serving's --saved_model_tags",
        "sgserve: warning: TF Serving's --xla_cpu_compilation_enabled",
        "sgserve: warning: TF Serving's --grpc_channel_arguments"]
    assert t.warnings[0] == ("sgserve: warning: TF Serving's --per_process_gpu_memory_fraction is ignored: sgserve "
                             "runs TensorFlow on CPU cores")


def test_every_tfs_flag_in_the_lists_is_known() -> None:
    names = {d.name for d in settings.declared()}
    assert set(tfs_flags.SAME) <= names
    assert {field for field, _ in tfs_flags.RENAMED.values()} <= names
    assert not set(tfs_flags.IGNORED) & (names | set(tfs_flags.RENAMED))
    # tensorflow_model_server's flags (tensorflow_serving/model_servers/main.cc): each one has a meaning here
    # or a reason to be ignored.
    main_cc = {"port", "grpc_socket_path", "rest_api_port", "rest_api_num_threads", "rest_api_timeout_in_ms",
               "rest_api_enable_cors_support", "enable_batching", "allow_version_labels_for_unavailable_models",
               "batching_parameters_file", "enable_per_model_batching_parameters", "model_config_file",
               "model_config_file_poll_wait_seconds", "model_name", "model_base_path", "num_load_threads",
               "num_unload_threads", "max_num_load_retries", "load_retry_interval_micros",
               "file_system_poll_wait_seconds", "flush_filesystem_caches", "tensorflow_session_parallelism",
               "tensorflow_session_config_file", "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism",
               "use_alts_credentials", "ssl_config_file", "platform_config_file", "per_process_gpu_memory_fraction",
               "saved_model_tags", "grpc_channel_arguments", "grpc_max_threads", "enable_model_warmup",
               "num_request_iterations_for_warmup", "version", "monitoring_config_file",
               "remove_unused_fields_from_bundle_metagraph", "prefer_tflite_model", "num_tflite_pools",
               "num_tflite_interpreters_per_pool", "enable_signature_method_name_check",
               "xla_cpu_compilation_enabled", "xla_gpu_compilation_enabled", "enable_profiler",
               "thread_pool_factory_config_file", "mixed_precision", "skip_initialize_tpu",
               "enable_grpc_healthcheck_service", "enable_serialization_as_tensor_content"}
    assert set(tfs_flags.known_tfs_flags()) == main_cc


# -- refused spellings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arg, suggestion", [
    ("--model_bse_path=/m", "--model_base_path"),
    ("--rest_api_prot=8501", "--rest_api_port"),
    ("--enable_bathing", "--enable_batching"),
    ("--per_process_gpu_memory_fractoin=0.5", "--per_process_gpu_memory_fraction"),
    ("--modle-base-path", "--model-base-path"),
    ("--worker", "--workers"),
])
def test_misspelled_flag_suggests_the_nearest(arg: str, suggestion: str) -> None:
    with pytest.raises(click.NoSuchOption) as e:
        tfs_flags.translate([arg], env={})
    assert e.value.possibilities == [suggestion]


@pytest.mark.parametrize("args, message", [
    (["--enable_batching=maybe"], "a boolean flag takes true, false, 1 or 0, got 'maybe'"),
    (["--no-model-warmup=true"], "--no-model-warmup takes no value"),
])
def test_bad_boolean_usage_is_refused(args: list[str], message: str) -> None:
    with pytest.raises(click.BadOptionUsage, match=message):
        tfs_flags.translate(args, env={})


def test_cli_refuses_a_misspelled_flag_quickly() -> None:
    started = time.monotonic()
    r = run_start("--model_config_file=/nowhere.config", "--model_bse_path=/m")
    assert r.returncode == 2, r.stderr
    assert "No such option '--model_bse_path'. Did you mean '--model_base_path'?" in r.stderr
    r = run_start("--workers", "2", "--cpus-per-wroker", "1")
    assert r.returncode == 2, r.stderr
    assert "No such option '--cpus-per-wroker'. Did you mean '--cpus-per-worker'?" in r.stderr
    assert time.monotonic() - started < 30  # refused before anything loads


def test_cli_prints_one_warning_line_per_ignored_flag() -> None:
    # A bad --workers value stops the start right after parsing: the warnings are printed by then.
    r = run_start("--per_process_gpu_memory_fraction", "0.4", "--enable_profiler", "--workers", "many")
    assert r.returncode == 2, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("sgserve: warning:")]
    assert warnings == [
        "sgserve: warning: TF Serving's --per_process_gpu_memory_fraction is ignored: sgserve runs TensorFlow "
        "on CPU cores",
        "sgserve: warning: TF Serving's --enable_profiler is ignored: sgserve has no profiler service"]
    assert "'many' is not a valid integer" in r.stderr


# -- a TF Serving launch line, end to end ------------------------------------------------------------
def config_text(models: dict[str, tuple[str, str, dict[str, int]]]) -> str:
    """A ModelServerConfig as TF Serving's docs write it: name -> (base path, policy, labels)."""
    out = ["model_config_list {"]
    for name, (base, policy, labels) in models.items():
        out += ["  config {", f"    name: '{name}'", f"    base_path: '{base}'", "    model_platform: 'tensorflow'",
                f"    model_version_policy {{ {policy} }}"]
        out += [f"    version_labels {{ key: '{k}' value: {v} }}" for k, v in labels.items()]
        out.append("  }")
    return "\n".join(out + ["}"]) + "\n"


@pytest.fixture(scope="module")
def tfs_server(tmp_path_factory) -> Iterator[tuple[ServerProcess, Path, dict[str, str], str]]:
    """One server started with a tensorflow_model_server launch line: two models from a config file."""
    tmp = tmp_path_factory.mktemp("tfs-launch")
    store = str(tmp / "store")
    for v in (1, 2, 3):
        lm.build_version(store, v)
    bases = {"m": str(tmp / "m"), "n": str(tmp / "n")}
    for v in (1, 2):
        lm.publish(store, bases["m"], v)
    lm.publish(store, bases["n"], 2)
    cfg = tmp / "models.config"
    # "next" labels version 3, which is not on disk yet: allowed only with the flag (a new label).
    cfg.write_text(config_text({"m": (bases["m"], "all {}", {"stable": 1, "next": 3}),
                                "n": (bases["n"], "latest {}", {})}))
    before = sgserve_segments()
    srv = ServerProcess([f"--model_config_file={cfg}", "--model_config_file_poll_wait_seconds=1",
                         f"--port={free_port()}", f"--rest_api_port={free_port()}", "--enable_batching=false",
                         "--file_system_poll_wait_seconds=1", "--allow_version_labels_for_unavailable_models",
                         "--tensorflow_intra_op_parallelism=0", "--per_process_gpu_memory_fraction=0.5",
                         "--load_retry_interval_micros=100000"],
                        cache_dir=str(tmp / "cache"))
    try:
        srv.wait_ready()
        yield srv, cfg, bases, store
    finally:
        srv.stop()
    assert not group_alive(srv.proc.pid)
    assert not {n for n in sgserve_segments() - before if n.startswith(f"sgserve_{srv.proc.pid}_")}
    assert srv.output.count("--per_process_gpu_memory_fraction is ignored") == 1, srv.output


def test_tfs_launch_line_serves_two_models(tfs_server) -> None:
    srv = tfs_server[0]
    with srv.client(30.0) as c:
        m = c.predict_full("m", {"ids": IDS})
        assert m.version == 2 and np.allclose(m.outputs["y"], lm.expected(IDS, 2))
        n = c.predict_full("n", {"ids": IDS})
        assert n.version == 2 and np.allclose(n.outputs["y"], lm.expected(IDS, 2))
        assert c.predict_full("m", {"ids": IDS}, version_label="stable").version == 1


def _config_error(srv: ServerProcess) -> str | None:
    with srv.client(5.0) as c:
        return c.status().get("config_error")


def test_allow_version_labels_for_unavailable_models(tfs_server) -> None:
    srv, cfg, bases, store = tfs_server
    with srv.client(30.0) as c:
        # "next" was accepted at start although version 3 was not there; it answers once 3 is loaded.
        with pytest.raises(NotFound, match=r"version label 'next' points at version 3, which is not available"):
            c.predict("m", {"ids": IDS}, version_label="next")
        lm.publish(store, bases["m"], 3)
        r = wait_until(lambda: c.predict_full("m", {"ids": IDS}, version_label="next"), timeout=120,
                       what="label 'next' to answer from version 3")
        assert r.version == 3 and np.allclose(r.outputs["y"], lm.expected(IDS, 3))
    # Moving an existing label onto a version that is not available stays refused (TF Serving's rule).
    cfg.write_text(config_text({"m": (bases["m"], "all {}", {"stable": 9, "next": 3}),
                                "n": (bases["n"], "latest {}", {})}))
    err = wait_until(lambda: _config_error(srv), timeout=30, what="the moved label refused")
    assert "version label 'stable' points at version 9, which is not available" in err, err
    # A new label on a version that is not there is applied, and the existing ones keep answering.
    cfg.write_text(config_text({"m": (bases["m"], "all {}", {"stable": 1, "next": 3, "later": 9}),
                                "n": (bases["n"], "latest {}", {})}))
    wait_until(lambda: _config_error(srv) is None, timeout=30, what="the new label applied")
    with srv.client(30.0) as c:
        assert c.predict_full("m", {"ids": IDS}, version_label="stable").version == 1
        with pytest.raises(NotFound, match=r"version label 'later' points at version 9, which is not available"):
            c.predict("m", {"ids": IDS}, version_label="later")
