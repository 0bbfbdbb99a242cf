"""`ember ...`: start a server, deploy a file, call functions, follow jobs and logs."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ember import config
from ember.cli import admin, deploy_command
from ember.cli.common import (
    api_client,
    epoch,
    err,
    fail,
    out,
    print_json,
    request,
)
from ember.cli.endpoints import endpoints
from ember.cli.envs import env_app
from ember.cli.jobs import jobs
from ember.cli.serving import (
    AdvertiseOption,
    BackendName,
    BackendOption,
    DbOption,
    Durability,
    DurabilityOption,
    MetricsPortOption,
    RayAddressOption,
    RunpodRunRetentionOption,
    RunpodRunsyncRetentionOption,
)
from ember.cli.usage import usage
from ember.errors import EmberError

app = typer.Typer(
    name="ember",
    help="ember: deploy a Python function, call it over HTTP, scale to zero, on your own machines.\n\n"
    "Start a server with `ember server`, deploy with `ember deploy FILE`, call with "
    "`ember call APP/FN --data '{\"x\": 3}'`. Clients read EMBER_URL (default "
    f"{config.DEFAULT_URL}) and EMBER_TOKEN (default: the token file in the server's data dir).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _split(target: str) -> tuple[str, str]:
    app_name, sep, fn = target.partition("/")
    if not sep or not app_name or not fn:
        raise typer.BadParameter(
            f"{target!r} is not APP/FUNCTION (e.g. demo/square or demo/Embedder.embed)"
        )
    return app_name, fn


def version() -> str:
    """The installed package's version (its metadata), or the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("ember")
    except PackageNotFoundError:
        from ember import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        out.print(f"ember {version()}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_print_version,
            is_eager=True,
            help="Print ember's version and exit.",
        ),
    ] = False,
) -> None:
    """Options of `ember` itself, before any command."""


