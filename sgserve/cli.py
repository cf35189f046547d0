"""The `sgserve` command line: a thin click layer over ServerConfig, the Client and the load generator.

`sgserve start`'s options come from ServerConfig's declaration (sgserve/settings.py), each also an
environment variable SGSERVE_<OPTION>. Every option of every command is also SGSERVE_<COMMAND>_<OPTION>
(click's auto_envvar_prefix).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import click
import numpy as np

from sgserve import auth, settings
from sgserve.errors import ServeError
from sgserve.logs import setup_logging
from sgserve.process import EXIT_CONFIG_ERROR
from sgserve.bench.cli import bench
from sgserve.protocol import default_endpoint
from sgserve.tfs_flags import TfsFlagsCommand

ENDPOINT_HELP = "broker endpoint (ZeroMQ), default tcp://127.0.0.1:8510 or $SGSERVE_ENDPOINT"


def curve_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--curve-server-key and --curve-client-key, for every command that connects to a server."""
    func = click.option("--curve-client-key", type=click.Path(dir_okay=False), default=None,
                        envvar=auth.ENV_CLIENT_KEY, show_envvar=True,
                        help="with CURVE: this client's secret certificate (client.key_secret from `sgserve keygen`)")(func)
    return click.option("--curve-server-key", type=click.Path(dir_okay=False), default=None,
                        envvar=auth.ENV_SERVER_KEY, show_envvar=True,
                        help="with CURVE: the server's public certificate (server.key from `sgserve keygen`)")(func)


