"""The usage rollups of the store: folding records into them, and usage queries over both.

`usage_rollup` holds the usage records' exact integer sums per workspace, hour or day, and
shape (`core.metering.Shape`); the `marks` row "usage_rollup" says up to which record id. The
meter folds new records in the transaction that writes them, and the server's start folds any
written otherwise (a data dir from before rollups), so rollups and records never disagree.
`GET /v1/usage` sums rollup rows for the whole hours and days of its window and reads raw
records only at its edges (`core.rollup.plan`); blocking, so the plane runs it in a thread.
The meter's private helper.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from sqlalchemy import BigInteger, Connection, Engine, case, cast, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError

from ember.core.metering import (
    PICO,
    Shape,
    Totals,
    bucket_of,
    canonical_tags,
    check_query,
    make_shape,
    make_totals,
    shape_fields,
    summarize_cells,
)
from ember.core.pricing import PriceTable
from ember.core.rollup import SPANS, plan
from ember.store import tables

ROLLUP_MARK = "usage_rollup"
_SHAPE = ("app", "unit", "phase", "gpu_type", "gpu_count", "cpu", "policy", "tags")
_KEY = ("workspace", "span", "bucket", *_SHAPE)
_SUMS = ("billed_us", "usd_pico", "starts", "records")

RollupCells = dict[tuple[str, str, int, Shape], Totals]
"""(span, workspace, bucket, shape) -> the sums to add to that rollup row."""


def row_cell(row: Any, tags_cache: dict[str, str]) -> tuple[str, float, Shape, Totals]:
    """A usage row as (workspace, start, shape, totals); `tags_cache` maps stored tags to their
    canonical form (a handful of distinct tag sets among many rows)."""
    tags = tags_cache.get(row["tags"])
    if tags is None:
        tags = tags_cache[row["tags"]] = canonical_tags(json.loads(row["tags"]))
    shape = make_shape(
        row["app"],
        row["unit"],
        row["phase"],
        row["gpu_type"],
        row["gpu_count"],
        row["cpu"],
        row["policy"],
        tags,
    )
    totals = make_totals(row["billed_ms"], row["usd"], row["starts"], row["start"], row["end"])
    return row["workspace"], row["start"], shape, totals


def _int_sql(x: Any, dialect: str) -> Any:
    """`core.metering.to_int` in SQL (PostgreSQL's CAST rounds; SQLite's truncates)."""
    up, down = x + 0.5, -x + 0.5
    if dialect == "postgresql":
        up, down = func.trunc(up), func.trunc(down)
    return case((x >= 0, cast(up, BigInteger)), else_=-cast(down, BigInteger))


def _bucket_sql(t: Any, step: int) -> Any:
    """`core.metering.bucket_of` in SQL, for times after 1970."""
    b = cast(t / step, BigInteger) * step
    return case((b > t, b - step), (b + step <= t, b + step), else_=b)


def fold_usage(conn: Connection) -> int:
    """Add every usage record past the rollup's mark to the rollups and move the mark; how many
    records that was. In the transaction that wrote them, or at start for older ones: summed by
    the database per hour (exact integer sums), then per day and canonical tags here."""
    m, u = tables.marks.c, tables.usage.c
    mark = conn.execute(select(m.value).where(m.name == ROLLUP_MARK)).scalar()
    if mark is None:
        mark = 0
        conn.execute(insert(tables.marks).values(name=ROLLUP_MARK, value=0))
    upto = conn.execute(select(func.max(u.id))).scalar()
    if upto is None or upto <= mark:
        return 0
    dialect = conn.dialect.name
    hour = _bucket_sql(u.start, SPANS["hour"]).label("bucket")
    keys = (u.workspace, hour, *(u[c] for c in _SHAPE))
    q = (
        select(
            *keys,
            func.sum(_int_sql(u.billed_ms * 1000, dialect)),
            func.sum(_int_sql(u.usd * PICO, dialect)),
            func.sum(u.starts),
            func.count(),
            func.max(u.end - u.start),
        )
        .where(u.id > mark, u.id <= upto)
        .group_by(*keys)
    )
    cells: RollupCells = {}
    tags_cache: dict[str, str] = {}
    folded = 0
    for row in conn.execute(q):
        ws, bucket, app, unit, phase, gpu_type, gpu_count, cpu, policy, raw_tags = row[:10]
        tags = tags_cache.get(raw_tags)
        if tags is None:
            tags = tags_cache[raw_tags] = canonical_tags(json.loads(raw_tags))
        shape = make_shape(app, unit, phase, gpu_type, gpu_count, cpu, policy, tags)
        # PostgreSQL's SUM of bigints is a numeric (a Decimal here): made exact ints again
        billed_us, usd_pico, starts, records = (int(v) for v in row[10:14])
        longest = row[14]
        folded += records
        for span, step in SPANS.items():
            key = (span, ws, bucket_of(bucket, step), shape)
            totals = Totals(billed_us, usd_pico, starts, records, max(0.0, longest))
            cell = cells.get(key)
            if cell is None:
                cells[key] = totals
            else:
                cell.add(totals)
    upsert(conn, cells)
    conn.execute(update(tables.marks).where(m.name == ROLLUP_MARK).values(value=upto))
    return folded


def upsert(conn: Connection, cells: RollupCells) -> None:
    """Add each cell's sums to its rollup row (made when missing)."""
    if not cells:
        return
    t = tables.usage_rollup
    rows = [
        {
            "workspace": ws,
            "span": span,
            "bucket": bucket,
            **{f: getattr(shape, f) for f in _SHAPE},
            **{f: getattr(totals, f) for f in _SUMS},
            "longest_s": totals.longest_s,
        }
        for (span, ws, bucket, shape), totals in cells.items()
    ]
    pg = conn.dialect.name == "postgresql"
    stmt = postgresql.insert(t) if pg else sqlite.insert(t)
    longest = (func.greatest if pg else func.max)(t.c.longest_s, stmt.excluded.longest_s)
    stmt = stmt.on_conflict_do_update(
        index_elements=[t.c[k] for k in _KEY],
        set_={**{f: t.c[f] + stmt.excluded[f] for f in _SUMS}, "longest_s": longest},
    )
    conn.execute(stmt, rows)