@app.command()
def server(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port for the HTTP API")] = config.DEFAULT_PORT,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="where the database, token, bundles and logs live [default: $EMBER_DATA_DIR or ./.ember]"
        ),
    ] = None,
    max_payload: Annotated[
        int, typer.Option(help="largest request body in bytes (413 above)")
    ] = int(os.environ.get("EMBER_MAX_PAYLOAD", config.DEFAULT_MAX_PAYLOAD)),
    gpus: Annotated[
        str | None,
        typer.Option(
            help="declare simulated GPUs instead of discovering real ones, e.g. 'L4:2,H100:1' or "
            "'X1:1:24GiB'; they are labelled simulated everywhere"
        ),
    ] = os.environ.get("EMBER_GPUS") or None,
    prices: Annotated[
        Path | None,
        typer.Option(
            help="TOML file overriding the price table and billing mode (docs/metering.md)"
        ),
    ] = None,
    templates: Annotated[
        bool,
        typer.Option(
            help="fork workers from a template per function version (module imported and "
            "@enter(snap=True) hooks run once); --no-templates starts each worker as a new process"
        ),
    ] = os.environ.get("EMBER_TEMPLATES", "1") != "0",
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="PEM certificate: serve HTTPS (needed when --host is not loopback)"),
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
    sandbox: Annotated[
        str,
        typer.Option(
            help="run user code in bubblewrap sandboxes that see only their own bundle, /tmp and "
            "processes: auto (where bubblewrap works), bwrap (refuse to start without it), or off "
            "(docs/security.md)"
        ),
    ] = os.environ.get("EMBER_SANDBOX", "auto"),
    tenant_isolation: Annotated[
        bool,
        typer.Option(
            help="without a sandbox, run the code of the 'default' workspace only; "
            "--no-tenant-isolation runs every workspace's code unsandboxed, as the server's user, "
            "able to read the data dir (token, master.key, database) and other workers"
        ),
    ] = True,
    durability: DurabilityOption = Durability.normal,
    db: DbOption = None,
    backend: BackendOption = BackendName.local,
    ray_address: RayAddressOption = None,
    advertise_url: AdvertiseOption = None,
    max_connections: Annotated[
        int,
        typer.Option(
            help="most HTTP connections open at once; a newcomer past it closes those idle "
            "longest [default: 0, derived from the fd soft limit (ulimit -n)]"
        ),
    ] = int(os.environ.get("EMBER_MAX_CONNECTIONS", "0")),
    header_timeout: Annotated[
        float,
        typer.Option(
            help="seconds a connection has to send a complete request head, or it is closed"
        ),
    ] = float(os.environ.get("EMBER_HEADER_TIMEOUT", "10")),
    max_queued_jobs: Annotated[
        int, typer.Option(help="jobs a workspace may have queued; past it calls get 429")
    ] = 10_000,
    max_queued_bytes: Annotated[
        str, typer.Option(help="queued inputs a workspace may hold, e.g. 1GiB; past it 429")
    ] = "1GiB",
    job_retention: Annotated[
        str, typer.Option(help="how long finished jobs are kept, e.g. 7d, 12h or seconds")
    ] = "7d",
    max_job_log: Annotated[
        str, typer.Option(help="printed output kept per job; the rest dropped, with a marker")
    ] = "1MiB",
    max_app_log: Annotated[
        str, typer.Option(help="size of an app's log file; rotated, one previous file kept")
    ] = "64MiB",
    runpod_run_retention: RunpodRunRetentionOption = "30m",
    runpod_runsync_retention: RunpodRunsyncRetentionOption = "1m",
    metrics_port: MetricsPortOption = None,
) -> None:
    """Run ember on this machine: the API, the store (SQLite in the data dir, or --db), and
    local worker processes.

    Stop it with Ctrl-C or SIGTERM: every worker it started is stopped too.
    """
    from ember.core.quotas import from_flags
    from ember.server import ServerConfigError, serve

    try:
        quotas = from_flags(
            max_queued_jobs=max_queued_jobs,
            max_queued_bytes=max_queued_bytes,
            job_retention=job_retention,
            max_job_log=max_job_log,
            max_app_log=max_app_log,
            runpod_run_retention=runpod_run_retention,
            runpod_runsync_retention=runpod_runsync_retention,
        )
    except ValueError as exc:
        fail(exc)
    try:
        serve(
            host=host,
            port=port,
            data_dir=config.data_dir(data_dir),
            max_payload=max_payload,
            log_level=log_level,
            gpus=gpus,
            price_file=prices,
            templates=templates,
            tls_cert=tls_cert,
            tls_key=tls_key,
            sandbox=sandbox,
            tenant_isolation=tenant_isolation,
            durability=durability.value,
            db_url=db,
            backend=backend.value,
            ray_address=ray_address,
            advertise_url=advertise_url,
            max_connections=max_connections,
            header_timeout=header_timeout,
            quotas=quotas,
            metrics_port=metrics_port,
        )
    except ServerConfigError as exc:
        fail(exc)


app.command(name="deploy")(deploy_command.deploy)  # and `deploy --runpod` (docs/runpod.md)


@app.command()
def call(
    target: Annotated[
        str, typer.Argument(help="APP/FUNCTION, e.g. demo/square or demo/Embedder.embed")
    ],
    data: Annotated[
        str, typer.Option("--data", "-d", help="keyword arguments as a JSON object")
    ] = "{}",
    async_: Annotated[
        bool, typer.Option("--async", help="print the job id and return at once")
    ] = False,
    stream: Annotated[
        bool, typer.Option("--stream", help="print each yielded value as it arrives")
    ] = False,
) -> None:
    """Call a deployed function and print its output (or its job id with --async)."""
    app_name, fn = _split(target)
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise typer.BadParameter(f"--data is not valid JSON: {exc}") from None
    client = api_client()
    try:
        if async_ or stream:
            job_id = client.run(app_name, fn, payload)["id"]
            if async_:
                out.print(job_id)
                return
            for event, value in client.stream(job_id):
                if event == "output":
                    print_json(value)
                elif event == "done" and value["status"] != "COMPLETED":
                    print_json(value)
                    raise typer.Exit(1)
            return
        body = client.runsync(app_name, fn, payload)
        while body["status"] in ("IN_QUEUE", "IN_PROGRESS"):
            body = client.get_job(body["id"], wait=30)
    except EmberError as exc:
        fail(exc)
    if body["status"] == "COMPLETED":
        print_json(body["output"])
        t = body["timings"]
        err.print(
            f"[dim]{body['id']}  total {t['total_ms']:.1f} ms (queue {t['queue_ms']:.1f}, "
            f"cold start {t['cold_start_ms']:.1f}, load {t['load_ms']:.1f}, exec {t['exec_ms']:.1f}, "
            f"post {t['post_ms']:.1f})[/dim]"
        )
        return
    print_json(body)
    raise typer.Exit(1)


