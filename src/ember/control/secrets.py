"""Secrets: each workspace's named secrets, encrypted at rest, decrypted once in memory.

Values leave this room only as the environment of the functions that name them (`env_for`);
listings carry names, keys and times, never values. Which functions use a secret, and what a
change means for their templates, is the plane's to wire (it knows the deployments).
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select, update

from ember.control.errors import ConflictError, NotFoundError
from ember.control.vault import Vault
from ember.store import tables
from ember.store.writer import Writer, execute


class SecretBook:
    def __init__(self, engine: Engine, vault: Vault) -> None:
        self.engine = engine
        self.vault = vault
        self.values: dict[tuple[str, str], dict[str, str]] = {}
        """(workspace, name) -> the secret's values, decrypted once at load or set."""
        self.writer: Writer
        """Set once the plane starts."""

    def load(self, conn: Connection) -> None:
        """Every secret, decrypted, swapped in whole (a standby loads again every second)."""
        self.values = {
            (row["workspace"], row["name"]): self.vault.decrypt(row["ciphertext"])
            for row in conn.execute(select(tables.secrets)).mappings()
        }

    def has(self, workspace: str, name: str) -> bool:
        return (workspace, name) in self.values

    def names(self, workspace: str) -> list[str]:
        return sorted(name for ws, name in self.values if ws == workspace)

    def env_for(self, workspace: str, names: tuple[str, ...]) -> dict[str, str]:
        """The environment a function's secrets give its workers; EMBER_SECRET_KEYS tells the
        worker which variables to redact from what it reports."""
        env: dict[str, str] = {}
        for name in names:
            env.update(self.values.get((workspace, name), {}))
        if env:
            env["EMBER_SECRET_KEYS"] = ",".join(sorted(env))
        return env

    def rows(self, workspace: str, name: str | None = None) -> list[Any]:
        """The workspace's secrets by name (`name`, `keys`, `created_at`, `updated_at`), or only
        the one named `name`; blocking, run it in a thread."""
        s = tables.secrets.c
        q = select(s.name, s["keys"], s.created_at, s.updated_at).where(s.workspace == workspace)
        if name is not None:
            q = q.where(s.name == name)
        with self.engine.connect() as conn:
            return list(conn.execute(q.order_by(s.name)).mappings())

    async def set(self, workspace: str, name: str, values: dict[str, str]) -> float:
        """Store a secret encrypted (created or replaced); returns when, once it is stored."""
        now = time.time()
        key = (workspace, name)
        ciphertext = self.vault.encrypt(values)
        existed = key in self.values
        s_ = tables.secrets.c

        def write(conn: Connection) -> None:
            row = {"keys": json.dumps(sorted(values)), "ciphertext": ciphertext, "updated_at": now}
            if existed:
                conn.execute(
                    update(tables.secrets)
                    .where(s_.workspace == workspace, s_.name == name)
                    .values(**row)
                )
            else:
                conn.execute(
                    insert(tables.secrets).values(
                        workspace=workspace, name=name, created_at=now, **row
                    )
                )

        await self.writer.submit(write)
        self.values[key] = dict(values)
        return now

    async def delete(self, workspace: str, name: str, users: list[str]) -> None:
        """Delete a secret no function uses (`users`: the functions deployed with it)."""
        if (workspace, name) not in self.values:
            raise NotFoundError("secret_not_found", f"no secret named {name!r}")
        if users:
            raise ConflictError(
                f"secret {name!r} is used by {', '.join(users)}; redeploy them without it first"
            )
        s_ = tables.secrets.c
        await self.writer.submit(
            execute(delete(tables.secrets).where(s_.workspace == workspace, s_.name == name))
        )
        del self.values[(workspace, name)]
