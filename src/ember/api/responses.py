"""JSON answers that always encode: strict JSON, even for a stored record that is not.

Every value the server takes in is checked (a deploy with `1e400` is a 422, outputs are strict
JSON), but a record already in the store, written by an older server or by hand, may hold a
non-finite number or a lone surrogate. Encoded as Starlette does, such a record would turn every
listing that holds it into a 500; here it answers with `null` for the number and `?` for the
character, and every other value as it is.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.responses import JSONResponse as _StarletteJSON

_strict = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_strict_ascii = json.JSONEncoder(allow_nan=False).encode


def finite(value: Any) -> Any:
    """`value` with every non-finite float (inf, -inf, nan) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def encode(value: Any) -> bytes:
    """`value` as strict JSON in UTF-8; the first try is the whole cost of a normal answer."""
    try:
        return _strict(value).encode("utf-8")
    except ValueError:  # a non-finite number, or (UnicodeEncodeError) a lone surrogate
        return _strict(finite(value)).encode("utf-8", "replace")


def encode_ascii(value: Any) -> bytes:
    """`encode`, all in ASCII: for a server-sent event, whose reader may split lines at U+2028
    or U+0085 (httpx does), which a UTF-8 string could hold."""
    try:
        return _strict_ascii(value).encode("ascii")
    except ValueError:  # a non-finite number
        return _strict_ascii(finite(value)).encode("ascii")


class JSONResponse(_StarletteJSON):
    """Starlette's JSONResponse, encoded by `encode`: no stored value can make it fail."""

    def render(self, content: Any) -> bytes:
        return encode(content)
