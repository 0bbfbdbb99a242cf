"""What `ember doctor` checks: facts gathered by the shell (server, store, files), judged here.

Each rule turns a risky fact into a Finding that says what was found, why it is risky, and the
command or change that fixes it. The shell gathers the facts (stat, config, store); this module
only reads them, so the same rules run in tests, in the CLI and behind GET /v1/doctor.
"""

from __future__ import annotations

import ipaddress
import shlex
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

SEVERITIES = ("high", "medium", "low")
MAX_TIMEOUT_S = 3600.0
"""Longest function timeout not reported: beyond it a hung call holds a GPU for hours."""
_FILE_RISK = {
    "token file": "any local user can read the token and act with its scope",
    "master key": "any local user can read the master key and decrypt every stored secret",
    "data dir": "other local users can read or change the database, logs and code bundles",
    "database": "other local users can read or change tokens, policies, jobs and encrypted secrets",
}


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str
    """high | medium | low"""
    message: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class TokenFact:
    workspace: str
    name: str
    scope: str
    expires_at: float | None
    bootstrap: bool = False
    """The operator's first token, written at first start; reported by its own means, not here."""


@dataclass(frozen=True)
class FileFact:
    """A sensitive path and its st_mode; `what` is 'token file', 'master key', 'data dir',
    'database' (a `what` ending in 'dir'/'directory', or a directory st_mode, means a directory)."""

    path: str
    mode: int
    what: str


@dataclass(frozen=True)
class FunctionFact:
    workspace: str
    app: str
    function: str
    timeout: float


@dataclass(frozen=True)
class Posture:
    host: str
    tls: bool
    tokens: tuple[TokenFact, ...] = ()
    files: tuple[FileFact, ...] = ()
    functions: tuple[FunctionFact, ...] = ()
    workspaces: tuple[str, ...] = ()
    budgeted_workspaces: frozenset[str] = field(default_factory=frozenset)
    unsandboxed_why: str | None = None
    """Why user code runs without the worker sandbox; None: it runs in one."""
    tenant_isolation: bool = True
    """Without a sandbox, only the `default` workspace's code runs (`--no-tenant-isolation`)."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (with or without brackets) and localhost: reachable only here."""
    h = host.strip().strip("[]").lower()
    if h in ("localhost", "localhost."):
        return True
    try:
        addr = ipaddress.ip_address(h)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def _is_dir(f: FileFact) -> bool:
    return stat.S_ISDIR(f.mode) or f.what.strip().lower().endswith(("dir", "directory"))


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h"


def _listen(p: Posture) -> Iterator[Finding]:
    if p.tls or is_loopback(p.host):
        return
    where = p.host or "all interfaces"
    yield Finding(
        "no_tls",
        "high",
        f"the server listens on {where} without TLS: bearer tokens, secrets and call inputs "
        "cross the network in clear text, readable and replayable by anyone on the path",
        "serve TLS with `ember server --tls-cert CERT.pem --tls-key KEY.pem`, or bind "
        "127.0.0.1 and put a TLS-terminating reverse proxy in front",
    )


def _tokens(p: Posture) -> Iterator[Finding]:
    for t in p.tokens:
        if t.scope != "admin" or t.expires_at is not None or t.bootstrap:
            continue
        name = shlex.quote(t.name)
        yield Finding(
            "admin_token_no_expiry",
            "medium",
            f"admin token {t.name!r} of workspace {t.workspace!r} never expires: if it leaks it "
            "grants full control of the workspace (tokens, secrets, policies) until revoked",
            f"`ember token revoke {name}` then `ember token create {name} --scope admin "
            "--expires 30d`",
        )


def _timeouts(p: Posture) -> Iterator[Finding]:
    for f in p.functions:
        if f.timeout <= MAX_TIMEOUT_S:
            continue
        yield Finding(
            "long_timeout",
            "medium",
            f"function {f.app}.{f.function} of workspace {f.workspace!r} has a timeout of "
            f"{f.timeout:g} s: a hung call holds its worker and GPU for {_hours(f.timeout)} "
            "before it is stopped, and is billed for all of it",
            f"set `timeout=` in @app.function to the longest a call should take (at most "
            f"{MAX_TIMEOUT_S:g} s) and redeploy {f.app}",
        )


def _budgets(p: Posture) -> Iterator[Finding]:
    for w in p.workspaces:
        if w in p.budgeted_workspaces:
            continue
        yield Finding(
            "no_budget",
            "low",
            f"workspace {w!r} has no policy with a budget: its spend is unbounded and nobody is "
            "alerted when it grows",
            "`ember policy create NAME --budget 50USD/month` (add `--action block` to stop new "
            "calls at the limit), and bind its tokens to it",
        )


def _sandbox(p: Posture) -> Iterator[Finding]:
    if p.unsandboxed_why is None:
        return
    fix = (
        "install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`) and restart the "
        "server with `--sandbox auto` (the default)"
    )
    if not p.tenant_isolation:
        yield Finding(
            "no_tenant_isolation",
            "high",
            f"user code runs without the worker sandbox ({p.unsandboxed_why}) and, with "
            "--no-tenant-isolation, every workspace's: any deployed function can read the data "
            "dir (the operator token, master.key, the database with every secret), other "
            "tenants' code and processes, and the server's environment",
            fix + ", without --no-tenant-isolation",
        )
        return
    yield Finding(
        "no_sandbox",
        "medium",
        f"user code runs without the worker sandbox ({p.unsandboxed_why}): a function can read "
        "the data dir and the server's processes, so only the 'default' workspace's code runs "
        "and calls of other workspaces fail",
        fix,
    )


def _files(p: Posture) -> Iterator[Finding]:
    for f in p.files:
        if not f.mode & 0o077:
            continue
        directory = _is_dir(f)
        risk = _FILE_RISK.get(
            f.what.strip().lower(), "other local users can read or change what it holds"
        )
        yield Finding(
            "file_permissions",
            "high",
            f"{f.what} {f.path} has mode {stat.S_IMODE(f.mode):04o}, open to group or other "
            f"users: {risk}",
            f"chmod {'700' if directory else '600'} {shlex.quote(f.path)}",
        )


def check(p: Posture) -> list[Finding]:
    """Every finding for the posture, most severe first (then by code, then message)."""
    found = [
        *_listen(p),
        *_sandbox(p),
        *_files(p),
        *_tokens(p),
        *_timeouts(p),
        *_budgets(p),
    ]
    return sorted(found, key=lambda f: (SEVERITIES.index(f.severity), f.code, f.message))
