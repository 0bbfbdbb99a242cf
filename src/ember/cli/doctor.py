"""`ember doctor`: the server's risky settings, and the client's own (the token file it reads).

A thin command over the admin endpoint (docs/security.md); exits 1 on a high-severity finding.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from ember import config
from ember.cli.common import api_client, fail, out
from ember.errors import EmberError

_SEVERITY_STYLE = {"high": "red", "medium": "yellow", "low": "cyan"}
_RANK = {"high": 0, "medium": 1, "low": 2}


def token_file_findings() -> list[dict[str, str]]:
    """Client side: the token file this client reads (EMBER_TOKEN_FILE, or the data dir's token
    file when EMBER_TOKEN is unset) must be open to its owner only, as the server's own check
    wants of the files it guards (a client may read a copy on another machine)."""
    if os.environ.get("EMBER_TOKEN"):
        return []
    named = os.environ.get("EMBER_TOKEN_FILE")
    path = Path(named).expanduser() if named else config.data_dir() / config.TOKEN_FILE
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return []
    if not mode & 0o077:
        return []
    return [
        {
            "code": "client_token_file_permissions",
            "severity": "high",
            "message": f"token file {path} (read by this client) has mode {mode:04o}, open to "
            "group or other users: any local user can read the token and act with its scope",
            "fix": f"chmod 600 {shlex.quote(str(path))}",
        }
    ]


def _print_finding(f: dict[str, Any]) -> None:
    severity = str(f.get("severity") or "info")
    style = _SEVERITY_STYLE.get(severity.lower(), "cyan")
    out.print(f"[{style}]{escape(severity):<6}[/{style}] {escape(str(f.get('message', '')))}")
    if f.get("fix"):
        out.print(f"       [dim]fix:[/dim] {escape(str(f['fix']))}")


def doctor() -> None:
    """Check the server (and the token file this client reads) for risky settings: each finding
    with its severity, why it is risky and the fix. Exits 1 when any is high-severity, so it can
    gate a script. Needs an admin token.

    Example:

        ember doctor && ember deploy app.py

    See docs/security.md.
    """
    try:
        findings = list(api_client().request("GET", "/doctor").json()["findings"])
    except EmberError as exc:
        for f in token_file_findings():  # still worth knowing when the server cannot answer
            _print_finding(f)
        fail(exc)
    for f in token_file_findings():
        # the server reports its own token file; the same file read here is reported once
        if not any(f["fix"] == g.get("fix") for g in findings):
            findings.append(f)
    findings.sort(key=lambda f: _RANK.get(str(f.get("severity", "")).lower(), len(_RANK)))
    for f in findings:
        _print_finding(f)
    if not findings:
        out.print("[green]no risky settings found[/green]")
    if any(str(f.get("severity", "")).lower() == "high" for f in findings):
        raise typer.Exit(1)
