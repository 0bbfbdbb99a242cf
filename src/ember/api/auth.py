"""Bearer tokens: created at first start, written once to the data dir (0600), stored hashed."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

from fastapi import Request
from sqlalchemy import Engine, delete, insert, select

from ember.api.errors import ApiException
from ember.config import TOKEN_FILE
from ember.store import tables

log = logging.getLogger("ember.auth")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def ensure_token(engine: Engine, data_dir: Path) -> set[str]:
    """Make sure the token file exists and is known; return every valid token's hash.

    Deleting the token file and restarting rotates the admin token: the old one stops working.
    """
    path = data_dir / TOKEN_FILE
    with engine.begin() as conn:
        token = path.read_text().strip() if path.exists() else ""
        if not token:
            conn.execute(delete(tables.tokens).where(tables.tokens.c.name == "admin"))
            token = "ember_" + secrets.token_urlsafe(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            log.info("created a new API token in %s", path)
        os.chmod(path, 0o600)
        hashes = set(conn.execute(select(tables.tokens.c.hash)).scalars())
        h = token_hash(token)
        if h not in hashes:
            conn.execute(insert(tables.tokens).values(name="admin", hash=h, created_at=time.time()))
            hashes.add(h)
    return hashes


class TokenCheck:
    """A FastAPI dependency; the valid hashes live in memory, checked in constant time."""

    def __init__(self, hashes: set[str], token_path: Path) -> None:
        self.hashes = hashes
        self.token_path = token_path

    def __call__(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiException(
                401,
                "unauthorized",
                "missing bearer token: send 'Authorization: "
                f"Bearer <token>' (the server's token is in {self.token_path})",
            )
        h = token_hash(token.strip())
        if not any(hmac.compare_digest(h, known) for known in self.hashes):
            raise ApiException(401, "unauthorized", "invalid token")
