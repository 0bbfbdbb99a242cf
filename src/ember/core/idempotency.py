"""Idempotent submits: what an `Idempotency-Key` may be, and when a repeat is the same request.

A client that retries a submit after a lost answer (a dropped connection, a server restart)
sends the key it sent the first time; the server answers with the job that key already names
instead of making a second one. A key reused for a different request is a mistake on the
client's side, answered with a 409 rather than with another request's job.
"""

from __future__ import annotations

import hashlib
import re

MAX_KEY = 255
_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_KEY}}}")
"""Visible ASCII, as HTTP header values are safely compared: a UUID, a hash, a name."""


def key_problem(key: str) -> str | None:
    """Why `key` cannot be an Idempotency-Key, or None when it can."""
    if _KEY.fullmatch(key):
        return None
    if not key:
        return "the Idempotency-Key header is empty; send a unique string, e.g. a UUID"
    if len(key) > MAX_KEY:
        return f"the Idempotency-Key is {len(key)} characters long; at most {MAX_KEY} are allowed"
    return "the Idempotency-Key may hold visible ASCII characters only (no spaces)"


def digest(app: str, function: str, input_json: str) -> str:
    """What a repeat must match: the same function and the same input (compact JSON, so that
    spacing and an encoder's habits do not matter, while the order of keys, as sent, does)."""
    h = hashlib.sha256()
    for part in (app, function, input_json):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def conflict_message(key: str) -> str:
    return (
        f"the Idempotency-Key {key!r} was already used in this workspace for another request "
        "(another function or another input); a new request needs a new key"
    )
