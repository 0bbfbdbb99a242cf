"""What `ember doctor` reports (`ember.core.posture`): each rule alone, then all together."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.core.posture import (
    MAX_TIMEOUT_S,
    FileFact,
    Finding,
    FunctionFact,
    Posture,
    TokenFact,
    check,
    is_loopback,
)

CLEAN = Posture(
    host="127.0.0.1",
    tls=False,
    tokens=(
        TokenFact("default", "bootstrap", "admin", None, bootstrap=True),
        TokenFact("default", "ci", "admin", 2_000_000_000.0, bootstrap=False),
        TokenFact("default", "app", "invoke", None, bootstrap=False),
    ),
    files=(
        FileFact("/home/u/.ember/token", 0o100600, "token file"),
        FileFact("/var/lib/ember/master.key", 0o400, "master key"),
        FileFact("/var/lib/ember", stat.S_IFDIR | 0o700, "data dir"),
        FileFact("/var/lib/ember/ember.db", 0o600, "database"),
    ),
    functions=(FunctionFact("default", "llm", "generate", MAX_TIMEOUT_S),),
    workspaces=("default", "team-a"),
    budgeted_workspaces=frozenset({"default", "team-a"}),
)


def only(p: Posture) -> Finding:
    found = check(p)
    assert len(found) == 1, found
    return found[0]


def test_clean_posture_has_no_findings() -> None:
    assert check(CLEAN) == []
    assert check(Posture(host="localhost", tls=False)) == []


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST", "::ffff:127.0.0.1"]
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)
    assert check(Posture(host=host, tls=False)) == []


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "", "10.0.0.5", "ember.example.com", "128.0.0.1"]
)
def test_listening_beyond_loopback_without_tls_is_high(host: str) -> None:
    assert not is_loopback(host)
    f = only(Posture(host=host, tls=False))
    assert (f.code, f.severity) == ("no_tls", "high")
    assert "without TLS" in f.message and "clear text" in f.message
    assert "ember server --tls-cert" in f.fix and "--tls-key" in f.fix and "127.0.0.1" in f.fix
    assert check(Posture(host=host, tls=True)) == []


def test_admin_token_without_expiry_is_medium() -> None:
    p = Posture(
        host="127.0.0.1",
        tls=False,
        tokens=(
            *CLEAN.tokens,
            TokenFact("team-a", "ops", "admin", None, bootstrap=False),
        ),
    )
    f = only(p)
    assert (f.code, f.severity) == ("admin_token_no_expiry", "medium")
    assert "'ops'" in f.message and "'team-a'" in f.message and "never expires" in f.message
    assert f.fix == (
        "`ember token revoke ops` then `ember token create ops --scope admin --expires 30d`"
    )


def test_bootstrap_and_lower_scopes_are_not_reported() -> None:
    tokens = (
        TokenFact("default", "bootstrap", "admin", None, bootstrap=True),
        TokenFact("default", "d", "deploy", None, bootstrap=False),
        TokenFact("default", "r", "read", None, bootstrap=False),
    )
    assert check(Posture(host="127.0.0.1", tls=False, tokens=tokens)) == []


def test_long_timeout_is_medium() -> None:
    p = Posture(
        host="127.0.0.1",
        tls=False,
        functions=(
            FunctionFact("default", "llm", "ok", MAX_TIMEOUT_S),
            FunctionFact("team-a", "train", "fit", 7200.0),
        ),
    )
    f = only(p)
    assert (f.code, f.severity) == ("long_timeout", "medium")
    assert "train.fit" in f.message and "'team-a'" in f.message
    assert "holds its worker and GPU for 2 h" in f.message
    assert "timeout=" in f.fix and "@app.function" in f.fix


def test_workspace_without_budget_is_low() -> None:
    p = Posture(
        host="127.0.0.1",
        tls=False,
        workspaces=("default", "team-a", "team-b"),
        budgeted_workspaces=frozenset({"team-a"}),
    )
    found = check(p)
    assert [(f.code, f.severity) for f in found] == [("no_budget", "low")] * 2
    assert {f.message.split("'")[1] for f in found} == {"default", "team-b"}
    assert all("ember policy create" in f.fix and "--budget 50USD/month" in f.fix for f in found)


@pytest.mark.parametrize(
    ("fact", "chmod"),
    [
        (
            FileFact("/home/u/.ember/token", 0o100644, "token file"),
            "chmod 600 /home/u/.ember/token",
        ),
        (FileFact("/d/master.key", 0o640, "master key"), "chmod 600 /d/master.key"),
        (FileFact("/d/ember.db", 0o604, "database"), "chmod 600 /d/ember.db"),
        (FileFact("/d", stat.S_IFDIR | 0o755, "data dir"), "chmod 700 /d"),
        (FileFact("/d", 0o750, "data dir"), "chmod 700 /d"),  # no type bits: `what` decides
        (FileFact("/my data/x.key", 0o660, "master key"), "chmod 600 '/my data/x.key'"),
    ],
)
def test_open_file_modes_are_high(fact: FileFact, chmod: str) -> None:
    f = only(Posture(host="127.0.0.1", tls=False, files=(fact,)))
    assert (f.code, f.severity) == ("file_permissions", "high")
    assert f.fix == chmod
    assert fact.what in f.message and f"{fact.mode & 0o777:04o}" in f.message
    assert "group or other" in f.message


def test_master_key_message_says_why() -> None:
    f = only(Posture(host="127.0.0.1", tls=False, files=(FileFact("/k", 0o644, "master key"),)))
    assert "decrypt every stored secret" in f.message


@given(st.integers(min_value=0, max_value=0o777))
def test_file_rule_is_exactly_group_or_other_bits(mode: int) -> None:
    found = check(Posture(host="127.0.0.1", tls=False, files=(FileFact("/t", mode, "token file"),)))
    assert bool(found) == bool(mode & 0o077)


def test_everything_at_once_sorted_high_first() -> None:
    p = Posture(
        host="0.0.0.0",
        tls=False,
        tokens=(TokenFact("default", "ops", "admin", None, bootstrap=False),),
        files=(FileFact("/d/master.key", 0o644, "master key"),),
        functions=(FunctionFact("default", "a", "f", 86400.0),),
        workspaces=("default",),
        budgeted_workspaces=frozenset(),
    )
    found = check(p)
    assert [f.severity for f in found] == ["high", "high", "medium", "medium", "low"]
    assert {f.code for f in found} == {
        "no_tls",
        "file_permissions",
        "admin_token_no_expiry",
        "long_timeout",
        "no_budget",
    }
    assert found[0].to_dict().keys() == {"code", "severity", "message", "fix"}
    assert "24 h" in next(f.message for f in found if f.code == "long_timeout")
