"""Every `sgserve start` setting is declared once (ServerConfig, sgserve/config.py): the click options,
their environment variables, --help and the README's table all come from that declaration."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from sgserve import cli, settings
from sgserve.config import ServerConfig, WorkerSpec

README = Path(__file__).resolve().parents[1] / "README.md"
DERIVED = {"batching_parameters"}  # filled in at start (server.resolve_batching), never a flag

# Every flag `sgserve start` had before settings were declared once, with its default then: the
# spellings and defaults people's scripts use must not change.
OLD_DEFAULTS = {
    "--model-base-path": None, "--model-name": None, "--workers": 2, "--cpus-per-worker": 1, "--policy": "rr",
    "--intra-op-threads": None, "--inter-op-threads": None, "--allow-oversubscribe": False,
    "--max-request-bytes": 64 * 1024 * 1024, "--max-enqueued": 1024, "--worker-timeout": 30.0,
    "--boot-timeout": 120.0, "--drain-timeout": 10.0, "--model-config-file": None,
    "--model-config-file-poll-wait-seconds": 0.0, "--file-system-poll-wait-seconds": 1.0,
    "--max-num-load-retries": 5, "--load-retry-interval": 60.0, "--model-version-policy": "latest",
    "--version-transition": "availability-preserving", "--enable-model-warmup": True, "--no-model-warmup": True,
    "--warmup-file": None, "--incremental-updates": True, "--no-incremental-updates": True,
    "--enable-batching": False, "--batching-parameters-file": None, "--log-level": "warning",
}
# Constants that became settings, with the values they had.
NEW_DEFAULTS = {"--worker-pipeline": 2, "--heartbeat-interval": 1.0, "--heartbeat-liveness": 3,
                "--max-batching-pipeline": 4096, "--log-format": "text"}
# TF Serving's settings (issue 10), with TF Serving's defaults but --port's (off, not 8500), and every
# boolean's off spelling (so that `--x=false` beats SGSERVE_X=1).
TFS_DEFAULTS = {"--port": 0, "--rest-api-port": 0, "--rest-api-num-threads": 0, "--rest-api-timeout-in-ms": 30000,
                "--monitoring-config-file": None, "--ssl-config-file": None,
                "--allow-version-labels-for-unavailable-models": False,
                "--no-allow-version-labels-for-unavailable-models": False, "--no-enable-batching": False,
                "--no-allow-oversubscribe": False}


def start_params(args: list[str]) -> dict[str, object]:
    """What `sgserve start ARGS` parses to, through the real group (its auto_envvar_prefix included)."""
    group_ctx = cli.main.make_context("sgserve", ["start", *args], resilient_parsing=False)
    with group_ctx:
        ctx = cli.start.make_context("start", list(args), parent=group_ctx)
        return dict(ctx.params)


def option_names(opt: click.Option) -> list[str]:
    return [*opt.opts, *opt.secondary_opts]


def test_click_options_match_the_declaration_one_to_one() -> None:
    opts = [p for p in cli.start.params if isinstance(p, click.Option) and p.name != "help"]
    declared = settings.declared()
    assert [o.name for o in opts] == [d.name for d in declared]
    for opt, d in zip(opts, declared):
        assert option_names(opt) == d.flag.split("/"), d.name
        assert opt.envvar == d.envvar == f"SGSERVE_{d.name.upper()}"
        assert opt.default is None  # ServerConfig holds the one default


def test_server_config_fields_match_the_declaration_one_to_one() -> None:
    fields = [f.name for f in dataclasses.fields(ServerConfig) if f.name not in DERIVED]
    assert fields == [d.name for d in settings.declared()]
    assert all("setting" not in f.metadata for f in dataclasses.fields(ServerConfig) if f.name in DERIVED)


def test_no_flags_give_server_config_defaults() -> None:
    assert settings.config_from_options(start_params([])) == ServerConfig()


@pytest.mark.parametrize("flag", sorted({**OLD_DEFAULTS, **NEW_DEFAULTS, **TFS_DEFAULTS}))
def test_flag_spellings_and_defaults_kept(flag: str) -> None:
    by_flag = {f: d for d in settings.declared() for f in d.flag.split("/")}
    assert flag in by_flag, f"{flag} is gone from sgserve start"
    default = getattr(ServerConfig(), by_flag[flag].name)
    assert default == {**OLD_DEFAULTS, **NEW_DEFAULTS, **TFS_DEFAULTS}[flag]


def test_flags_reach_server_config() -> None:
    config = settings.config_from_options(start_params(
        ["--workers", "3", "--no-model-warmup", "--allow-oversubscribe", "--heartbeat-interval", "0.25",
         "--heartbeat-liveness", "5", "--worker-pipeline", "4", "--max-batching-pipeline", "64",
         "--log-level", "debug", "--log-format", "json", "--version-transition", "resource-preserving"]))
    assert (config.workers, config.enable_model_warmup, config.allow_oversubscribe) == (3, False, True)
    assert (config.heartbeat_interval, config.heartbeat_liveness, config.worker_pipeline) == (0.25, 5, 4)
    assert (config.max_batching_pipeline, config.log_level, config.log_format) == (64, "debug", "json")
    assert config.version_transition == "resource-preserving"


def test_environment_variables_set_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGSERVE_WORKERS", "5")
    monkeypatch.setenv("SGSERVE_ENABLE_MODEL_WARMUP", "false")
    monkeypatch.setenv("SGSERVE_ENABLE_BATCHING", "1")
    monkeypatch.setenv("SGSERVE_HEARTBEAT_INTERVAL", "0.5")
    monkeypatch.setenv("SGSERVE_LOG_FORMAT", "json")
    monkeypatch.setenv("SGSERVE_START_DRAIN_TIMEOUT", "3")  # the older spelling (click's auto prefix)
    config = settings.config_from_options(start_params(["--workers", "7"]))  # the command line wins
    assert (config.workers, config.enable_model_warmup, config.enable_batching) == (7, False, True)
    assert (config.heartbeat_interval, config.log_format, config.drain_timeout) == (0.5, "json", 3.0)


def test_bad_environment_value_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGSERVE_LOG_LEVEL", "loud")
    with pytest.raises(click.BadParameter) as e:
        start_params([])
    assert "loud" in e.value.format_message()


def test_readme_table_is_the_generated_one() -> None:
    readme = README.read_text()
    assert settings.README_BEGIN in readme and settings.README_END in readme
    assert settings.readme_table(readme) == settings.markdown_table(), (
        "README.md's options table is stale: replace it with `python -m sgserve.settings --markdown`")


def test_markdown_command_prints_the_table() -> None:
    r = subprocess.run([sys.executable, "-m", "sgserve.settings", "--markdown"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == settings.markdown_table()
    assert len(r.stdout.splitlines()) == 2 + len(settings.declared())


def test_help_shows_every_setting_with_its_variable() -> None:
    r = subprocess.run([sys.executable, "-m", "sgserve.cli", "start", "--help"], capture_output=True, text=True,
                       timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for d in settings.declared():
        for flag in d.flag.split("/"):
            assert re.search(rf"(^|[\s/]){re.escape(flag)}[\s,]", text), flag
        assert d.envvar in text, d.envvar


def test_heartbeat_setting_reaches_the_worker_spec() -> None:
    from sgserve.broker.supervisor import Supervisor
    from sgserve.broker.worker_table import WorkerTable

    config = settings.config_from_options(start_params(["--heartbeat-interval", "0.3", "--worker-pipeline", "3"]))
    table = WorkerTable(config.workers, config.worker_pipeline)
    slot = table.add(0, [0])
    sup = Supervisor(config, lambda _index: [], table, backend_endpoint="ipc:///tmp/sgserve-test-x", server_id="sid")
    assert WorkerSpec.from_json(sup.worker_spec(slot).to_json()).heartbeat_interval == 0.3
    assert table.pipeline == 3


def test_max_batching_pipeline_bounds_the_batching_pipeline() -> None:
    from sgserve import server
    from sgserve.models.batching_params import BatchingParameters

    p = BatchingParameters()  # TF Serving's defaults; one batch thread per core, one core
    default = server.resolve_batching(ServerConfig(enable_batching=True, cpus_per_worker=1))
    assert default.worker_pipeline == min(4096, p.batch_size_limit * (p.max_enqueued_batches + 1))
    bounded = server.resolve_batching(ServerConfig(enable_batching=True, cpus_per_worker=1, max_batching_pipeline=100))
    assert bounded.worker_pipeline == 100
    assert server.resolve_batching(ServerConfig(worker_pipeline=3)).worker_pipeline == 3  # no batching: as given
