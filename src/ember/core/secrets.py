"""Secrets: named sets of environment variables, validated and parsed here, redacted everywhere.

Pure: the server validates what `ember secret set` sends, the CLI parses `.env` files, and the
worker builds a `Redactor` from its environment so that a secret value never leaves it in a log
line, an output or an error. The vault (`ember.control.vault`) encrypts them at rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ember.core.names import HANDLE_RE

SECRET_KEYS_ENV = "EMBER_SECRET_KEYS"
"""Set by the server for a worker (and its template): the comma-separated names of the env vars
that hold secret values, so that the worker knows what to redact."""

MAX_KEYS = 100
MAX_VALUE_BYTES = 64 * 1024
MIN_REDACT_LEN = 4
"""Shorter values are not redacted: hiding every "1" or "yes" in every log would hide nothing."""
REDACTED = "[secret]"

RESERVED_KEYS = frozenset(
    ("PATH", "PYTHONPATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "HOME")
)
"""Variables the platform or the OS relies on: a secret that changed them would break workers."""

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXPORT_RE = re.compile(r"^export\s+")
_ASSIGN_RE = re.compile(r"^([^=\s]+)\s*=\s*(.*)$", re.S)
_INLINE_COMMENT_RE = re.compile(r"\s+#.*$", re.S)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


class SecretError(ValueError):
    """A secret that cannot be stored or a `.env` file that cannot be read; says how to fix it."""


def validate_secret(name: str, values: object) -> dict[str, str]:
    """Check a secret's name and values; returns the values as a plain dict."""
    validate_secret_name(name)
    if not isinstance(values, dict) or not values:
        raise SecretError(
            f"secret {name!r} needs at least one KEY=VALUE pair, as an object of strings "
            'like {"HF_TOKEN": "hf_..."}'
        )
    if len(values) > MAX_KEYS:
        raise SecretError(
            f"secret {name!r} has {len(values)} keys, more than {MAX_KEYS}: split it into "
            "several secrets and name them all in secrets=[...]"
        )
    out: dict[str, str] = {}
    for key, value in values.items():
        validate_key(key)
        if not isinstance(value, str):
            raise SecretError(
                f"the value of {key} must be a string, got {type(value).__name__}: quote it"
            )
        if "\x00" in value:
            raise SecretError(f"the value of {key} contains a NUL character, which no env var can")
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise SecretError(f"the value of {key} is not valid UTF-8 text") from None
        if size > MAX_VALUE_BYTES:
            raise SecretError(
                f"the value of {key} is {size} bytes, more than {MAX_VALUE_BYTES // 1024} KiB: "
                "store a large credential file elsewhere and put its path or a token here"
            )
        out[key] = value
    return out


def validate_secret_name(name: object) -> str:
    if not isinstance(name, str) or not HANDLE_RE.fullmatch(name) or name in (".", ".."):
        raise SecretError(
            f"secret name {name!r} is not valid: use 1-64 letters, digits, '_', '.' or '-' "
            "(for example 'hf' or 'openai-prod')"
        )
    return name


def validate_key(key: object) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise SecretError(
            f"{key!r} is not a valid environment variable name: use letters, digits and '_', "
            "not starting with a digit (for example HF_TOKEN)"
        )
    if key.startswith("EMBER_"):
        raise SecretError(f"{key} starts with EMBER_, which is reserved for ember: rename it")
    if key in RESERVED_KEYS:
        raise SecretError(
            f"{key} is set by the platform for every worker and cannot be a secret: rename it"
        )
    return key


def parse_dotenv(text: str) -> dict[str, str]:
    """`KEY=VALUE` lines as in a `.env` file: `export ` prefixes, `#` comments, blank lines,
    single quotes (literal) and double quotes (with \\n, \\t, \\" and \\\\ escapes), which may span
    lines; in an unquoted value, ` #` starts a comment. A later KEY wins over an earlier one."""
    lines = text.removeprefix("\ufeff").split("\n")
    out: dict[str, str] = {}
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i].rstrip("\r").lstrip()  # a quote may keep end spaces
        i += 1
        if not line.strip() or line.startswith("#"):
            continue
        m = _ASSIGN_RE.match(_EXPORT_RE.sub("", line))
        if m is None:
            raise SecretError(f"line {number}: expected KEY=VALUE (or a # comment)")
        key, rest = m.group(1), m.group(2)
        if not _KEY_RE.fullmatch(key):
            raise SecretError(
                f"line {number}: {key!r} is not a valid environment variable name: use letters, "
                "digits and '_', not starting with a digit"
            )
        if rest[:1] in ("'", '"'):
            # a quoted value runs to its closing quote, on this line or a later one
            while (parsed := _quoted(rest)) is None:
                if i >= len(lines):
                    raise SecretError(
                        f"line {number}: the value of {key} opens a {rest[0]} quote that is "
                        "never closed: add the closing quote"
                    )
                rest += "\n" + lines[i].rstrip("\r")
                i += 1
            value, after = parsed
            after = after.strip()
            if after and not after.startswith("#"):
                raise SecretError(
                    f"line {number}: unexpected text after the closing quote of {key}: "
                    "put the whole value inside the quotes"
                )
        else:
            value = _INLINE_COMMENT_RE.sub("", rest).strip()
        out[key] = value
    return out


