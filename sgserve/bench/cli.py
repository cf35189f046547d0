"""`sgserve bench`: the load tester's command line (the engine is sgserve.bench.loadgen)."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import click

from sgserve.auth import ENV_CLIENT_KEY, ENV_SERVER_KEY
from sgserve.errors import ServeError
from sgserve.protocol import default_endpoint

ENDPOINT_HELP = ("where to send load: tcp://HOST:PORT or ipc://PATH (sgserve protocol), http://HOST:PORT "
                 "(TF Serving REST API), grpc://HOST:PORT (TF Serving gRPC API); a comma list compares them interleaved. Default tcp://127.0.0.1:8510 "
                 "or $SGSERVE_ENDPOINT")


class NumberList(click.ParamType):
    """A comma-separated list of numbers: `8`, `1,4,16,64`."""

    def __init__(self, kind: Callable[[str], Any]) -> None:
        self.kind = kind
        self.name = f"{kind.__name__}[,{kind.__name__}...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[Any]:
        if isinstance(value, list):
            return value
        try:
            out = [self.kind(x.strip()) for x in str(value).split(",") if x.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.kind.__name__}s", param, ctx)
        if not out:
            self.fail("empty list", param, ctx)
        return out


def _fail(message: str) -> None:
    click.echo(f"sgserve: bench: {message}", err=True)
    sys.exit(1)


EPILOG = """\b
Examples:
  sgserve bench demo -c 1,4,16,64 -d 10 --json out.json --plot out.png
  sgserve bench demo --rate 100,200,400 --schedule poisson -d 20
  sgserve bench demo -b 1,8,32,128 -c 8
  sgserve bench demo --endpoint tcp://127.0.0.1:8510 --compare http://127.0.0.1:8501 -c 16
"""


@click.command(epilog=EPILOG)
@click.argument("model", required=False, default="demo")
@click.option("--endpoint", default=None, help=ENDPOINT_HELP)
@click.option("--compare", default=None, metavar="ENDPOINT",
              help="a second endpoint, run interleaved with --endpoint (A B A B ...); reports the ratio B/A")
@click.option("--concurrency", "-c", type=NumberList(int), default=None,
              help="closed loop: requests in flight, one point per value (e.g. 1,4,16,64)  [default: 8]")
@click.option("--rate", "-r", type=NumberList(float), default=None,
              help="open loop: requests/s sent on a fixed schedule, one point per value (e.g. 100,200,400)")
@click.option("--schedule", type=click.Choice(["uniform", "poisson"]), default="uniform", show_default=True,
              help="open loop: evenly spaced sends, or exponential gaps (a Poisson process)")
@click.option("--senders", type=int, default=None,
              help="open loop: fixed number of sender threads (default: start small, add more whenever the "
                   "schedule falls behind, up to 512)")
@click.option("--late-ms", type=float, default=10.0, show_default=True,
              help="open loop: a request sent later than this after its intended time counts as late")
@click.option("--batch-size", "-b", type=NumberList(int), default="1", show_default=True,
              help="rows per request, one point per value (e.g. 1,8,32,128)")
@click.option("--duration", "-d", type=float, default=None,
              help="measured seconds per point (default 10 unless --requests)")
@click.option("--requests", "-n", type=int, default=None, help="closed loop: measured requests per point")
@click.option("--warmup", type=float, default=1.0, show_default=True,
              help="unmeasured seconds before each point (per endpoint)")
@click.option("--slice", "slice_s", type=float, default=1.0, show_default=True,
              help="when comparing endpoints: seconds per turn of each")
@click.option("--signature", default="serving_default", show_default=True)
@click.option("--model-version", type=int, default=None, help="model version (default: the server's default)")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="per-request timeout, seconds")
@click.option("--json", "json_path", default=None, metavar="FILE|-",
              help="write the results as JSON to FILE; '-' writes them to stdout (the table then goes to stderr)")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png",
              help="plot p50/p99 latency against achieved QPS (needs matplotlib)")
@click.option("--quiet", "-q", is_flag=True, help="no progress on stderr")
@click.option("--curve-server-key", type=click.Path(dir_okay=False), default=None, envvar=ENV_SERVER_KEY,
              show_envvar=True, help="sgserve endpoints with CURVE: the server's public certificate (server.key)")
@click.option("--curve-client-key", type=click.Path(dir_okay=False), default=None, envvar=ENV_CLIENT_KEY,
              show_envvar=True, help="sgserve endpoints with CURVE: this client's secret certificate (client.key_secret)")
def bench(model: str, endpoint: str | None, compare: str | None, concurrency: list[int] | None,
          rate: list[float] | None, schedule: str, senders: int | None, late_ms: float, batch_size: list[int],
          duration: float | None, requests: int | None, warmup: float, slice_s: float, signature: str,
          model_version: int | None, timeout: float, json_path: str | None, plot_path: str | None,
          quiet: bool, curve_server_key: str | None, curve_client_key: str | None) -> None:
    """Load test a model server: QPS and p50/p90/p99/p99.9/max latency per point.

    Closed loop (-c, the default): each of C clients sends its next request when the previous one
    is answered. Open loop (--rate): requests leave on a fixed schedule whatever the server does,
    and latency counts from each request's intended send time, so overload shows in the
    percentiles. Lists sweep: one point per (batch size, concurrency or rate, endpoint).
    """
    from sgserve.bench import loadgen  # noqa: PLC0415

    for env, value in ((ENV_SERVER_KEY, curve_server_key), (ENV_CLIENT_KEY, curve_client_key)):
        if value:  # the sgserve targets' Client reads its keys from these (sgserve/auth.py client_curve)
            os.environ[env] = value
    if rate is not None and concurrency is not None:
        raise click.UsageError("give --concurrency (closed loop) or --rate (open loop), not both")
    if plot_path:
        try:
            loadgen.require_matplotlib()  # before the run, not after minutes of load
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
    cfg = loadgen.BenchConfig(
        endpoint=endpoint or default_endpoint(), model=model, concurrency=concurrency or [8], rate=rate,
        duration=duration if duration is not None else (None if requests else 10.0), requests=requests,
        batch_size=batch_size, warmup=warmup, signature=signature, timeout=timeout, version=model_version,
        schedule=schedule, senders=senders, late_ms=late_ms, compare=compare, slice_s=slice_s)
    try:
        cfg.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        results = loadgen.run_points(cfg, progress=not quiet)
    except ServeError as exc:
        _fail(exc.message)
        return
    report = loadgen.make_report(cfg, results)
    to_stderr = json_path == "-"  # keep stdout pure JSON
    click.echo(loadgen.format_table(results), err=to_stderr)
    if report["comparisons"]:
        click.echo(loadgen.format_comparisons(report["comparisons"]), err=to_stderr)
    if json_path:
        text = json.dumps(report, indent=2)
        if json_path == "-":
            click.echo(text)
        else:
            with open(json_path, "w") as f:
                f.write(text + "\n")
    if plot_path:
        loadgen.plot_results(results, plot_path, title=f"sgserve bench: model {model}")
        click.echo(f"sgserve: bench: wrote {plot_path}", err=True)
    if any(r.ok == 0 and r.errors for r in results):
        sys.exit(1)  # some point got nothing but errors
