"""How things are named, once for the SDK, the server and the API document.

Both spellings are full matches (`fullmatch`, or `^...$` in a schema): a name with a trailing
newline is not a name.
"""

from __future__ import annotations

import re

NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
"""Apps and policies: a letter or digit, then letters, digits, '_', '.', '-'; 64 at most."""
HANDLE = r"[A-Za-z0-9_.-]{1,64}"
"""Workspaces, tokens and secrets: the same characters, any of them first."""

NAME_RE = re.compile(NAME)
HANDLE_RE = re.compile(HANDLE)