@click.group(context_settings={"auto_envvar_prefix": "SGSERVE", "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sgserve")
def main() -> None:
    """sgserve: N pinned TensorFlow worker processes serving one shared-memory copy of a model."""


@main.command(cls=TfsFlagsCommand, context_settings={"max_content_width": 120})  # room for the longest SGSERVE_ names
@settings.click_options
def start(**options: object) -> None:
    """Serve a model in the foreground until SIGINT/SIGTERM (or `sgserve stop`).

    TF Serving's spellings work too (--model_base_path=/m, --enable_batching=true, ...): a
    tensorflow_model_server launch line runs unchanged (sgserve/tfs_flags.py)."""
    config = settings.config_from_options(options)
    try:
        auth.check_settings(config)  # a bad key fails now, not after the models load
    except ValueError as exc:
        click.echo(f"sgserve: error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    if config.warmup_file:
        config.warmup_file = os.path.abspath(config.warmup_file)
    setup_logging("broker", config.log_level, config.log_format)  # exported: workers and the loader follow
    from sgserve import server  # noqa: PLC0415

    try:
        code = server.run(config)
    except (ValueError, OSError) as exc:  # errors.ConfigError (a ValueError), a bad --policy, endpoint in use
        click.echo(f"sgserve: error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    sys.exit(code)


def _client(endpoint: str | None, timeout: float, keys: tuple[str | None, str | None] = (None, None)):
    """A Client; ``keys``: the --curve-server-key and --curve-client-key values (None: plain, or the
    environment variables the options read anyway)."""
    from sgserve.client import Client  # noqa: PLC0415

    try:
        return Client(endpoint or default_endpoint(), timeout=timeout, curve_server_key=keys[0],
                      curve_client_key=keys[1])
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"CURVE keys: {exc}") from None


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--client", "clients", multiple=True, default=("client",), show_default=True,
              help="name of a client key pair to write (repeatable): NAME.key and NAME.key_secret")
def keygen(directory: str, clients: tuple[str, ...]) -> None:
    """Write CURVE key pairs in ZeroMQ's certificate format: server.key / server.key_secret (unless
    DIRECTORY has them) and one pair per client. Secret files are mode 0600.

    \b
    Then: mkdir clients admins; cp DIR/client.key clients/   (and admins/ for admin rights)
      sgserve start --curve-secret-key DIR/server.key_secret --curve-authorized-clients clients
                    [--curve-admin-clients admins]
      sgserve status --curve-server-key DIR/server.key --curve-client-key DIR/client.key_secret"""
    try:
        written = auth.keygen(directory, clients)
    except (OSError, ValueError) as exc:
        _fail(exc)
        return
    for path in written:
        click.echo(path)


def _fail(exc: Exception) -> None:
    click.echo(f"sgserve: {exc}", err=True)
    sys.exit(1)


@main.command()
@click.option("--endpoint", default=None, help=ENDPOINT_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the raw status as JSON")
@click.option("--timeout", type=float, default=5.0, show_default=True)
@curve_options
def status(endpoint: str | None, as_json: bool, timeout: float, curve_server_key: str | None,
           curve_client_key: str | None) -> None:
    """Workers (pid, cores, state, requests served) and models (version, bytes, tier: shm or the segment dir)."""
    try:
        with _client(endpoint, timeout, (curve_server_key, curve_client_key)) as c:
            st = c.status()
    except ServeError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    srv = st.get("server", {})
    click.echo(f"server pid {srv.get('pid')} on {srv.get('endpoint')}, policy {srv.get('policy')}, "
               f"up {srv.get('uptime_s', 0):.0f} s")
    click.echo(f"{'WORKER':>6} {'PID':>8} {'CORES':<10} {'STATE':<9} {'INFLIGHT':>8} {'SERVED':>10} {'RESTARTS':>8}")
    for w in st.get("workers", []):
        cores = ",".join(map(str, w.get("cores", [])))
        click.echo(f"{w.get('index'):>6} {w.get('pid') or '-':>8} {cores:<10} {w.get('state'):<9} "
                   f"{w.get('inflight', 0):>8} {w.get('served', 0):>10} {w.get('restarts', 0):>8}")
    loader = st.get("loader") or {}
    if loader.get("pid"):
        click.echo(f"loader service pid {loader['pid']}: {loader.get('state')}")
    if st.get("config_error"):
        click.echo(f"model config NOT applied (the running one stays): {st['config_error']}")
    click.echo(f"{'MODEL':<16} {'VERSION':>7} {'STATE':<10} {'LABELS':<14} {'MiB':>8} {'NEW MiB':>8} "
               f"{'LOAD s':>7}  {'TIER':<8}  NOTES")
    for m in st.get("model_status", []):
        notes = [f"policy {m.get('policy')}"]
        if m.get("pinned") is not None:
            notes.append(f"pinned to {m['pinned']}")
        if m.get("error"):
            notes.append(m["error"])
        click.echo(f"{m.get('name'):<16} {'':>7} {'':<10} {'':<14} {'':>8} {'':>8} {'':>7}  {'':<8}  "
                   f"{'; '.join(notes)}")
        for v in m.get("versions", []):
            load = v.get("load_seconds")
            note = ("serving" if v.get("serving") else "") + (f" {v['error']}" if v.get("error") else "")
            click.echo(f"{'':<16} {v.get('version'):>7} {v.get('state'):<10} {','.join(v.get('labels', [])):<14} "
                       f"{v.get('bytes', 0) / 1048576:>8.1f} {v.get('own_bytes', 0) / 1048576:>8.1f} "
                       f"{load if load is not None else '-':>7}  {v.get('tier') or '-':<8}  {note.strip()}")


def _parse_inputs(inputs: tuple[str, ...], json_text: str | None, meta: dict[str, Any], signature: str) -> dict[str, np.ndarray]:
    sig = meta.get("signatures", {}).get(signature)
    want = sig["inputs"] if sig else {}
    arrays: dict[str, np.ndarray] = {}
    for item in inputs:
        name, _, path = item.partition("=")
        if not path:
            raise click.BadParameter(f"--input takes NAME=FILE.npy, got {item!r}")
        arrays[name] = np.load(path, allow_pickle=False)
    if json_text:
        if os.path.isfile(json_text):
            with open(json_text) as f:
                json_text = f.read()
        data = json.loads(json_text)
        if isinstance(data, dict) and "inputs" in data and isinstance(data["inputs"], dict):
            data = data["inputs"]  # TF Serving's REST "inputs" form
        for name, value in data.items():
            dt = want.get(name, {}).get("dtype")
            if dt == "string":
                arr = np.array(value, dtype=object)
                arrays[name] = np.vectorize(lambda s: s.encode() if isinstance(s, str) else s, otypes=[object])(arr) \
                    if arr.size else arr
            else:
                arrays[name] = np.array(value, dtype=dt) if dt else np.array(value)
    return arrays


@main.command()
@click.argument("model", required=False, default="demo")
@click.option("--input", "-i", "inputs", multiple=True, help="NAME=FILE.npy (repeatable)")
@click.option("--json", "json_text", default=None,
              help='inputs as JSON (or a JSON file): {"name": [[...]], ...}; dtypes come from the model metadata')
@click.option("--version", type=int, default=None)
@click.option("--version-label", default=None, help="a version label such as stable or canary")
@click.option("--signature", default="serving_default", show_default=True)
@click.option("--output", "-o", "output_filter", multiple=True, help="only return these outputs")
@click.option("--routing-key", default=None)
@click.option("--endpoint", default=None, help=ENDPOINT_HELP)
@click.option("--timeout", type=float, default=30.0, show_default=True)
@curve_options
def predict(model: str, inputs: tuple[str, ...], json_text: str | None, version: int | None,
            version_label: str | None, signature: str, output_filter: tuple[str, ...], routing_key: str | None,
            endpoint: str | None, timeout: float, curve_server_key: str | None, curve_client_key: str | None) -> None:
    """Send one request and print the outputs as JSON."""
    try:
        with _client(endpoint, timeout, (curve_server_key, curve_client_key)) as c:
            meta = c.metadata(model, version=version, version_label=version_label)
            arrays = _parse_inputs(inputs, json_text, meta, signature)
            res = c.predict_full(model, arrays, version=version, version_label=version_label, signature=signature,
                                 output_filter=list(output_filter) or None, routing_key=routing_key)
    except ServeError as exc:
        _fail(exc)
        return

    def plain(a: np.ndarray):
        if a.dtype == object:
            return [plain(x) for x in a] if a.ndim else (a.item().decode("utf-8", "replace")
                                                         if isinstance(a.item(), bytes) else a.item())
        return a.tolist()

    click.echo(json.dumps({"model": res.model, "version": res.version, "worker": res.worker,
                           "outputs": {k: plain(v) for k, v in res.outputs.items()}}))


@main.command()
@click.argument("model")
@click.option("--to", "version", type=int, required=True, help="the version to serve (loaded if needed)")
@click.option("--endpoint", default=None, help=ENDPOINT_HELP)
@click.option("--wait", type=float, default=120.0, show_default=True,
              help="seconds to wait until that version serves (0: do not wait)")
@curve_options
def rollback(model: str, version: int, endpoint: str | None, wait: float, curve_server_key: str | None,
             curve_client_key: str | None) -> None:
    """Pin MODEL to an older version still on disk (loading it if needed) until `sgserve unpin`."""
    try:
        with _client(endpoint, 10.0, (curve_server_key, curve_client_key)) as c:
            reply = c.pin(model, version)
            deadline = time.monotonic() + wait
            while wait > 0 and reply.get("serving_version") != version:
                state = reply.get("pinned_state") or ""
                if state.startswith("FAILED") or state.startswith("END"):
                    _fail(RuntimeError(f"version {version} of '{model}' cannot serve: {state}"))
                if time.monotonic() > deadline:
                    _fail(RuntimeError(f"version {version} of '{model}' is pinned but not serving after "
                                       f"{wait:g} s (state {state}); see `sgserve status`"))
                time.sleep(0.2)
                reply = c.pin(model, version)
    except ServeError as exc:
        _fail(exc)
        return
    click.echo(json.dumps(reply))


@main.command()
@click.argument("model")
@click.option("--endpoint", default=None, help=ENDPOINT_HELP)
@curve_options
def unpin(model: str, endpoint: str | None, curve_server_key: str | None, curve_client_key: str | None) -> None:
    """Return MODEL to its version policy after a rollback."""
    try:
        with _client(endpoint, 10.0, (curve_server_key, curve_client_key)) as c:
            reply = c.unpin(model)
    except ServeError as exc:
        _fail(exc)
        return
    click.echo(json.dumps(reply))


@main.command()
@click.option("--endpoint", default=None, help=ENDPOINT_HELP)
@click.option("--timeout", type=float, default=5.0, show_default=True)
@curve_options
def stop(endpoint: str | None, timeout: float, curve_server_key: str | None, curve_client_key: str | None) -> None:
    """Ask a running server to drain and stop."""
    try:
        with _client(endpoint, timeout, (curve_server_key, curve_client_key)) as c:
            c.shutdown()
    except ServeError as exc:
        _fail(exc)
        return
    click.echo("sgserve: stop requested", err=True)


main.add_command(bench)


if __name__ == "__main__":
    main()
