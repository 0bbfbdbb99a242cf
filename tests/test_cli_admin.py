"""`ember workspace|token|policy|secret|audit|doctor`, run as subprocesses against a real server."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from conftest import Server, free_port, wait_for
from ember.cli import admin
from test_cli import ember, plain

GROUPS = {
    "workspace": ["create", "list"],
    "token": ["create", "list", "revoke"],
    "policy": ["create", "list", "show", "delete"],
    "secret": ["set", "list", "delete"],
}
COMMANDS = [[g, c] for g, cs in GROUPS.items() for c in cs] + [["audit"], ["doctor"]]

APP = """
import ember

app = ember.App("metered")


@app.function()
def square(x: int) -> int:
    return x * x
"""


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("cli_admin") / "data").start()
    yield server
    server.shutdown(timeout=15)


def ok(proc: Any) -> str:
    """stdout of a command that must have succeeded, without Rich's boxes."""
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return plain(proc.stdout)


def new_token(server: Server, name: str, *args: str, token: str = "env") -> str:
    out = ok(ember(server, "token", "create", name, *args, token=token)).strip()
    assert out.startswith("ember_"), out
    return out


# ----------------------------------------------------------------------------- offline


def test_help_lists_the_commands_in_their_own_panel() -> None:
    out = ok(ember(None, "--help"))
    for name in [*GROUPS, "audit", "doctor"]:
        assert name in out
    assert "Access, budgets, secrets" in out


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_each_command_has_help_with_an_example(command: list[str]) -> None:
    out = ok(ember(None, *command, "--help"))
    assert "Usage" in out
    assert f"ember {' '.join(command)}" in out  # in the usage line and in the example
    assert "Example" in out
    assert "docs/security.md" in out


@pytest.mark.parametrize("group", GROUPS)
def test_a_group_without_a_command_shows_its_help(group: str) -> None:
    proc = ember(None, group)
    both = plain(proc.stdout + proc.stderr)
    assert "Usage" in both
    for command in GROUPS[group]:
        assert command in both


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("30d", 30 * 86400),
        ("2w", 14 * 86400),
        ("1.5h", 5400),
        ("3600", 3600),
        ("30D", 30 * 86400),
    ],
)
def test_durations(value: str, seconds: float) -> None:
    assert admin.duration(value) == seconds


@pytest.mark.parametrize("value", ["", "d", "3x", "-1d", "0s", "1e999s", "nan", "inf", "two days"])
def test_bad_durations(value: str) -> None:
    with pytest.raises(typer.BadParameter, match="not a duration"):
        admin.duration(value)


def test_ago_turns_a_duration_into_epoch_seconds_and_passes_the_rest() -> None:
    before = time.time()
    since = admin.ago("1d")
    assert since is not None
    assert before - 86400 - 1 < float(since) <= time.time() - 86400
    assert admin.ago("2024-06-01T00:00:00Z") == "2024-06-01T00:00:00Z"
    assert admin.ago("1717200000") == "1717200000"
    assert admin.ago(None) is None


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["token", "create", "ci"], "--scope"),
        (["token", "create", "ci", "--scope", "root"], "'root' is not one of"),
        (["token", "create", "ci", "--scope", "read", "--expires", "3x"], "not a duration"),
        (["token", "create", "ci", "--scope", "read", "--expires", "0d"], "--expires"),
        (["policy", "create", "p", "--budget", "50EUR/month"], "USD"),
        (["policy", "create", "p", "--budget", "50USD"], "period"),
        (["policy", "create", "p", "--action", "stop"], "'stop' is not one of"),
        (["policy", "create", "p", "--tag", "team"], "KEY=VALUE"),
        (["policy", "create", "p", "--max-gpus", "-1"], "--max-gpus"),
        (["policy", "create", "p", "--allowed-gpus", ","], "--allowed-gpus"),
        (["secret", "set", "hf"], "KEY=VALUE"),
        (["audit", "--limit", "0"], "--limit"),
    ],
)
def test_bad_arguments_fail_before_any_request(args: list[str], says: str) -> None:
    # EMBER_URL points nowhere: a request would fail differently
    url = f"http://127.0.0.1:{free_port()}"
    proc = ember(None, *args, env={"EMBER_URL": url, "EMBER_TOKEN": "x"})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert says in plain(proc.stderr)
    assert "no ember server" not in plain(proc.stderr)


