"""Usage rollups against real servers: `GET /v1/usage` from rollups equals the raw answer exactly.

A data dir is filled with 20,000 usage records written straight into the store (several
workspaces, apps, functions, GPU shapes, tags and policies over three days, with records that
start exactly on hour edges, cross them, or last no time at all), then a real server starts on
it and folds them into its rollups. Every answer, for windows that are whole days, whole hours,
unaligned, empty or inside one hour, is compared with `summarize` over the raw records: equal to
the last bit, not approximately. So are the rollup rows themselves with the sums they stand for,
after a restart, after real workers metered more usage, and after a kill -9 under per-second
billing (whose restart rounds the orphans' last records up): on SQLite and on PostgreSQL,
whose SQL rounds, casts and sums differently. A data dir at revision 0003 with usage and audit
rows in it is upgraded. Health keeps answering while usage is queried.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import insert, text

from conftest import Server, wait_for, worker_pids
from ember.control.meter import read_usage, usage_row
from ember.core.metering import (
    Phase,
    bucket_of,
    canonical_tags,
    make_record,
    micros,
    pico,
    summarize,
)
from ember.core.pricing import PriceTable, Resources
from ember.store import tables
from ember.store.db import MIGRATIONS, make_engine, migrate, sqlite_url

DAY = 86400
HOUR = 3600
PRICES = PriceTable()
SHAPES = [
    Resources("L4", 1.0, cpu=4, memory_gib=16),
    Resources("H100", 2.0, cpu=16, memory_gib=128),
    Resources("L4", 0.25, cpu=1, memory_gib=4),
    Resources(None, 0.0, cpu=1, memory_gib=1),
]


def usage_rows(n: int, t0: float, seed: int = 11) -> list[dict[str, Any]]:
    """`n` records as the meter writes them, with hour edges hit on purpose."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        start = t0 + rng.uniform(0, 3 * DAY)
        kind = rng.random()
        if kind < 0.05:
            start = float(bucket_of(start, HOUR))  # exactly on an hour edge
        elif kind < 0.10:
            start = bucket_of(start, HOUR) + HOUR - rng.uniform(0.001, 0.9)  # crosses one
        length = 0.0 if rng.random() < 0.03 else rng.uniform(0.05, 1.0)
        res = rng.choice(SHAPES)
        tags = rng.choice([{}, {"team": "search"}, {"project": "rag", "team": "ads"}])
        tags_json = json.dumps(dict(reversed(list(tags.items()))))  # stored order varies
        r = make_record(
            worker=f"w{rng.randrange(300)}",
            app=f"a{rng.randrange(5)}",
            unit=rng.choice("fgh"),
            version=1,
            phase=rng.choice(list(Phase)),
            start=start,
            end=start + length,
            resources=res,
            prices=PRICES,
            tags=tags,
            starts=int(rng.random() < 0.05),
            extra_billed_ms=rng.choice([0.0, 0.0, 0.0, 417.123]),
            workspace=rng.choice(["default", "default", "default", "team"]),
            policy=rng.choice([None, None, "batch"]),
        )
        rows.append(usage_row(r, tags_json))
    return rows


T0 = float(bucket_of(time.time() - 4 * DAY, DAY))
"""A UTC midnight four days ago: the records span three days from there."""


