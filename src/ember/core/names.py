"""How things are named, once for the SDK, the server and the API document; and the one place
where a path is built from a name.

Both spellings are full matches (`fullmatch`, or `^...$` in a schema): a name with a trailing
newline is not a name. Names become path segments (a workspace's bundles and logs live under
`bundles/WORKSPACE/APP/`), so `.` and `..` are never names, and every path built from names goes
through `under`, which refuses any part that could leave its root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
"""Apps and policies: a letter or digit, then letters, digits, '_', '.', '-'; 64 at most."""
HANDLE = (
    r"(?:[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}"
    r"|\.[A-Za-z0-9_-][A-Za-z0-9_.-]{0,62}"
    r"|\.\.[A-Za-z0-9_.-]{1,62})"
)
"""Workspaces, tokens and secrets: the same characters, any of them first, 64 at most; not '.'
or '..' (spelled without a look-ahead, which the API document's regex engines lack)."""
HANDLE_RULE = "1-64 characters of letters, digits, '_', '.', '-' (and not '.' or '..')"
"""`HANDLE` in words, for the messages that refuse a name."""

NAME_RE = re.compile(NAME)
HANDLE_RE = re.compile(HANDLE)

_SEGMENT_RE = re.compile(r"[^/\\\x00]{1,255}")


class UnsafePath(ValueError):
    """A path part that is not one plain segment: empty, '.', '..', or holding a separator."""


def is_segment(part: str) -> bool:
    """True for one plain file or directory name: no separator, not '.' or '..'."""
    return bool(_SEGMENT_RE.fullmatch(part)) and part not in (".", "..")


def under(root: Path, *parts: str) -> Path:
    """`root / part / ...`, refused (UnsafePath) unless every part is one plain segment, so the
    path stays under `root` whatever the names in it: every path built from a workspace, app,
    unit or worker name is made here. Pure: it reads no file system."""
    for part in parts:
        if not isinstance(part, str) or not is_segment(part):
            raise UnsafePath(f"{part!r} is not a safe file name under {root}")
    path = root.joinpath(*parts)
    base = os.path.normpath(root)
    if os.path.commonpath([base, os.path.normpath(path)]) != base:  # belt and braces
        raise UnsafePath(f"{path} is not under {root}")
    return path
