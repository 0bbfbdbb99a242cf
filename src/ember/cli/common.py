"""What the `ember` commands share: the consoles, the client, the error line, and the forms of
durations and times they read and print.

Imports nothing from `main.py`: run as `python -m ember.cli.main`, main is `__main__`, and
importing it back would load it twice.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ember.errors import EmberError

PIPE_WIDTH = 100_000
"""The width `out` renders at when stdout is not a terminal: wide enough that Rich never cuts a
table cell with `…` or wraps a line, so `ember usage --by function | grep` sees whole names."""


def _stdout_width() -> int | None:
    """None (Rich's own guess: the terminal's width) on a terminal; else COLUMNS where the
    caller set it (a program laying the output out itself), else PIPE_WIDTH."""
    try:
        if sys.stdout.isatty():
            return None
    except (AttributeError, ValueError):  # no stdout, or a closed one
        pass
    columns = os.environ.get("COLUMNS", "").strip()
    return int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH


out = Console(width=_stdout_width())
err = Console(stderr=True)

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
TIME_FORMS = (
    "use a time ago as 30s, 15m, 2h, 7d or 2w, epoch seconds, or an ISO 8601 date such as "
    "2024-06-01 or 2024-06-01T12:00:00Z"
)
"""What `--since` and `--until` take, said in every refusal of one."""
_AGO = re.compile(r"\d+(\.\d+)?[smhdw]", re.IGNORECASE)


def api_client() -> Any:
    from ember.sdk.client import Client

    return Client()


def fail(exc: Exception) -> NoReturn:
    # escaped: messages quote user text and TOML ("[gpu] must be a table") that is not markup.
    # A 402 budget_exceeded message already names the budget, the spend and the reset time.
    err.print(f"[red]error:[/red] {escape(str(exc))}")
    raise typer.Exit(1)


def request(method: str, path: str, **kw: Any) -> Any:
    """The response body of one API call; a server or connection error ends the command."""
    try:
        resp = api_client().request(method, path, **kw)
    except EmberError as exc:
        fail(exc)
    return resp.json() if resp.content else {}


def print_json(data: Any) -> None:
    out.print_json(json.dumps(data))


def money(usd: Any) -> str:
    """USD for a table: 2 decimals from 1 USD up, else enough decimals for 3 significant figures,
    so a non-zero amount never prints as 0.000000; exactly zero is '0'."""
    value = float(usd)
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    if abs(value) >= 1:
        return f"{value:.2f}"
    decimals = 2 - math.floor(math.log10(abs(value)))
    text = f"{value:.{decimals}f}"
    return f"{value:.2f}" if abs(float(text)) >= 1 else text


def duration(value: str, option: str | None = None) -> float:
    """'90s', '15m', '12h', '30d', '2w' or plain seconds -> seconds (> 0); `option` names the
    option in the error."""
    text = value.strip().lower()
    number, unit = (text[:-1], text[-1]) if text[-1:] in UNITS else (text, "s")
    try:
        seconds = float(number) * UNITS[unit]
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise typer.BadParameter(
            f"{value!r} is not a duration: a number with s, m, h, d or w, e.g. 30d or 12h",
            param_hint=option,
        )
    return seconds


def ago(value: str | None, option: str | None = None) -> str | None:
    """'7d', '12h', '30m' ago -> epoch seconds; epoch seconds or ISO 8601 go to the server as given
    (the same forms as `ember usage --since`). Anything else ('1y') is refused here, naming the
    forms, rather than sent for the server to refuse."""
    if not value or not value.strip():
        return None
    text = value.strip()
    if _AGO.fullmatch(text):
        return str(time.time() - duration(text, option))
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(number):
            return text
    try:
        datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a time: {TIME_FORMS}", param_hint=option
        ) from None
    return text


def epoch(value: str | None, option: str | None = None) -> float | None:
    """`ago`'s forms as epoch seconds (an ISO time without a zone is UTC, as the server reads it)."""
    text = ago(value, option)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def when(value: Any) -> str:
    """Epoch seconds -> local 'YYYY-MM-DD HH:MM'; a string (ISO 8601) as given; None -> '-'."""
    if value is None or value == "":
        return "-"
    if isinstance(value, int | float):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    return str(value)


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    """['team=search', ...] -> {'team': 'search'}; the error names the item's position, not its
    text (a secret's value must never be echoed)."""
    result: dict[str, str] = {}
    for i, item in enumerate(items, 1):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise typer.BadParameter(f"{what} number {i} is not KEY=VALUE")
        result[key] = value
    return result
