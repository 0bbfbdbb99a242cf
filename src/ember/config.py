"""Client and server settings from the environment, in one place."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8484"
DEFAULT_PORT = 8484
DEFAULT_MAX_PAYLOAD = 10 * 2**20
TOKEN_FILE = "token"


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`--data-dir`, else `EMBER_DATA_DIR`, else `.ember/` in the current directory."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("EMBER_DATA_DIR")
    return Path(env).expanduser().resolve() if env else Path.cwd() / ".ember"


def server_url() -> str:
    return os.environ.get("EMBER_URL", DEFAULT_URL).rstrip("/")


def client_token() -> str | None:
    """`EMBER_TOKEN`, else the file named by `EMBER_TOKEN_FILE` (a workspace token kept out of
    the shell's environment), else the token file the server wrote in its data dir."""
    token = os.environ.get("EMBER_TOKEN")
    if token:
        return token.strip()
    named = os.environ.get("EMBER_TOKEN_FILE")
    path = Path(named).expanduser() if named else data_dir() / TOKEN_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