@app.command()
def job(
    job_id: Annotated[str, typer.Argument(help="a job id, as printed by `ember call --async`")],
    wait: Annotated[bool, typer.Option("--wait", help="wait until the job ends")] = False,
) -> None:
    """Show a job: status, output or error, timings."""
    client = api_client()
    try:
        body = client.get_job(job_id)
        while wait and body["status"] in ("IN_QUEUE", "IN_PROGRESS"):
            body = client.get_job(job_id, wait=30)
    except EmberError as exc:
        fail(exc)
    print_json(body)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="the job to cancel")]) -> None:
    """Cancel a queued or running job; running code is stopped."""
    try:
        body = api_client().cancel(job_id)
    except EmberError as exc:
        fail(exc)
    out.print(f"{body['id']}: {body['status']}")


@app.command()
def apps(
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """List deployed apps, their current version and functions."""
    try:
        items = api_client().list_apps()
    except EmberError as exc:
        fail(exc)
    if as_json:
        print_json(items)
        return
    if not items:
        out.print("no apps deployed yet: `ember deploy FILE`")
        return
    table = Table("app", "version", "functions", "tags")
    for a in items:
        table.add_row(
            a["name"],
            str(a["version"]),
            ", ".join(f["name"] for f in a["functions"]),
            ", ".join(f"{k}={v}" for k, v in a["tags"].items()),
        )
    out.print(table)


@app.command()
def logs(
    target: Annotated[str, typer.Argument(help="APP/FUNCTION")],
    tail: Annotated[int, typer.Option(help="how many recent lines")] = 100,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
    since: Annotated[
        str | None,
        typer.Option(
            help="only lines after this: '30m', '2h', '7d' ago, epoch seconds or ISO 8601"
        ),
    ] = None,
) -> None:
    """Print worker output of a function, each line with its job id; APP/Class shows every
    worker of a class: its methods' calls and its hooks' lines (`@ember.enter` prints)."""
    app_name, fn = _split(target)
    start = epoch(since, "--since") or 0.0
    client = api_client()
    first = True
    since_ts = start
    try:
        while True:
            records = client.logs(app_name, fn, tail=tail if first else 0, since=since_ts)
            first = False
            for r in records:
                stamp = time.strftime("%H:%M:%S", time.localtime(r["ts"]))
                stream = "" if r["stream"] == "stdout" else " [stderr]"
                out.print(
                    f"{stamp} {r['job'] or '-':<28}{stream} {r['line']}",
                    markup=False,
                    highlight=False,
                )
                since_ts = max(since_ts, r["ts"])
            if not follow:
                return
            since_ts = since_ts or time.time()
            time.sleep(0.5)  # poll: lines arrive in batches every 0.1 s
    except EmberError as exc:
        fail(exc)
    except KeyboardInterrupt:
        return


app.command()(usage)
app.command()(jobs)


@app.command()
def nodes() -> None:
    """The GPUs the server can hand out (simulated ones are labelled) and what runs on each."""
    items = request("GET", "/nodes")["nodes"]
    for node in items:
        out.print(f"[bold]{node['name']}[/bold] ({node['backend']} backend)")
        if not node["gpus"]:
            out.print("  no GPUs")
        for g in node["gpus"]:
            label = " [yellow](simulated)[/yellow]" if g["simulated"] else ""
            held = (
                ", ".join(f"{w['app']}/{w['unit']} {w['worker']}" for w in g["workers"]) or "free"
            )
            out.print(f"  {g['index']}: {g['type']} {g['memory_mib'] / 1024:g} GiB{label}: {held}")


admin.register(app)  # workspace, token, policy, secret, audit, doctor
app.command()(endpoints)
app.add_typer(env_app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