def test_bad_secret_arguments_never_echo_a_value(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    env = {"EMBER_URL": url, "EMBER_TOKEN": "x"}
    proc = ember(None, "secret", "set", "db", "USER=me", "hunter2hunter2", env=env)
    assert proc.returncode == 2
    assert "argument number 2 is not KEY=VALUE" in plain(proc.stderr)
    assert "hunter2" not in proc.stderr + proc.stdout

    dotenv = tmp_path / ".env"
    dotenv.write_text("GOOD=fine-value\nthis is not an assignment hunter2hunter2\n")
    proc = ember(None, "secret", "set", "db", "--from-dotenv", str(dotenv), env=env)
    assert proc.returncode == 2
    assert "line 2" in plain(proc.stderr)
    assert "hunter2" not in proc.stderr + proc.stdout

    proc = ember(None, "secret", "set", "db", "--from-dotenv", str(tmp_path / "nope"), env=env)
    assert proc.returncode == 2
    assert "cannot read" in plain(proc.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ["workspace", "list"],
        ["token", "list"],
        ["policy", "list"],
        ["secret", "list"],
        ["audit"],
        ["doctor"],
    ],
)
def test_no_server_running_says_to_start_one(args: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = ember(None, *args, env={"EMBER_URL": url, "EMBER_TOKEN": "x"})
    assert proc.returncode == 1
    err = plain(proc.stderr)
    assert url in err and "ember server" in err
    assert "Traceback" not in proc.stderr


def test_token_file_findings_on_the_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("EMBER_TOKEN", "EMBER_TOKEN_FILE", "EMBER_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("EMBER_DATA_DIR", str(tmp_path))
    token_file = tmp_path / "token"
    token_file.write_text("ember_x\n")
    token_file.chmod(0o600)
    assert admin.token_file_findings() == []
    token_file.chmod(0o640)
    (finding,) = admin.token_file_findings()
    assert finding["severity"] == "high"
    assert str(token_file) in finding["message"] and "0640" in finding["message"]
    assert finding["fix"] == f"chmod 600 {token_file}"

    monkeypatch.setenv("EMBER_TOKEN", "ember_x")  # no file is read then
    assert admin.token_file_findings() == []
    monkeypatch.delenv("EMBER_TOKEN")
    named = tmp_path / "elsewhere"
    named.write_text("ember_x\n")
    named.chmod(0o604)
    monkeypatch.setenv("EMBER_TOKEN_FILE", str(named))
    (finding,) = admin.token_file_findings()
    assert str(named) in finding["message"]
    monkeypatch.setenv("EMBER_TOKEN_FILE", str(tmp_path / "missing"))
    assert admin.token_file_findings() == []


# ----------------------------------------------------------------------------- workspaces


def test_workspace_create_prints_its_admin_token_once(admin_server: Server) -> None:
    proc = ember(admin_server, "workspace", "create", "search")
    token = ok(proc).strip()
    assert token.startswith("ember_") and " " not in token  # stdout: the token alone
    err = plain(proc.stderr)
    assert "search" in err
    assert f"export EMBER_TOKEN={token}" in err
    assert "shown only now" in err

    # the token works, acts inside its workspace, and sees only that workspace
    assert "ember deploy" in ok(ember(admin_server, "apps", token=token))
    mine = ok(ember(admin_server, "workspace", "list", token=token))
    assert "search" in mine and "default" not in mine
    everything = ok(ember(admin_server, "workspace", "list"))
    assert "search" in everything and "default" in everything

    proc = ember(admin_server, "workspace", "create", "search")
    assert proc.returncode == 1
    assert "search" in plain(proc.stderr)
    assert "Traceback" not in proc.stderr


def test_a_workspace_sees_only_its_own_things(admin_server: Server) -> None:
    ws_admin = ok(ember(admin_server, "workspace", "create", "island")).strip()
    new_token(admin_server, "mainland-only", "--scope", "read")
    ok(ember(admin_server, "secret", "set", "island-key", "K=island-value", token=ws_admin))
    ok(
        ember(
            admin_server, "policy", "create", "island-cap", "--budget", "1USD/day", token=ws_admin
        )
    )

    tokens = ok(ember(admin_server, "token", "list", token=ws_admin))
    assert "admin" in tokens and "mainland-only" not in tokens
    assert "island-key" not in ok(ember(admin_server, "secret", "list"))
    assert "island-cap" not in ok(ember(admin_server, "policy", "list"))
    assert "island-cap" in ok(ember(admin_server, "policy", "list", token=ws_admin))
    audit = ok(ember(admin_server, "audit", token=ws_admin))
    assert "island-key" in audit and "mainland-only" not in audit


def test_only_the_operator_creates_workspaces(admin_server: Server) -> None:
    proc = ember(admin_server, "workspace", "create", "ops")
    ws_admin = ok(proc).strip()
    proc = ember(admin_server, "workspace", "create", "other", token=ws_admin)
    assert proc.returncode == 1
    assert "error:" in proc.stderr


# ----------------------------------------------------------------------------- tokens


def test_token_create_list_revoke(admin_server: Server) -> None:
    proc = ember(admin_server, "token", "create", "ci", "--scope", "deploy", "--expires", "30d")
    token = ok(proc).strip()
    assert token.startswith("ember_")
    err = plain(proc.stderr)
    assert "ci" in err and "deploy" in err and "expires" in err
    assert f"export EMBER_TOKEN={token}" in err

    listed = ok(ember(admin_server, "token", "list"))
    assert token not in listed  # never the value
    row = next(
        ln for ln in ember(admin_server, "token", "list").stdout.splitlines() if " ci " in ln
    )
    expires = time.strftime("%Y-%m-%d", time.localtime(time.time() + 30 * 86400))
    assert "deploy" in row and expires in plain(row)
    for column in ("name", "scope", "policy", "created", "expires", "revoked"):
        assert column in listed

    assert "ember deploy" in ok(ember(admin_server, "apps", token=token))
    assert "revoked" in ok(ember(admin_server, "token", "revoke", "ci"))
    proc = ember(admin_server, "apps", token=token)
    assert proc.returncode == 1
    assert "revoked" in plain(proc.stderr)
    row = next(
        ln for ln in ember(admin_server, "token", "list").stdout.splitlines() if " ci " in ln
    )
    assert plain(row).count(time.strftime("%Y-%m-%d")) == 2  # created and revoked today

    proc = ember(admin_server, "token", "revoke", "no-such-token")
    assert proc.returncode == 1
    assert "no-such-token" in plain(proc.stderr)


def test_scopes_are_enforced_and_the_error_names_the_scope(admin_server: Server) -> None:
    reader = new_token(admin_server, "reader", "--scope", "read")
    assert ok(ember(admin_server, "apps", token=reader))
    for args in (
        ["token", "create", "x", "--scope", "read"],
        ["token", "list"],
        ["secret", "set", "s", "KEY=value1"],
        ["audit"],
        ["doctor"],
        ["policy", "create", "p"],
    ):
        proc = ember(admin_server, *args, token=reader)
        assert proc.returncode == 1, args
        err = plain(proc.stderr)
        assert err.startswith("error:") and "admin" in err and "403" in err, (args, err)
    assert ember(admin_server, "policy", "list", token=reader).returncode == 0

    deployer = new_token(admin_server, "deployer", "--scope", "deploy")
    assert ember(admin_server, "secret", "list", token=deployer).returncode == 0
    assert ember(admin_server, "secret", "list", token=reader).returncode == 1


def test_an_expired_token_says_so(admin_server: Server) -> None:
    token = new_token(admin_server, "brief", "--scope", "read", "--expires", "1s")

    def refused() -> Any:
        proc = ember(admin_server, "apps", token=token)
        return proc if proc.returncode == 1 else None

    proc = wait_for(refused, timeout=15, interval=0.2, what="the token to expire")
    assert proc.returncode == 1
    assert "expired" in plain(proc.stderr)


# ----------------------------------------------------------------------------- policies


def test_policy_create_list_show_delete(admin_server: Server) -> None:
    proc = ember(
        admin_server,
        "policy",
        "create",
        "research",
        "--tag",
        "team=research",
        "--tag",
        "cost-center=42",
        "--budget",
        "50USD/month",
        "--action",
        "block",
        "--max-gpus",
        "4",
        "--allowed-gpus",
        "L4,A10G",
        "--webhook",
        "https://hooks.example.com/ember",
    )
    out = ok(proc)
    assert "research" in out and "50.00 USD per month" in out
    assert "team=research" in out and "max 4 GPUs" in out and "L4,A10G" in out
    assert "--policy research" in out

    listed = ok(ember(admin_server, "policy", "list"))
    assert "research" in listed and " 0 / 50.00 USD per month" in listed
    assert "block" in listed
    shown = ok(ember(admin_server, "policy", "show", "research"))
    assert "https://hooks.example.com/ember" in shown
    assert "cost-center=42" in shown and "blocked: no" in shown

    assert "deleted" in ok(ember(admin_server, "policy", "delete", "research"))
    assert "research" not in ok(ember(admin_server, "policy", "list"))
    proc = ember(admin_server, "policy", "show", "research")
    assert proc.returncode == 1
    assert "research" in plain(proc.stderr)


def test_the_server_says_why_a_policy_cannot_work(admin_server: Server) -> None:
    proc = ember(admin_server, "policy", "create", "nobudget", "--action", "block")
    assert proc.returncode == 1
    assert "budget" in plain(proc.stderr)


def test_a_blocked_policy_refuses_calls_with_budget_spent_and_reset(admin_server: Server) -> None:
    admin_server.deploy(APP, "metered_app.py")
    ok(
        ember(
            admin_server, "policy", "create", "broke", "--budget", "0USD/day", "--action", "block"
        )
    )
    token = new_token(admin_server, "broke-client", "--scope", "invoke", "--policy", "broke")
    listed = ok(ember(admin_server, "token", "list"))
    assert "broke-client" in listed and "broke" in listed.split("broke-client", 1)[1]

    proc = ember(admin_server, "call", "metered/square", "--data", '{"x": 2}', token=token)
    assert proc.returncode == 1
    err = plain(proc.stderr)
    assert "402" in err and "budget" in err
    assert "0.00" in err  # the budget and the spend
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    assert tomorrow in err  # when it resets

    row = next(
        ln for ln in ember(admin_server, "policy", "list").stdout.splitlines() if "broke" in ln
    )
    assert "yes" in row  # blocked

    # the admin token is bound to no policy: its calls go through
    assert ok(ember(admin_server, "call", "metered/square", "--data", '{"x": 2}')).strip() == "4"


# ----------------------------------------------------------------------------- secrets


def test_secret_set_list_delete_never_show_values(admin_server: Server, tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("# model access\nexport HF_TOKEN=hf_dotenvvalue123\nREGION='eu-west-1'\n")
    proc = ember(
        admin_server,
        "secret",
        "set",
        "hf",
        "HF_TOKEN=hf_commandlinevalue456",
        "PIN=12",
        "--from-dotenv",
        str(dotenv),
    )
    out = ok(proc)
    everything = proc.stdout + proc.stderr
    for value in ("hf_dotenvvalue123", "hf_commandlinevalue456", "eu-west-1"):
        assert value not in everything
    assert "HF_TOKEN" in out and "REGION" in out and "PIN" in out
    err = plain(proc.stderr)
    assert "PIN" in err and "shorter than 4" in err
    assert "HF_TOKEN" not in err  # long values draw no warning

    proc = ember(admin_server, "secret", "list")
    listed = ok(proc)
    assert "hf" in listed and "HF_TOKEN" in listed and "REGION" in listed
    assert "hf_" not in listed.replace(" hf ", " ")

    assert "deleted" in ok(ember(admin_server, "secret", "delete", "hf"))
    assert "no secrets yet" in ok(ember(admin_server, "secret", "list"))
    proc = ember(admin_server, "secret", "delete", "hf")
    assert proc.returncode == 1


def test_secret_values_reach_the_function_redacted(admin_server: Server) -> None:
    ok(ember(admin_server, "secret", "set", "api", "API_KEY=sk-live-abcdef987654"))
    admin_server.deploy(
        """
        import os

        import ember

        app = ember.App("uses_secret")


        @app.function(secrets=["api"])
        def key_length() -> int:
            return len(os.environ["API_KEY"])


        @app.function(secrets=["api"])
        def leak() -> str:
            print("the key is", os.environ["API_KEY"])
            return os.environ["API_KEY"]
        """,
        "uses_secret.py",
    )
    assert ok(ember(admin_server, "call", "uses_secret/key_length")).strip() == "20"
    proc = ember(admin_server, "call", "uses_secret/leak")
    assert "sk-live-abcdef987654" not in proc.stdout + proc.stderr

    missing = admin_server.data_dir.parent / "missing_secret.py"
    missing.write_text(
        "import ember\napp = ember.App('nokey')\n\n"
        "@app.function(secrets=['nope'])\ndef f() -> None: ...\n"
    )
    proc = ember(admin_server, "deploy", str(missing))
    assert proc.returncode == 1
    assert "nope" in plain(proc.stderr) and "ember secret set" in plain(proc.stderr)

    row = next(
        ln for ln in ember(admin_server, "secret", "list").stdout.splitlines() if "api" in ln
    )
    assert "uses_secret/key_length" in row and "API_KEY" in row  # used by

    proc = ember(admin_server, "secret", "delete", "api")  # still named by deployed functions
    assert proc.returncode == 1
    assert "uses_secret/leak" in plain(proc.stderr)


# ----------------------------------------------------------------------------- audit


def test_audit_shows_who_did_what(admin_server: Server) -> None:
    ok(ember(admin_server, "policy", "create", "audited"))
    ok(ember(admin_server, "policy", "delete", "audited"))
    ember(admin_server, "token", "list", token="ember_wrong")

    out = ok(ember(admin_server, "audit", "--since", "1h"))
    for column in ("time", "workspace", "actor", "action", "target", "outcome"):
        assert column in out
    assert "audited" in out and "default" in out

    events = json.loads(ember(admin_server, "audit", "--since", "1h", "--json").stdout)
    assert isinstance(events, list) and events
    assert set(events[0]) >= {"id", "ts", "workspace", "actor", "action", "target", "outcome"}
    assert any(e["target"] and "audited" in e["target"] for e in events)
    assert any(e["outcome"] not in ("ok", "allowed", "success") for e in events)  # the bad token

    limited = json.loads(ember(admin_server, "audit", "--limit", "1", "--json").stdout)
    assert len(limited) == 1
    future = ok(ember(admin_server, "audit", "--since", str(time.time() + 3600)))
    assert "no audit events" in future


# ----------------------------------------------------------------------------- doctor


def test_doctor_prints_findings_and_exits_1_on_high(admin_server: Server) -> None:
    proc = ember(admin_server, "doctor")
    assert proc.returncode in (0, 1), proc.stderr
    out = plain(proc.stdout)
    assert "fix:" in out or "no risky settings found" in out

    token_file = admin_server.data_dir / "token"
    token_file.chmod(0o644)
    try:
        proc = ember(admin_server, "doctor", token="file")  # the client reads that file too
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        out = plain(proc.stdout)
        assert "high" in out and f"chmod 600 {token_file}" in out
        assert out.count(f"chmod 600 {token_file}") == 1  # server and client: reported once
    finally:
        token_file.chmod(0o600)


def test_doctor_checks_the_token_file_the_client_names(
    admin_server: Server, tmp_path: Path
) -> None:
    copy = tmp_path / "my-token"
    copy.write_text(admin_server.token + "\n")
    copy.chmod(0o644)
    # The client takes its token from the file: this is the file it reads, and the one checked.
    proc = ember(admin_server, "doctor", token=None, env={"EMBER_TOKEN_FILE": str(copy)})
    assert proc.returncode == 1
    assert f"chmod 600 {copy}" in plain(proc.stdout)
    copy.chmod(0o600)
    proc = ember(admin_server, "doctor", token=None, env={"EMBER_TOKEN_FILE": str(copy)})
    assert str(copy) not in plain(proc.stdout)


def test_doctor_with_nothing_risky(make_server: Any) -> None:
    server = make_server()
    os.chmod(server.data_dir, 0o700)
    os.chmod(server.data_dir / "ember.db", 0o600)
    ok(ember(server, "policy", "create", "cap", "--budget", "100USD/month"))
    proc = ember(server, "doctor")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "no risky settings found" in plain(proc.stdout)
