"""Secrets: validation, `.env` parsing, redaction (pure), and the vault that encrypts them at rest."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from ember.control.vault import Vault, VaultError
from ember.core.secrets import (
    MAX_VALUE_BYTES,
    MIN_REDACT_LEN,
    SECRET_KEYS_ENV,
    Redactor,
    SecretError,
    parse_dotenv,
    secret_values,
    too_short,
    validate_secret,
)
from ember.worker.output import error_body, output_json, redactor_from_env

TOKEN = "hf_s3cr3tTOKENvalue"

# validate_secret


def test_a_valid_secret_comes_back_as_a_plain_dict() -> None:
    values = {"HF_TOKEN": TOKEN, "_private": "", "A1": "x"}
    assert validate_secret("hf", values) == values
    assert validate_secret("openai-prod.v2_x", {"K": "v"}) == {"K": "v"}
    assert validate_secret("a" * 64, {"K": "v"}) == {"K": "v"}


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "slash/name", "é", ".", "..", 3])
def test_bad_secret_names_say_what_a_name_may_hold(name: object) -> None:
    with pytest.raises(SecretError, match="letters, digits"):
        validate_secret(name, {"K": "v"})  # type: ignore[arg-type]


@pytest.mark.parametrize("values", [{}, None, [("K", "v")], "K=v"])
def test_values_must_be_a_non_empty_object(values: object) -> None:
    with pytest.raises(SecretError, match="at least one KEY=VALUE"):
        validate_secret("hf", values)


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("1ABC", "not a valid environment variable name"),
        ("A-B", "not a valid environment variable name"),
        ("", "not a valid environment variable name"),
        ("EMBER_TOKEN", "reserved for ember"),
        ("PATH", "set by the platform"),
        ("LD_PRELOAD", "set by the platform"),
        ("CUDA_VISIBLE_DEVICES", "set by the platform"),
        ("HOME", "set by the platform"),
    ],
)
def test_keys_must_be_env_var_names_that_do_not_clash(key: str, match: str) -> None:
    with pytest.raises(SecretError, match=match):
        validate_secret("hf", {key: "v"})


def test_values_must_be_strings_without_nul_and_not_too_large() -> None:
    with pytest.raises(SecretError, match="must be a string"):
        validate_secret("hf", {"K": 1})
    with pytest.raises(SecretError, match="NUL"):
        validate_secret("hf", {"K": "a\x00b"})
    with pytest.raises(SecretError, match="UTF-8"):
        validate_secret("hf", {"K": "\ud800"})
    assert validate_secret("hf", {"K": "x" * MAX_VALUE_BYTES})
    with pytest.raises(SecretError, match="64 KiB"):
        validate_secret("hf", {"K": "x" * (MAX_VALUE_BYTES + 1)})
    with pytest.raises(SecretError, match="64 KiB"):  # bytes, not characters
        validate_secret("hf", {"K": "é" * (MAX_VALUE_BYTES // 2 + 1)})


def test_at_most_100_keys() -> None:
    assert validate_secret("hf", {f"K{i}": "v" for i in range(100)})
    with pytest.raises(SecretError, match="split it"):
        validate_secret("hf", {f"K{i}": "v" for i in range(101)})


def test_errors_never_echo_a_value() -> None:
    for values in ({"K": TOKEN + "\x00"}, {"K": TOKEN * 5000}):
        with pytest.raises(SecretError) as info:
            validate_secret("hf", values)
        assert TOKEN not in str(info.value)


# parse_dotenv


def test_dotenv_lines_comments_export_and_quotes() -> None:
    text = (
        "\ufeff# a comment\n"
        "\n"
        "PLAIN=abc\n"
        "export EXPORTED = spaced value  \n"
        "  INDENTED=1\n"
        "INLINE=abc # a comment\n"
        "HASH=abc#not-a-comment\n"
        "SINGLE='it is $literal \\n # not a comment'\n"
        'DOUBLE="line1\\nline2 \\"quoted\\" back\\\\slash" # comment\n'
        "EMPTY=\n"
        "EMPTY_QUOTED=''\n"
        "WINDOWS=crlf\r\n"
        "EQUALS=a=b=c\n"
        "PLAIN=later wins\n"
    )
    assert parse_dotenv(text) == {
        "PLAIN": "later wins",
        "EXPORTED": "spaced value",
        "INDENTED": "1",
        "INLINE": "abc",
        "HASH": "abc#not-a-comment",
        "SINGLE": "it is $literal \\n # not a comment",
        "DOUBLE": 'line1\nline2 "quoted" back\\slash',
        "EMPTY": "",
        "EMPTY_QUOTED": "",
        "WINDOWS": "crlf",
        "EQUALS": "a=b=c",
    }


def test_dotenv_quoted_values_may_span_lines() -> None:
    text = 'KEY="-----BEGIN KEY-----\nabc\n-----END KEY-----"\nNEXT=1\n'
    assert parse_dotenv(text) == {"KEY": "-----BEGIN KEY-----\nabc\n-----END KEY-----", "NEXT": "1"}
    text = "KEY='first  \r\n  second  '  \nNEXT=1\n"
    assert parse_dotenv(text) == {"KEY": "first  \n  second  ", "NEXT": "1"}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("A=1\nnot a pair\n", "line 2: expected KEY=VALUE"),
        ("A=1\n\n1BAD=x\n", "line 3: '1BAD' is not a valid environment variable name"),
        ("A=1\nB='open\nC=2\n", "line 2: the value of B opens a ' quote that is never closed"),
        ('A="closed" trailing\n', "line 1: unexpected text after the closing quote of A"),
        ("=value\n", "line 1: expected KEY=VALUE"),
    ],
)
def test_a_malformed_dotenv_line_is_named_by_number(text: str, match: str) -> None:
    with pytest.raises(SecretError, match=match):
        parse_dotenv(text)


def test_a_malformed_dotenv_line_is_not_echoed() -> None:
    with pytest.raises(SecretError) as info:
        parse_dotenv(f"HF_TOKEN {TOKEN}\n")
    assert TOKEN[:4] not in str(info.value)


# Redactor


def test_redactor_hides_every_occurrence() -> None:
    r = Redactor([TOKEN])
    assert r.text(f"a {TOKEN} b {TOKEN}{TOKEN}") == "a [secret] b [secret]"
    assert r.text("nothing here") == "nothing here"


def test_a_value_containing_another_is_hidden_whole() -> None:
    r = Redactor(["abcd", "xxabcdyy"])
    assert r.text("1 xxabcdyy 2 abcd 3") == "1 [secret] 2 [secret] 3"


def test_overlapping_values_leave_no_fragment() -> None:
    r = Redactor(["abcdef", "defghi"])
    assert r.text("<abcdefghi>") == "<[secret]>"
    assert r.text("<defghiabcdef>") == "<[secret]>"
    # a value overlapping itself
    assert Redactor(["abab"]).text("xababababy") == "x[secret]y"


def test_short_and_empty_values_are_not_redacted() -> None:
    r = Redactor(["", "a", "abc"])
    assert not r
    assert r.text("a abc") == "a abc"
    assert too_short({"A": "", "B": "x" * (MIN_REDACT_LEN - 1), "C": "x" * MIN_REDACT_LEN}) == ["B"]
    assert Redactor(["x" * MIN_REDACT_LEN])


def test_escaped_and_multi_line_forms_are_hidden() -> None:
    value = 'pa"ss\\wo\nrd-é-line2'
    r = Redactor([value])
    assert r.text(f"raw {value}!") == "raw [secret]!"
    assert r.text(f"repr {value!r}") == "repr '[secret]'"
    assert r.text(f"json {json.dumps(value)}") == 'json "[secret]"'
    assert r.text(f"json {json.dumps(value, ensure_ascii=False)}") == 'json "[secret]"'
    # logs arrive a line at a time: each line of the value is hidden on its own
    assert r.text('pa"ss\\wo') == "[secret]"
    assert r.text("rd-é-line2 more") == "[secret] more"


def test_redactor_walks_json_like_data() -> None:
    r = Redactor([TOKEN])
    data = {
        TOKEN: {"nested": [TOKEN, f"x{TOKEN}y", 1, 2.5, None, True, ("t", TOKEN)]},
        "plain": "public",
        3: TOKEN,
    }
    assert r.json(data) == {
        "[secret]": {"nested": ["[secret]", "x[secret]y", 1, 2.5, None, True, ["t", "[secret]"]]},
        "plain": "public",
        3: "[secret]",
    }
    assert data[TOKEN]["nested"][0] == TOKEN  # the input is left as it was
    assert r.json(TOKEN) == "[secret]"
    assert r.json(42) == 42
    empty = Redactor([])
    assert not empty and empty.json(data) is data


def test_redactor_repr_shows_no_value() -> None:
    assert TOKEN not in repr(Redactor([TOKEN]))


def test_redactor_from_env_reads_the_keys_the_server_names() -> None:
    env = {SECRET_KEYS_ENV: "HF_TOKEN, OTHER,,MISSING", "HF_TOKEN": TOKEN, "OTHER": "zzzz"}
    env["NOT_SECRET"] = "public-value"
    assert secret_values(env) == [TOKEN, "zzzz"]
    r = Redactor.from_env(env)
    assert r.text(f"{TOKEN} zzzz public-value") == "[secret] [secret] public-value"
    assert not Redactor.from_env({"HF_TOKEN": TOKEN})


# the worker's helpers (runtime.py): what it sends the server


def test_worker_helpers_redact_errors_and_outputs() -> None:
    env = {SECRET_KEYS_ENV: "HF_TOKEN", "HF_TOKEN": TOKEN}
    redact = redactor_from_env(env)
    assert redact is not None
    assert redactor_from_env({"HF_TOKEN": TOKEN}) is None  # no secrets: nothing to do
    assert redactor_from_env({}, [TOKEN]) is not None  # values seen earlier, now gone from env

    try:
        raise RuntimeError(f"login failed with {TOKEN!r}")
    except RuntimeError as exc:
        body = error_body(exc, redact)
        plain = error_body(exc)
    assert TOKEN in plain["message"] and TOKEN in plain["traceback"]
    assert body["type"] == "RuntimeError"
    assert body["message"] == "login failed with '[secret]'"
    assert TOKEN not in body["traceback"] and "[secret]" in body["traceback"]
    assert "raise RuntimeError" in body["traceback"]

    out = {"token": TOKEN, TOKEN: [f"Bearer {TOKEN}"]}
    assert json.loads(output_json(out, redact)) == {
        "token": "[secret]",
        "[secret]": ["Bearer [secret]"],
    }
    assert json.loads(output_json(out)) == out
    with pytest.raises(ValueError):
        output_json(float("nan"), redact)


# Vault


def test_vault_round_trip_with_a_new_key_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    vault = Vault.load(data_dir, environ={})
    key_path = data_dir / "master.key"
    assert vault.key_path == key_path and vault.source == str(key_path)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert not [p for p in data_dir.iterdir() if p.name != "master.key"]  # no temporary left

    values = {"HF_TOKEN": TOKEN, "UNICODE": "héllo ☃"}
    token = vault.encrypt(values)
    assert isinstance(token, str)
    assert TOKEN not in token and "HF_TOKEN" not in token
    assert vault.decrypt(token) == values
    # the same file next time: what was written can be read
    again = Vault.load(data_dir, environ={})
    assert again.decrypt(token) == values
    assert key_path.read_bytes().strip() not in repr(again).encode()


def test_the_env_key_wins_over_the_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file_vault = Vault.load(tmp_path, environ={})
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("EMBER_MASTER_KEY", key)
    vault = Vault.load(tmp_path)
    assert vault.source == "EMBER_MASTER_KEY" and vault.key_path is None
    token = vault.encrypt({"K": TOKEN})
    assert json.loads(Fernet(key.encode()).decrypt(token.encode())) == {"K": TOKEN}
    with pytest.raises(VaultError):
        file_vault.decrypt(token)


def test_no_key_file_is_made_when_the_env_key_is_set(tmp_path: Path) -> None:
    Vault.load(tmp_path, environ={"EMBER_MASTER_KEY": Fernet.generate_key().decode()})
    assert not (tmp_path / "master.key").exists()


@pytest.mark.parametrize("bad", ["not-a-key", "c2hvcnQ=", Fernet.generate_key().decode()[:-2]])
def test_a_malformed_key_says_what_a_key_looks_like(tmp_path: Path, bad: str) -> None:
    with pytest.raises(VaultError) as info:
        Vault.load(tmp_path, environ={"EMBER_MASTER_KEY": bad})
    message = str(info.value)
    assert "EMBER_MASTER_KEY" in message and "malformed" in message
    assert "Fernet.generate_key()" in message and "44 characters" in message
    assert bad not in message


def test_a_malformed_key_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "master.key").write_text("garbage\n")
    with pytest.raises(VaultError, match=r"master\.key is malformed"):
        Vault.load(tmp_path, environ={})


def test_an_empty_env_key_is_an_error_not_a_silent_fallback(tmp_path: Path) -> None:
    with pytest.raises(VaultError, match="set but empty"):
        Vault.load(tmp_path, environ={"EMBER_MASTER_KEY": " "})


def test_a_wrong_key_says_it_does_not_match(tmp_path: Path) -> None:
    token = Vault.load(tmp_path / "a", environ={}).encrypt({"K": TOKEN})
    other = Vault.load(tmp_path / "b", environ={})
    with pytest.raises(VaultError) as info:
        other.decrypt(token)
    message = str(info.value)
    assert "does not match" in message
    assert "EMBER_MASTER_KEY" in message and "master.key" in message
    with pytest.raises(VaultError, match="does not match"):
        other.decrypt("not a token at all é")


def test_an_existing_key_file_is_never_overwritten(tmp_path: Path) -> None:
    key = Fernet.generate_key()
    (tmp_path / "master.key").write_bytes(key)
    vault = Vault.load(tmp_path, environ={})
    assert (tmp_path / "master.key").read_bytes() == key
    assert Fernet(key).decrypt(vault.encrypt({"K": "v"}).encode()) == b'{"K":"v"}'


def test_a_secret_that_is_a_number_is_redacted_from_outputs() -> None:
    redact = Redactor(["424242"])
    out = redact.json({"pin": 424242, "n": [1, 3.5, 424242.0], "other": 42, "flag": True})
    assert out == {"pin": "[secret]", "n": [1, 3.5, "[secret].0"], "other": 42, "flag": True}
    assert "424242" not in output_json({"account": 9424242}, redact).decode()
