"""Frames between the control plane and its workers: a 4-byte length, then a JSON object.

Worker -> server: hello, ready, fatal, log, output, result, bye.
Server -> worker: run, cancel, drain.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

_HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 30

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


async def read(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next frame, or None once the other side has gone."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ValueError(f"frame of {size} bytes is over the limit")
        body = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    msg: dict[str, Any] = json.loads(body)
    return msg
