"""The store under a real `ember server`: SQLite against PostgreSQL, on /run and /runsync.

    .venv/bin/python bench/store.py --pg postgresql+psycopg://root@127.0.0.1:5432/test

For each store in turn, interleaved over `--rounds`: a fresh server (SQLite in a new data dir;
PostgreSQL in a new database made through `--pg`'s and dropped after), one function deployed,
then `--clients` keep-alive clients call it back to back for `--seconds`: `/run` (accepted jobs
per second, each committed before its 202) and `/runsync` (calls per second and latency). JSON
goes to bench/results/store.json.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import loadgen
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from stats import emit, log, machine, summary

from ember.sdk.deploy import deploy_file
from ember.testing import LocalServer

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "import ember\napp = ember.App('st')\n\n@app.function(max_workers=2)\ndef noop() -> None:\n    return None\n"


@contextmanager
def database(admin_url: str) -> Iterator[str]:
    """A new database on the server of `admin_url`, its URL; dropped afterwards."""
    name = f"ember_bench_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def measure(args: list[str], seconds: float, clients: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ember-store-") as tmp:
        server = LocalServer(Path(tmp) / "data", args).start()
        try:
            path = Path(tmp) / "store_app.py"
            path.write_text(SOURCE)
            deploy_file(path, client=server.client)
            auth = {"Authorization": f"Bearer {server.token}"}
            out: dict[str, Any] = {}
            for verb, status in (("run", 202), ("runsync", 200)):
                request = loadgen.request_bytes(
                    "POST", f"{server.url}/v1/apps/st/noop/{verb}", {"input": {}}, auth
                )

                def check(got: int, body: bytes, status: int = status) -> None:
                    if got != status:
                        raise ValueError(f"{got}: {body[:200]!r}")

                latencies, errors, elapsed = loadgen.closed_loop(
                    server.url, request, check, clients, seconds
                )
                out[verb] = {
                    "per_s": round(len(latencies) / elapsed),
                    "errors": errors,
                    **summary(latencies),
                }
            return out
        finally:
            server.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", required=True, help="a PostgreSQL URL whose user may createdb")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "store.json")
    ns = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"sqlite": [], "postgresql": []}
    for _ in range(ns.rounds):
        runs["sqlite"].append(measure([], ns.seconds, ns.clients))
        with database(ns.pg) as url:
            runs["postgresql"].append(measure(["--db", url], ns.seconds, ns.clients))
        for store, got in runs.items():
            r = got[-1]
            log(
                f"{store}: /run {r['run']['per_s']}/s (p50 {r['run']['p50_ms']} ms), "
                f"/runsync {r['runsync']['per_s']}/s (p50 {r['runsync']['p50_ms']} ms)"
            )
    medians = {
        store: {
            verb: {
                k: statistics.median(r[verb][k] for r in got) for k in ("per_s", "p50_ms", "p99_ms")
            }
            for verb in ("run", "runsync")
        }
        for store, got in runs.items()
    }
    emit(
        {
            "machine": machine(),
            "clients": ns.clients,
            "seconds": ns.seconds,
            "runs": runs,
            "median": medians,
        },
        ns.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