def usage_cells(
    conn: Connection,
    workspace: str,
    since: float | None,
    until: float | None,
    granularity: str | None,
    fields: frozenset[str] = frozenset(_SHAPE),
) -> list[tuple[float, Shape, Totals]]:
    """The usage of `workspace` overlapping [since, until) as (time, shape, totals) cells for
    `summarize_cells`: rollup rows for whole buckets (summed over the shape fields a query does
    not need), raw records at the edges."""
    r, u = tables.usage_rollup.c, tables.usage.c
    longest = 0.0
    if since is not None:
        longest = (
            conn.execute(
                select(func.max(r.longest_s)).where(r.workspace == workspace, r.span == "day")
            ).scalar()
            or 0.0
        )
    p = plan(since, until, granularity, longest)
    spans = ([("day", p.days)] if p.days else []) + [("hour", h) for h in p.hours]
    out: list[tuple[float, Shape, Totals]] = []
    for span, (lo, hi) in spans:
        where = [r.workspace == workspace, r.span == span]
        if lo > -math.inf:
            where.append(r.bucket >= lo)
        if hi < math.inf:
            where.append(r.bucket < hi)
        out += _rollup_cells(conn, where, fields, by_bucket=granularity is not None)
    tags_cache: dict[str, str] = {}
    for lo, hi in p.raw:
        q = select(tables.usage).where(u.workspace == workspace)
        if lo > -math.inf:
            q = q.where(u.start >= lo)
        if hi < math.inf:
            q = q.where(u.start < hi)
        if since is not None:
            q = q.where(u.end > since)
        if until is not None:
            q = q.where(u.start < until)
        for edge in conn.execute(q).mappings():
            _, start, shape, totals = row_cell(edge, tags_cache)
            out.append((start, shape, totals))
    if p.zero_at is not None:
        q = select(tables.usage).where(
            u.workspace == workspace, u.start == p.zero_at, u.end <= p.zero_at
        )
        for zero in conn.execute(q).mappings():
            _, start, shape, t = row_cell(zero, tags_cache)
            out.append((start, shape, Totals(-t.billed_us, -t.usd_pico, -t.starts, -t.records)))
    return out


def _rollup_cells(
    conn: Connection, where: list[Any], fields: frozenset[str], *, by_bucket: bool
) -> list[tuple[float, Shape, Totals]]:
    """The rollup rows matching `where`, summed by the database per bucket (if `by_bucket`) and
    the shape `fields` a query needs (`core.metering.shape_fields`): exact integer sums, so the
    same cells as summing the rows here, far fewer of them to carry over."""
    r = tables.usage_rollup.c
    kept = [c for c in _SHAPE if c in fields]
    keys = [r.bucket] if by_bucket else []
    keys += [r[c] for c in kept]
    sums = [func.sum(r[c]) for c in _SUMS]
    try:
        rows = conn.execute(select(*keys, *sums).where(*where).group_by(*keys)).all()
    except OperationalError as exc:  # SQLite's integer SUM overflows past $9.2M in one cell
        if "overflow" not in str(exc):
            raise
        rows = conn.execute(select(*keys, *(r[c] for c in _SUMS)).where(*where)).all()
    out = []
    at = 1 if by_bucket else 0
    for row in rows:
        shape: dict[str, Any] = dict.fromkeys(_SHAPE, "")
        shape.update(zip(kept, row[at : at + len(kept)], strict=True))
        t = row[0] if by_bucket else 0.0
        totals = (int(v) for v in row[at + len(kept) :])  # PostgreSQL's SUM: Decimal
        out.append((t, Shape(**shape), Totals(*totals)))
    return out


def summarize_usage(
    engine: Engine,
    workspace: str,
    group_by: Iterable[str],
    since: float | None,
    until: float | None,
    granularity: str | None,
    prices: PriceTable,
) -> list[dict[str, Any]]:
    """`GET /v1/usage`: totals per group over the rollups and edge records; blocking, run it in
    a thread (ValueError for a bad group or granularity)."""
    names = check_query(list(group_by), granularity)
    with engine.connect() as conn:
        cells = usage_cells(conn, workspace, since, until, granularity, shape_fields(names))
    return summarize_cells(cells, names, granularity, prices)
