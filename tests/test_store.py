"""The store on SQLite and on PostgreSQL alike (`store_url`): the same Alembic migrations build
the schema `tables.py` declares, upgrade old rows, refuse edits of the audit trail, and the
queries that differ by dialect (CAST, SUM, upserts) answer the same; a bad URL is a clear error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, insert, select, text
from sqlalchemy.exc import DBAPIError

from ember.control.audit import AuditLog
from ember.control.policies import Spend
from ember.control.rollups import fold_usage, usage_cells
from ember.core.metering import Totals
from ember.store import tables
from ember.store.db import MIGRATIONS, StoreUnavailable, make_engine, migrate, open_store

DAY = 86400.0


def config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def alembic(engine: Engine, verb: str, revision: str) -> None:
    cfg = config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, verb)(cfg, revision)


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    e = make_engine(store_url)
    yield e
    e.dispose()


def schema_drift(engine: Engine) -> list[Any]:
    """What differs between the migrated database and `tables.metadata`: tables, columns and
    their types, indexes, constraints. Server defaults are left out: 0005 gave `bundles` and
    `envs` a workspace column without the default `tables.py` declares, on both stores."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, tables.metadata))


def revision_of(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT version_num FROM alembic_version")).scalar())


def test_the_migrations_build_the_schema_tables_py_declares(engine: Engine) -> None:
    migrate(engine)
    migrate(engine)  # a second start finds nothing to do
    head = ScriptDirectory.from_config(config()).get_current_head()
    assert revision_of(engine) == head
    assert schema_drift(engine) == []


def test_each_revision_upgrades_in_turn_and_the_later_ones_downgrade(engine: Engine) -> None:
    revisions = [s.revision for s in ScriptDirectory.from_config(config()).walk_revisions()]
    for revision in reversed(revisions):  # oldest first, one transaction each
        alembic(engine, "upgrade", revision)
        assert revision_of(engine) == revision
    alembic(engine, "downgrade", "0003")  # 0003 rebuilt tables: the oldest a downgrade reaches
    assert revision_of(engine) == "0003"
    migrate(engine)
    assert schema_drift(engine) == []


def test_rows_from_before_workspaces_are_upgraded_into_the_default_one(engine: Engine) -> None:
    alembic(engine, "upgrade", "0002")
    now = time.time()
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO tokens (name, hash, created_at) VALUES ('admin', :h, :t)"),
            {"h": "a" * 64, "t": now},
        )
        conn.execute(
            text(
                "INSERT INTO apps (name, tags, current_version, created_at, updated_at) "
                "VALUES ('legacy', '{}', 2, :t, :t)"
            ),
            {"t": now},
        )
        for v in (1, 2):
            conn.execute(
                text(
                    "INSERT INTO versions (app, version, filename, source, functions, "
                    "created_at) VALUES ('legacy', :v, 'legacy.py', '', '[]', :t)"
                ),
                {"v": v, "t": now},
            )
        conn.execute(
            text(
                "INSERT INTO jobs (id, app, function, status, input, attempts, created_at) "
                "VALUES ('job-1', 'legacy', 'square', 'IN_QUEUE', '{}', 0, :t)"
            ),
            {"t": now},
        )
    migrate(engine)
    with engine.begin() as conn:
        token = conn.execute(select(tables.tokens)).mappings().one()
        assert (token["workspace"], token["scope"], token["bootstrap"]) == (
            "default",
            "admin",
            True,
        )
        apps = conn.execute(select(tables.apps.c.workspace, tables.apps.c.name)).all()
        assert [tuple(a) for a in apps] == [("default", "legacy")]
        job = conn.execute(select(tables.jobs.c.workspace, tables.jobs.c.status)).one()
        assert tuple(job) == ("default", "IN_QUEUE")
        # ids copied into the rebuilt `versions`: the next one made follows them
        row = {"app": "legacy", "version": 3, "filename": "legacy.py", "source": ""}
        new = conn.execute(
            insert(tables.versions).values(**row, functions="[]", created_at=now)
        ).inserted_primary_key
        old = conn.execute(select(tables.versions.c.id).where(tables.versions.c.version < 3))
        assert new is not None and new[0] > max(old.scalars())


def test_the_audit_trail_refuses_edits_in_sql_but_the_refusal_counters(engine: Engine) -> None:
    migrate(engine)
    log = AuditLog(engine)
    log.record(workspace="default", actor="token:default/admin", action="app.deploy", outcome="ok")
    for _ in range(3):  # counted: one row, its count raised at the checkpoint
        log.record(
            workspace=None,
            actor="anonymous",
            action="auth.failed",
            outcome="refused",
            ip="10.0.0.1",
        )
    log.checkpoint(time.time())
    events = {e["action"]: e for e in log.read("default", None, None, 10, unattributed=True)}
    assert events["auth.failed"]["count"] == 3
    deploy, refused = events["app.deploy"]["id"], events["auth.failed"]["id"]
    refusals = [
        f"UPDATE audit SET outcome = 'ok' WHERE id = {deploy}",
        f"UPDATE audit SET count = 9 WHERE id = {deploy}",  # not a counter row
        f"UPDATE audit SET count = 1 WHERE id = {refused}",  # a counter only grows
        f"UPDATE audit SET ip = '10.0.0.2', count = 4 WHERE id = {refused}",
        "DELETE FROM audit",
    ]
    if engine.dialect.name == "postgresql":
        refusals.append("TRUNCATE audit")
    for statement in refusals:
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
    with engine.begin() as conn:  # what the checkpoint itself does
        conn.execute(
            text(f"UPDATE audit SET count = 5, last_ts = last_ts + 1 WHERE id = {refused}")
        )
    events = {e["action"]: e for e in log.read("default", None, None, 10, unattributed=True)}
    assert events["auth.failed"]["count"] == 5 and events["app.deploy"]["outcome"] == "ok"


