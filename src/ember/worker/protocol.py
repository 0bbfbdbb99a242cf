"""Frames between the control plane and its workers: a 4-byte length, then a JSON object.

Worker -> server: hello, ready, fatal, log, output, result, bye; progress and refresh (a RunPod
handler's `progress_update` and `refresh_worker`, `ember.sdk.runpod`).
Server -> worker: run, cancel, drain.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

_HEADER = struct.Struct("!I")
MAX_FRAME = 256 << 20
"""The largest frame either side reads from an authenticated peer (an output, a log batch)."""
MAX_OUTPUT = MAX_FRAME - (1 << 20)
"""The largest output a job may return: the frame that carries it has a little more."""
MAX_HELLO = 4096
"""The largest frame read before a worker has said who it is."""

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
dumps_value = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
"""For user values (outputs): strict JSON, so NaN or Infinity fail here and not in an HTTP answer."""


def encode(msg: dict[str, Any], raw: dict[str, bytes] | None = None) -> bytes:
    """Encode `msg`; `raw` adds fields whose values are already JSON (no second serialisation)."""
    # "replace": a lone surrogate in an error message or a printed line must not break the frame
    body = _dumps(msg).encode("utf-8", "replace")
    if raw:
        extra = b",".join(_dumps(k).encode() + b":" + v for k, v in raw.items())
        body = body[:-1] + (b"," if len(body) > 2 else b"") + extra + b"}"
    return _HEADER.pack(len(body)) + body


async def read(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> dict[str, Any] | None:
    """The next frame, or None once the other side has gone; ValueError for a frame over
    `limit` bytes (read no further: nothing of it is buffered) or one that is not JSON."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        if size > limit:
            raise ValueError(f"frame of {size} bytes is over the limit of {limit}")
        body = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    msg = json.loads(body)
    if not isinstance(msg, dict):
        raise ValueError("a frame must be a JSON object")
    return msg
