"""The scheduler lease in the store: one transaction per step, decided by `core.lease`.

Only a store that several servers can share (PostgreSQL) has a lease; on SQLite the one server
always schedules. A step locks the lease's row (`SELECT ... FOR UPDATE`), reads the store's
clock in the same transaction, lets `core.lease.decide` choose, and writes what it chose: two
standbys that both see an expired lease take it one after the other, and the second finds it
live.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from sqlalchemy import Engine, select, text, update
from sqlalchemy.dialects.postgresql import insert

from ember.core.lease import Follow, Held, Lead, Step, decide
from ember.store import tables

NAME = "scheduler"
SERVER_ID_FILE = "server-id"


def shared(engine: Engine) -> bool:
    """Whether several servers may share this store (and so need the lease)."""
    return engine.dialect.name == "postgresql"


def server_id(data_dir: Path) -> str:
    """This server's id, kept in its data dir: a restart is the same server (it takes its own
    lease back at once instead of waiting for it to expire)."""
    path = data_dir / SERVER_ID_FILE
    if path.exists() and (found := path.read_text().strip()):
        return found
    sid = uuid.uuid4().hex
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(sid + "\n")
    return sid


class Lease:
    def __init__(self, engine: Engine, me: str, address: str, ttl: float) -> None:
        self.engine = engine
        self.me = me
        self.address = address
        self.ttl = ttl
        self.epoch: int | None = None
        """The epoch this server holds the lease under; None while it stands by."""
        self.renewed_at = 0.0
        """time.monotonic() when the last step that kept the lease began."""

    def step(self) -> Step:
        """One step (blocking: run it in a thread): take, renew or follow the lease."""
        began = time.monotonic()
        leases = tables.leases
        with self.engine.begin() as conn:
            conn.execute(
                insert(leases)
                .values(name=NAME, holder="", epoch=0, expires_at=0.0, address="")
                .on_conflict_do_nothing()
            )
            row = (
                conn.execute(select(leases).where(leases.c.name == NAME).with_for_update())
                .mappings()
                .one()
            )
            now = float(
                conn.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one()
            )
            held = Held(row["holder"], row["epoch"], row["expires_at"], row["address"])
            # The row a first step inserts names nobody: no lease was ever held.
            step = decide(held if row["holder"] else None, self.me, self.epoch, now, self.ttl)
            if isinstance(step, Lead):
                conn.execute(
                    update(leases)
                    .where(leases.c.name == NAME)
                    .values(
                        holder=self.me,
                        epoch=step.epoch,
                        expires_at=step.expires_at,
                        address=self.address,
                    )
                )
        if isinstance(step, Lead):
            self.epoch = step.epoch
            self.renewed_at = began
        elif isinstance(step, Follow) and step.lost:
            self.epoch = None
        return step

    def release(self) -> None:
        """On a clean stop: end the lease now, so that a standby takes over at once."""
        if self.epoch is None:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(tables.leases)
                .where(
                    tables.leases.c.name == NAME,
                    tables.leases.c.holder == self.me,
                    tables.leases.c.epoch == self.epoch,
                )
                .values(expires_at=0.0)
            )
        self.epoch = None
