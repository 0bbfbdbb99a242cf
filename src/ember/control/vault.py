"""The vault: encrypts secret values at rest with one master key (Fernet: AES-128-CBC + HMAC).

The key comes from `EMBER_MASTER_KEY` when set (keep it in the operator's secret manager, apart
from the database), else from `<data_dir>/master.key`, made on first use, readable by its owner
only. Whoever holds the database alone cannot read a secret; whoever holds both can.
"""

from __future__ import annotations

import binascii
import contextlib
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

KEY_ENV = "EMBER_MASTER_KEY"
KEY_FILE = "master.key"
MAKE_KEY = (
    'python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
)


class VaultError(RuntimeError):
    """The master key is missing, malformed or not the one the secrets were written with."""


class Vault:
    def __init__(self, key: bytes, *, source: str, key_path: Path | None = None) -> None:
        self.source = source
        """Where the key came from: "EMBER_MASTER_KEY" or the key file's path."""
        self.key_path = key_path
        """The key file, None when the key comes from the environment (for the posture check)."""
        try:
            self._fernet = Fernet(key)
        except (ValueError, binascii.Error, TypeError):
            raise VaultError(
                f"the master key in {source} is malformed: a valid key is 32 random bytes in "
                "url-safe base64 (44 characters, ending in '='). If secrets were stored with an "
                f"earlier key, restore that one; otherwise make a new one with: {MAKE_KEY}"
            ) from None

    def __repr__(self) -> str:  # never the key
        return f"Vault(source={self.source!r})"

    @classmethod
    def load(cls, data_dir: Path, *, environ: Mapping[str, str] | None = None) -> Vault:
        """The vault of a server: its key from EMBER_MASTER_KEY, else from (or into) the key file."""
        env = os.environ if environ is None else environ
        if KEY_ENV in env:
            key = env[KEY_ENV].strip()
            if not key:
                raise VaultError(
                    f"{KEY_ENV} is set but empty: set it to the master key, or unset it to use "
                    f"{data_dir / KEY_FILE}"
                )
            return cls(key.encode(), source=KEY_ENV)
        path = data_dir / KEY_FILE
        if not path.exists():
            _create_key_file(path)
        return cls(path.read_bytes().strip(), source=str(path), key_path=path)

    def encrypt(self, values: Mapping[str, str]) -> str:
        plain = json.dumps(dict(values), separators=(",", ":"), ensure_ascii=False)
        return self._fernet.encrypt(plain.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> dict[str, str]:
        try:
            plain = self._fernet.decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError):
            raise VaultError(
                f"cannot decrypt a stored secret: the master key ({self.source}) does not match "
                f"the one the secrets were written with. Set {KEY_ENV} to the original key, or "
                f"restore the original {KEY_FILE}; or set the secret again with `ember secret set`"
            ) from None
        values = json.loads(plain)
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            raise VaultError("a stored secret decrypted to something that is not KEY=VALUE pairs")
        return values


def _create_key_file(path: Path) -> None:
    """Write a new key so that no reader ever sees a partial file and no key is overwritten:
    into a private temporary file first, then linked into place (which fails if one exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process made it first: use theirs
            pass
        except OSError:  # a filesystem without hard links: create it in place, exclusively
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key + b"\n")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
