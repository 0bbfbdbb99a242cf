"""The API token: created at first start, random, 0600 on disk, only its hash in the database."""

from __future__ import annotations

import hashlib
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

from conftest import Server


def db_tokens(data_dir: Path) -> list[tuple[str, str]]:
    """The live (not revoked) tokens; revoked ones stay in the table for the audit trail."""
    conn = sqlite3.connect(f"file:{data_dir / 'ember.db'}?mode=ro", uri=True)
    try:
        return list(conn.execute("SELECT name, hash FROM tokens WHERE revoked_at IS NULL"))
    finally:
        conn.close()


def db_bytes(data_dir: Path) -> bytes:
    """The database with its write-ahead log: everything SQLite has written."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("ember.db*")))


def test_the_token_file_is_created_at_first_start_with_mode_0600(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    data_dir = tmp_path / "fresh"
    assert not data_dir.exists()
    server = make_server(data_dir=data_dir)
    path = data_dir / "token"
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = server.token
    assert len(token) >= 32
    assert token.strip() == token and " " not in token
    assert server.http("GET", "/v1/apps").status_code == 200


def test_tokens_are_random(make_server: Callable[..., Server]) -> None:
    a, b = make_server(), make_server()
    assert a.token != b.token
    # one server's token opens nothing on the other
    assert a.http("GET", "/v1/apps", token=b.token).status_code == 401
    assert b.http("GET", "/v1/apps", token=a.token).status_code == 401


def test_the_database_keeps_only_the_sha256_of_the_token(server: Server) -> None:
    token = server.token
    rows = db_tokens(server.data_dir)
    assert len(rows) == 1
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert rows[0][1] == digest
    raw = db_bytes(server.data_dir)
    assert digest.encode() in raw or bytes.fromhex(digest) in raw
    assert token.encode() not in raw
    # nor after the server has stopped and SQLite has checkpointed its log
    server.stop()
    raw = db_bytes(server.data_dir)
    assert token.encode() not in raw
    assert token[6:].encode() not in raw  # not even without its prefix


def test_a_restart_on_the_same_data_dir_keeps_the_token(server: Server) -> None:
    token = server.token
    mtime = (server.data_dir / "token").stat().st_mtime_ns
    server.restart()
    assert server.token == token
    assert (server.data_dir / "token").stat().st_mtime_ns == mtime
    assert server.http("GET", "/v1/apps", token=token).status_code == 200
    assert len(db_tokens(server.data_dir)) == 1


def test_a_restart_restores_the_file_mode(server: Server) -> None:
    path = server.data_dir / "token"
    server.stop()
    path.chmod(0o644)
    server.restart()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_token_is_checked_exactly(server: Server) -> None:
    token = server.token
    assert server.http("GET", "/v1/apps", token=token).status_code == 200
    for bad in (token[:-1], token + "x", token.upper(), token[::-1], "ember_", "x"):
        resp = server.http("GET", "/v1/apps", token=bad)
        assert resp.status_code == 401, bad
        assert resp.json()["error"]["code"] == "unauthorized"
    # the scheme is case-insensitive, as HTTP says
    resp = server.http("GET", "/v1/apps", token=None, headers={"Authorization": f"bearer {token}"})
    assert resp.status_code == 200


def test_deleting_the_token_file_rotates_the_token(server: Server) -> None:
    old = server.token
    server.stop()
    (server.data_dir / "token").unlink()
    server.start()
    new = server.token
    assert new != old
    assert server.http("GET", "/v1/apps", token=new).status_code == 200
    assert server.http("GET", "/v1/apps", token=old).status_code == 401
    assert len(db_tokens(server.data_dir)) == 1


def test_the_data_dir_is_private(server: Server) -> None:
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