def _quoted(rest: str) -> tuple[str, str] | None:
    """The value of a quoted `rest` and the text after its closing quote; None if not closed."""
    quote = rest[0]
    if quote == "'":
        end = rest.find("'", 1)
        return None if end < 0 else (rest[1:end], rest[end + 1 :])
    chars: list[str] = []
    j = 1
    while j < len(rest):
        c = rest[j]
        if c == "\\" and j + 1 < len(rest):
            nxt = rest[j + 1]
            chars.append(_ESCAPES.get(nxt, "\\" + nxt))
            j += 2
            continue
        if c == '"':
            return "".join(chars), rest[j + 1 :]
        chars.append(c)
        j += 1
    return None


def too_short(values: Mapping[str, str]) -> list[str]:
    """Keys whose values are too short to redact (worth a warning when the secret is set)."""
    return [k for k, v in values.items() if 0 < len(v) < MIN_REDACT_LEN]


def secret_values(env: Mapping[str, str]) -> list[str]:
    """The values of the variables named in `EMBER_SECRET_KEYS` (none when it is unset)."""
    keys = (k.strip() for k in env.get(SECRET_KEYS_ENV, "").split(","))
    return [env[k] for k in keys if k and k in env]


class Redactor:
    """Replaces secret values with `[secret]` in text and in JSON-like data.

    Besides each value it also hides the forms a value takes in a traceback or a JSON dump (its
    escaped `repr` and JSON string), and each line of a multi-line value (logs arrive a line at a
    time). Where matches overlap or nest, the union of them is hidden, so no fragment is left.
    """

    __slots__ = ("_patterns",)

    def __init__(self, values: Iterable[str]) -> None:
        patterns: set[str] = set()
        for value in values:
            if len(value) < MIN_REDACT_LEN:
                continue
            forms = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
            forms.add(repr(value)[1:-1])
            if "\n" in value:
                forms.update(line.strip() for line in value.splitlines())
            patterns.update(f for f in forms if len(f) >= MIN_REDACT_LEN)
        self._patterns: tuple[str, ...] = tuple(sorted(patterns, key=len, reverse=True))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Redactor:
        """The redactor of the secret values in `env` (see `secret_values`)."""
        return cls(secret_values(env))

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def __repr__(self) -> str:  # never the values themselves
        return f"Redactor({len(self._patterns)} patterns)"

    def text(self, s: str) -> str:
        spans: list[tuple[int, int]] = []
        for p in self._patterns:
            start = s.find(p)
            while start >= 0:
                spans.append((start, start + len(p)))
                start = s.find(p, start + 1)
        if not spans:
            return s
        spans.sort()
        parts: list[str] = []
        pos = 0
        cur_start, cur_end = spans[0]
        for start, end in spans[1:]:
            if start <= cur_end:
                cur_end = max(cur_end, end)
                continue
            parts += (s[pos:cur_start], REDACTED)
            pos, cur_start, cur_end = cur_end, start, end
        parts += (s[pos:cur_start], REDACTED, s[cur_end:])
        return "".join(parts)

    def json(self, value: Any) -> Any:
        """`value` with every string in it redacted, dict keys included, and every number whose
        digits hold a secret turned into the redacted string; tuples become lists (as JSON would
        have them); other values are returned as they are."""
        if not self._patterns:
            return value
        return self._walk(value)

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {
                (self.text(k) if isinstance(k, str) else k): self._walk(v) for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._walk(v) for v in value]
        if isinstance(value, int | float) and not isinstance(value, bool):
            # a secret that is a number (a PIN, an account id) shows as that number in JSON
            shown = repr(value)
            hidden = self.text(shown)
            return value if hidden == shown else hidden
        return value