def fill(
    data_dir: Path, rows: list[dict[str, Any]], revision: str = "head", db: str | None = None
) -> None:
    """Migrate the store (`db`, else SQLite in `data_dir`) to `revision` and write `rows`."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = make_engine(db or sqlite_url(data_dir))
    if revision == "head":
        migrate(engine)
    else:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    with engine.begin() as conn:
        for i in range(0, len(rows), 5000):
            conn.execute(insert(tables.usage), rows[i : i + 5000])
    engine.dispose()


def db_rows(server: Server, *queries: str) -> list[dict[str, Any]]:
    """The rows of each query, all read in one transaction (one snapshot of the store)."""
    if not server.db_url.startswith("sqlite"):
        engine = make_engine(server.db_url)
        try:
            with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
                got = [[dict(r) for r in conn.execute(text(q)).mappings()] for q in queries]
        finally:
            engine.dispose()
        return got[0] if len(queries) == 1 else got  # type: ignore[return-value]
    db = sqlite3.connect(f"file:{server.data_dir / 'ember.db'}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        db.execute("BEGIN")
        out = [[dict(r) for r in db.execute(q)] for q in queries]
        db.rollback()
    finally:
        db.close()
    return out[0] if len(queries) == 1 else out  # type: ignore[return-value]


def rollup_matches_records(server: Server) -> None:
    """Each rollup row holds exactly the sums of the records it stands for, and the mark is
    past every record (read in one snapshot: workers may be metering meanwhile)."""
    records, rollup, marks, last_id = db_rows(
        server,
        "SELECT * FROM usage",
        "SELECT * FROM usage_rollup",
        "SELECT value FROM marks WHERE name = 'usage_rollup'",
        "SELECT max(id) AS id FROM usage",
    )
    assert marks == [{"value": last_id[0]["id"] or 0}]
    expected: dict[tuple[Any, ...], list[Any]] = {}
    for r in records:
        shape = (
            r["app"],
            r["unit"],
            r["phase"],
            r["gpu_type"] or "",
            r["gpu_count"],
            r["cpu"],
            r["policy"] or "",
            canonical_tags(json.loads(r["tags"])),
        )
        for span, step in (("hour", HOUR), ("day", DAY)):
            cell = expected.setdefault(
                (r["workspace"], span, bucket_of(r["start"], step), *shape), [0, 0, 0, 0, 0.0]
            )
            cell[0] += micros(r["billed_ms"])
            cell[1] += pico(r["usd"])
            cell[2] += r["starts"]
            cell[3] += 1
            cell[4] = max(cell[4], r["end"] - r["start"])
    got = {
        (
            r["workspace"],
            r["span"],
            r["bucket"],
            r["app"],
            r["unit"],
            r["phase"],
            r["gpu_type"],
            r["gpu_count"],
            r["cpu"],
            r["policy"],
            r["tags"],
        ): [r["billed_us"], r["usd_pico"], r["starts"], r["records"], r["longest_s"]]
        for r in rollup
    }
    assert got.keys() == expected.keys()
    diff = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert not diff, list(diff.items())[:5]


def windows() -> list[tuple[float | None, float | None]]:
    edge = T0 + DAY + 5 * HOUR  # an hour edge where zero-length records may sit
    return [
        (None, None),
        (T0 + DAY, T0 + 2 * DAY),  # one whole day
        (T0 + 0.5 * DAY + 17.25, T0 + 2.6 * DAY - 3.5),  # unaligned, days and hours inside
        (edge, edge + HOUR),  # exactly one hour
        (edge, None),
        (None, edge),
        (edge + 100.5, edge + 2000.25),  # inside one hour
        (edge - 0.5, edge + 0.5),  # across an edge, no whole hour
        (edge, edge),  # empty
        (edge + 10, edge),  # backwards: empty
        (T0 + 2 * DAY + 7 * HOUR, T0 + 3 * DAY + 30 * 60),  # hours and a day boundary
    ]


QUERIES = [
    ("app", None),
    ("function,phase", "hour"),
    ("tag:team", "day"),
    ("gpu,policy", None),
    ("tag:project,app", "hour"),
    ("", "day"),
]


def raw_answer(
    server: Server,
    records: list[Any],
    group_by: str,
    since: float | None,
    until: float | None,
    granularity: str | None,
) -> list[dict[str, Any]]:
    """What the API must answer: `summarize` over the raw records overlapping the window."""
    chosen = [
        r
        for r in records
        if (since is None or r.end > since) and (until is None or r.start < until)
    ]
    groups = [g for g in group_by.split(",") if g]
    return summarize(chosen, groups, granularity, PRICES)


def api_answer(
    server: Server,
    token: str | None,
    group_by: str,
    since: float | None,
    until: float | None,
    granularity: str | None,
) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"group_by": group_by}
    if since is not None:
        params["since"] = repr(since)
    if until is not None:
        params["until"] = repr(until)
    if granularity is not None:
        params["granularity"] = granularity
    kw = {} if token is None else {"token": token}
    resp = server.http("GET", "/v1/usage", params=params, **kw)
    assert resp.status_code == 200, resp.text
    groups: list[dict[str, Any]] = resp.json()["groups"]
    return groups


def answers_equal_raw(
    server: Server, workspace: str = "default", token: str | None = None, *, first: int = 99
) -> int:
    """Every window (or the `first` few) and query form: the API's answer is the raw answer,
    exactly. How many groups were compared."""
    engine = make_engine(server.db_url)
    try:
        records = read_usage(engine, workspace, None, None)
    finally:
        engine.dispose()
    compared = 0
    for i, (since, until) in enumerate(windows()[:first]):
        for j in (i, i + 2):
            group_by, granularity = QUERIES[j % len(QUERIES)]
            got = api_answer(server, token, group_by, since, until, granularity)
            want = raw_answer(server, records, group_by, since, until, granularity)
            assert got == want, (since, until, group_by, granularity)
            compared += len(got)
    return compared


@pytest.fixture
def filled(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """A server on a data dir holding 20,000 records written before it started."""
    servers: list[Server] = []

    def make(*args: str, revision: str = "head", n: int = 20_000, db: str | None = None) -> Server:
        data_dir = tmp_path / f"data{len(servers)}"
        if db is not None and db.startswith("sqlite"):
            db = None  # `store_url`'s SQLite: the data dir's own file, as without --db
        fill(data_dir, usage_rows(n, T0), revision, db)
        server = Server(data_dir, [*args, "--db", db] if db else list(args))
        servers.append(server)
        return server.start(timeout=60)

    yield make
    for s in servers:
        s.shutdown(timeout=15)


def test_rollups_answer_exactly_what_the_raw_records_do(
    store_url: str, filled: Callable[..., Server]
) -> None:
    server = filled(db=store_url)
    rollup_matches_records(server)
    assert answers_equal_raw(server) > 200
    # the other workspace sees its own usage, from the same rollups
    team = server.http("POST", "/v1/workspaces", json={"name": "team"})
    assert team.status_code == 201, team.text
    assert answers_equal_raw(server, "team", team.json()["token"]) > 50
    # zero-length records on the edge the windows start at are really there
    edge = T0 + DAY + 5 * HOUR
    hits = db_rows(server, f"SELECT count(*) AS n FROM usage WHERE start = {edge!r}")
    assert hits[0]["n"] > 0

    # a restart folds nothing twice
    server.restart(timeout=60)
    rollup_matches_records(server)
    assert answers_equal_raw(server, first=4) > 50


NAP = """
import time

