"""Environment specs: what a function's Python environment is made of, as plain data.

An Env is a base (`standard`: the server's Python and nothing but ember's worker runtime; `ai`:
torch, transformers, safetensors, numpy and accelerate, resolved together), the packages a
function adds, or an exact lock to rebuild, and the variables its workers get. Its id is a hash of
that content and of what the server adds (the Python version, the AI base's pins), so an Env
built once is found again by its content.

This module is imported by user code in workers (through `ember.Env`), so it uses the standard
library alone; the deploy-time checks that need `packaging` import it when they run.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

BASES = ("standard", "ai")
AI_PACKAGES = ("torch", "transformers", "safetensors", "numpy", "accelerate")
"""The AI base: resolved together, built once per server, shared by every Env on it."""

MAX_PACKAGES = 200
MAX_LOCK_LINES = 2000
MAX_VARS = 100
VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PYTHON_RE = re.compile(r"^3\.\d{1,2}$")
_RESERVED_VAR_PREFIXES = ("EMBER_", "PYTHON", "LD_", "CUDA_VISIBLE_DEVICES")
"""Variables the platform sets or that would change which code runs: not an Env's to set."""


class EnvSpecError(ValueError):
    """An Env that cannot be built as written; the message says what to change."""


@dataclass(frozen=True)
class EnvSpec:
    base: str = "standard"
    python: str | None = None
    """`3.12`, say; None is the server's own version."""
    packages: tuple[str, ...] = ()
    """Requirement strings (`pkg==1.2`), in the order they were asked for."""
    lock: tuple[str, ...] | None = None
    """An exact lock to install as it is (`Env.from_lock`): `name==version --hash=...` lines."""
    variables: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "python": self.python,
            "packages": list(self.packages),
            "lock": None if self.lock is None else list(self.lock),
            "variables": dict(sorted(self.variables.items())),
        }

    @classmethod
    def from_dict(cls, d: Any) -> EnvSpec:
        """Checked as untrusted input: a client may send anything."""
        if not isinstance(d, dict):
            raise EnvSpecError("an environment must be a JSON object")
        unknown = sorted(set(d) - {"base", "python", "packages", "lock", "variables"})
        if unknown:
            raise EnvSpecError(f"unknown environment field {unknown[0]!r}")
        base = d.get("base", "standard")
        if base not in BASES:
            raise EnvSpecError(f"base must be one of {', '.join(BASES)}, got {base!r}")
        python = d.get("python")
        if python is not None and (not isinstance(python, str) or not PYTHON_RE.match(python)):
            raise EnvSpecError(f"python must be a version such as '3.11', got {python!r}")
        found = d.get("packages")
        packages = _strings([] if found is None else found, "packages", MAX_PACKAGES)
        lock = d.get("lock")
        if lock is not None:
            # a lock line carries every file's hash of its release: numpy's is long
            lock = tuple(_strings(lock, "lock", MAX_LOCK_LINES, longest=1 << 16))
            if packages:
                raise EnvSpecError("an Env from a lock installs the lock alone: add no packages")
        variables = d.get("variables")
        variables = {} if variables is None else variables  # but `false` or `[]` is a mistake
        if not isinstance(variables, dict) or len(variables) > MAX_VARS:
            raise EnvSpecError(f"variables must be an object of at most {MAX_VARS} names")
        for k, v in variables.items():
            if not isinstance(k, str) or not VAR_RE.match(k):
                raise EnvSpecError(f"variable name {k!r} must be letters, digits and '_'")
            if k.startswith(_RESERVED_VAR_PREFIXES):
                raise EnvSpecError(f"variable {k!r} is set by the platform; use another name")
            if not isinstance(v, str) or len(v) > 4096 or "\0" in v:
                raise EnvSpecError(f"variable {k!r} must be a string of at most 4096 characters")
        return cls(base, python, tuple(packages), lock, dict(variables))

    def digest(self, server_inputs: Mapping[str, Any] | None = None) -> str:
        """The id of the Env built from this spec on a server whose own contribution (its
        Python version, the AI base's pins) is `server_inputs`."""
        content = {"spec": self.to_dict(), "server": dict(server_inputs or {})}
        raw = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
        return "env-" + hashlib.sha256(raw).hexdigest()[:16]


def _strings(value: Any, what: str, most: int, longest: int = 4096) -> list[str]:
    if not isinstance(value, list) or len(value) > most:
        raise EnvSpecError(f"{what} must be a list of at most {most} strings")
    out = []
    for item in value:
        if not isinstance(item, str) or not item.strip() or len(item) > longest or "\n" in item:
            raise EnvSpecError(f"{what}: {item!r} is not a one-line string")
        out.append(item.strip())
    return out


def check_requirements(lines: Sequence[str]) -> list[str]:
    """Each requirement parsed, normalised and checked: a name from the package index, with
    version specifiers and markers, never a URL or a local path (a build must not read the
    server's files or fetch from elsewhere), never pip options (the index is the server's)."""
    from packaging.requirements import InvalidRequirement, Requirement

    out = []
    for line in lines:
        if line.startswith("-"):
            raise EnvSpecError(
                f"{line!r}: pip options are not accepted; the package index is the server's "
                "configuration"
            )
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise EnvSpecError(f"{line!r} is not a valid requirement: {exc}") from None
        if req.url:
            raise EnvSpecError(
                f"{line!r}: install from the package index by name (`pkg==1.2`), not from a URL "
                "or a path"
            )
        out.append(str(req))
    return out


def names_of(requirements: Sequence[str]) -> set[str]:
    """Normalised project names (PEP 503) of requirement strings."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return {canonicalize_name(Requirement(r).name) for r in requirements}


def parse_requirements_text(text: str, where: str) -> list[str]:
    """A requirements file's requirements, each checked (`check_requirements`), a bad one named
    by its file and line; `-r`/`-c` and pip options are refused by name."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise EnvSpecError(
                f"{where}:{n}: {line!r}: options and includes are not accepted in an Env's "
                "requirements; list the packages themselves"
            )
        try:
            out += check_requirements([line])
        except EnvSpecError as exc:
            raise EnvSpecError(f"{where}:{n}: {exc}") from None
    return out


def parse_lock_text(text: str, where: str) -> list[str]:
    """A lock (`uv pip compile --generate-hashes` or `ember env export` output) as one line per
    package, `name==version --hash=sha256:...`, continuation lines joined."""
    joined = re.sub(r"\\\s*\n", " ", text)
    out = []
    for n, raw in enumerate(joined.splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if raw.lstrip().startswith("#") else raw.strip()
        line = re.sub(r"\s+#.*$", "", line)
        if not line:
            continue
        if line.startswith("-"):
            raise EnvSpecError(f"{where}:{n}: {line!r}: a lock holds packages only")
        if "==" not in line.split()[0]:
            raise EnvSpecError(
                f"{where}:{n}: {line.split()[0]!r} is not pinned (name==version); a lock pins "
                "every package"
            )
        out.append(" ".join(line.split()))
    if not out:
        raise EnvSpecError(f"{where} holds no packages")
    return out