def usage(start: float, end: float, usd: float, **kw: Any) -> dict[str, Any]:
    row = {
        "worker": "w1",
        "app": "a",
        "unit": "f",
        "version": 1,
        "phase": "busy",
        "start": start,
        "end": end,
        "billed_ms": (end - start) * 1000,
        "gpu_type": "L4",
        "gpu_count": 1.0,
        "cpu": 4.0,
        "memory_gib": 16.0,
        "usd": usd,
        "tags": json.dumps({"team": "x"}),
        "starts": 0,
        "workspace": "default",
        "policy": "batch",
    }
    return {**row, **kw}


def test_rollups_and_spend_count_the_same_buckets_and_sums(engine: Engine) -> None:
    """PostgreSQL's CAST rounds where SQLite's truncates, and its SUM of bigints is a numeric:
    the rollups and the daily spend must still land in the same UTC hours and days, exactly."""
    migrate(engine)
    day0 = float(int(time.time() // DAY) - 3) * DAY
    rows = [
        usage(day0 + 0.75 * DAY, day0 + 0.75 * DAY + 2.5, 0.000_001_5),  # late in a day
        usage(day0 + DAY - 0.25, day0 + DAY + 0.5, 0.25),  # crosses midnight
        usage(day0 + DAY, day0 + DAY, 0.0),  # zero length, on midnight
        usage(day0 + 1.5 * DAY + 3599.75, day0 + 1.5 * DAY + 3600.25, 1e6, starts=1),
    ]
    with engine.begin() as conn:
        conn.execute(insert(tables.usage), rows)
        assert fold_usage(conn) == len(rows)
        assert fold_usage(conn) == 0  # the mark moved past them
    with engine.connect() as conn:
        got = conn.execute(
            select(tables.usage_rollup).order_by(
                tables.usage_rollup.c.span, tables.usage_rollup.c.bucket
            )
        ).mappings()
        cells = [(r["span"], r["bucket"], r["records"], r["usd_pico"]) for r in got]
        assert cells == [  # a record counts in the hour and day it starts in
            ("day", int(day0), 2, 1_500_000 + 250_000_000_000),
            ("day", int(day0 + DAY), 2, 1_000_000 * 10**12),
            ("hour", int(day0 + 18 * 3600), 1, 1_500_000),
            ("hour", int(day0 + DAY - 3600), 1, 250_000_000_000),
            ("hour", int(day0 + DAY), 1, 0),
            ("hour", int(day0 + 1.5 * DAY), 1, 1_000_000 * 10**12),
        ]
        whole = usage_cells(conn, "default", None, None, None)
        assert all(isinstance(t.usd_pico, int) for _, _, t in whole)  # ints, not Decimals
        total = Totals()
        for _, _, t in whole:
            total.add(t)
        assert (total.records, total.usd_pico, total.starts) == (4, 1_000_000_250_001_500_000, 1)
        spend = Spend()
        spend.load(conn, day0 + 2 * DAY)
    days = spend._daily[("default", "batch")]
    d0 = int(day0 // DAY)
    assert dict(days) == {d0: 0.000_001_5 + 0.25, d0 + 1: 1e6}


def test_a_store_out_of_reach_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(StoreUnavailable, match="cannot connect to the database") as info:
        open_store("postgresql+psycopg://nobody@127.0.0.1:1/nothing")
    assert "EMBER_DATABASE_URL" in str(info.value) and "Traceback" not in str(info.value)
    with pytest.raises(StoreUnavailable, match="no driver"):
        make_engine("postgresql+pg8000://nobody@127.0.0.1/nothing")
    with pytest.raises(StoreUnavailable, match="not a store ember runs on"):
        make_engine("mysql://nobody@127.0.0.1/nothing")
    # plain postgresql:// means psycopg 3, the driver ember ships with
    assert make_engine("postgresql://nobody@127.0.0.1/x").dialect.driver == "psycopg"


def test_an_insert_under_a_used_idempotency_key_says_it_inserted_nothing(engine: Engine) -> None:
    """What keeps two servers from both running one keyed job: the store's unique index, and an
    insert that tells whether it inserted (psycopg's rowcount for ON CONFLICT is -1 either way)."""
    from ember.control import job_rows

    migrate(engine)
    stmt = job_rows.insert_unless_keyed(engine)
    row = {
        **{"app": "a", "function": "f", "status": "IN_QUEUE", "input": "{}", "attempts": 0},
        **{"created_at": time.time(), "workspace": "default", "policy": None, "token": None},
        **{"tags": None, "idempotency_key": "k1", "request_digest": "d", "owner": None},
    }
    first, twin = (job_rows.InsertOnce(stmt, {**row, "id": i}) for i in ("job-1", "job-2"))
    for op in (first, twin):
        with engine.begin() as conn:
            op(conn)
    assert (first.inserted, twin.inserted) == (True, False)
    with engine.connect() as conn:
        ids = conn.execute(select(tables.jobs.c.id)).scalars().all()
    assert ids == ["job-1"]