import ember

app = ember.App("napper", tags={"team": "search"})


@app.function(idle_timeout=60)
def nap(s: float) -> float:
    time.sleep(s)  # sleep-ok: the deployed function's simulated work
    return s
"""


def test_usage_the_meter_writes_is_folded_as_it_is_written(
    store_url: str, filled: Callable[..., Server], tmp_path: Path
) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('billing = "second"\n')
    server = filled("--prices", str(prices), n=2000, db=store_url)
    server.deploy(NAP)
    for _ in range(3):
        assert server.client.runsync("napper", "nap", {"s": 0.05})["status"] == "COMPLETED"
    [napper] = [
        g
        for g in api_answer(server, None, "app", None, None, None)  # meters up to now
        if g["key"]["app"] == "napper"
    ]
    assert napper["busy_seconds"] > 0 and napper["cold_starts"] >= 1
    rollup_matches_records(server)  # while its worker lives and is metered every second

    # killed with the worker live: the restart rounds its last record up to whole seconds,
    # a change to a record already folded, which the rollups take as well
    server.kill9()
    wait_for(lambda: not worker_pids(server.data_dir), timeout=15, what="orphans to exit")
    server.restart(timeout=60)
    rollup_matches_records(server)
    answers_equal_raw(server)  # nothing runs now: the answers hold still
    cells = db_rows(server, "SELECT billed_us FROM usage_rollup WHERE app = 'napper'")
    assert sum(c["billed_us"] for c in cells) % 2_000_000 == 0  # whole seconds, hour and day


def test_health_answers_while_usage_is_queried(filled: Callable[..., Server]) -> None:
    server = filled()
    latencies: list[float] = []
    statuses: set[int] = set()
    stop = threading.Event()

    def ping() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                t = time.perf_counter()
                statuses.add(client.get(server.url + "/v1/health").status_code)
                latencies.append(time.perf_counter() - t)

    pinger = threading.Thread(target=ping, daemon=True)
    pinger.start()
    try:
        deadline = time.monotonic() + 3
        queries = 0
        while time.monotonic() < deadline:
            for group_by, granularity in QUERIES:
                api_answer(server, None, group_by, None, None, granularity)
                queries += 1
    finally:
        stop.set()
        pinger.join()
    assert queries >= len(QUERIES) and statuses == {200}
    assert len(latencies) > 20, "health answered while usage was queried"
    assert max(latencies) < 0.5, max(latencies)


def test_a_0003_data_dir_with_usage_and_audit_rows_is_upgraded(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    fill(data_dir, usage_rows(5000, T0), revision="0003")
    with sqlite3.connect(data_dir / "ember.db") as db:
        db.execute(
            "INSERT INTO audit (ts, actor, action, outcome, ip) "
            "VALUES (?, 'anonymous', 'auth.failed', 'refused', '10.0.0.7')",
            (time.time() - 60,),
        )
    server = Server(data_dir)
    try:
        server.start(timeout=60)
        assert db_rows(server, "SELECT version_num FROM alembic_version") == [
            {"version_num": "0009"}
        ]
        rollup_matches_records(server)
        answers_equal_raw(server)
        indexes = {r["name"] for r in db_rows(server, "PRAGMA index_list(jobs)")}
        assert "ix_jobs_finished_at" in indexes
        # the event from before counts as one, and still cannot be edited
        events = server.http("GET", "/v1/audit").json()["events"]
        assert [(e["action"], e["ip"], e["count"], e["last_ts"]) for e in events] == [
            ("auth.failed", "10.0.0.7", 1, None)
        ]
        db = sqlite3.connect(data_dir / "ember.db", timeout=10)
        try:
            for statement in (
                "UPDATE audit SET count = 5",
                "UPDATE audit SET count = 5, last_ts = ts + 1",
                "DELETE FROM audit",
            ):
                with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                    db.execute(statement)
        finally:
            db.close()
    finally:
        server.shutdown(timeout=15)
