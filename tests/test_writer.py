"""The store's writer: group commit, statements joined into executemany, one bad row not losing
the others. Against a real SQLite file and a real PostgreSQL database (`store_url`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, insert, select, update
from sqlalchemy import bindparam as bp

from ember.store.db import make_engine
from ember.store.writer import Execute, Writer, _grouped, execute

meta = MetaData()
items = Table(
    "items",
    meta,
    Column("id", Integer, primary_key=True),
    Column("state", String, nullable=False),
)
INSERT = insert(items)
FINISH = update(items).where(items.c.id == bp("item_id")).values(state=bp("new_state"))


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    e = make_engine(store_url)
    meta.create_all(e)
    yield e
    e.dispose()


def rows(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return {r.id: r.state for r in conn.execute(select(items))}


def test_runs_of_one_statement_become_one_execute_in_order() -> None:
    a, b = {"id": 1, "state": "q"}, {"id": 2, "state": "q"}
    done = {"item_id": 1, "new_state": "done"}
    other = Execute(FINISH)  # no parameters: never joined

    def custom(conn: Any) -> None:
        pass

    ops = [execute(INSERT, a), execute(INSERT, b), execute(FINISH, done), other, custom]
    out = _grouped(ops)
    assert out == [Execute(INSERT, [a, b]), Execute(FINISH, done), other, custom]


def test_rows_of_other_columns_or_statements_are_not_joined() -> None:
    a, b = {"id": 1, "state": "q"}, {"id": 2}
    assert _grouped([execute(INSERT, a), execute(INSERT, b)]) == [
        Execute(INSERT, a),
        Execute(INSERT, b),
    ]
    twin = insert(items)  # an equal statement, but another object: kept apart
    assert len(_grouped([execute(INSERT, a), execute(twin, {"id": 3, "state": "q"})])) == 2
    # a run is broken by anything between, so order is kept exactly
    c = {"id": 3, "state": "q"}
    fin = {"item_id": 1, "new_state": "done"}
    out = _grouped([execute(INSERT, a), execute(FINISH, fin), execute(INSERT, c)])
    assert out == [Execute(INSERT, a), Execute(FINISH, fin), Execute(INSERT, c)]


def test_interleaved_writes_land_as_submitted(engine: Engine) -> None:
    async def main() -> None:
        writer = Writer(engine, asyncio.get_running_loop())
        futures = []
        for i in range(300):
            futures.append(writer.submit(execute(INSERT, {"id": i, "state": "queued"})))
            if i % 3 == 0:
                params = {"item_id": i, "new_state": "done"}
                futures.append(writer.submit(execute(FINISH, params)))
        await asyncio.gather(*futures)
        writer.close()

    asyncio.run(main())
    got = rows(engine)
    assert len(got) == 300
    assert all(state == ("done" if i % 3 == 0 else "queued") for i, state in got.items())


def test_one_bad_row_fails_alone_and_the_rest_of_its_batch_lands(engine: Engine) -> None:
    async def main() -> list[BaseException | None]:
        writer = Writer(engine, asyncio.get_running_loop())
        # the same id twice: the second insert breaks the primary key
        params = [{"id": 1, "state": "a"}, {"id": 2, "state": "b"}, {"id": 1, "state": "dup"}]
        params.append({"id": 3, "state": "c"})
        futures = [writer.submit(execute(INSERT, p)) for p in params]
        results = await asyncio.gather(*futures, return_exceptions=True)
        writer.close()
        return [r if isinstance(r, BaseException) else None for r in results]

    errors = asyncio.run(main())
    assert [e is not None for e in errors] == [False, False, True, False]
    assert rows(engine) == {1: "a", 2: "b", 3: "c"}
