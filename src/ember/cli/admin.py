"""`ember workspace|token|policy|secret|audit|doctor`: who may call what, spend how much, read which
secret, and what was done. Thin commands over the admin endpoints (docs/security.md).

Each lives in a module of its own (workspaces.py: workspaces and tokens; policies.py; secrets.py;
audit.py; doctor.py); this one adds them to the `ember` app, in a help panel of their own.
Kept apart from `main.py` (which only registers these) and importing nothing from it: run as
`python -m ember.cli.main`, main is `__main__`, and importing it back would load it twice.
"""

from __future__ import annotations

import typer

# ago, duration and token_file_findings are re-exported (`x as x`): they were defined here first
from ember.cli.audit import audit
from ember.cli.common import ago as ago
from ember.cli.common import duration as duration
from ember.cli.doctor import doctor
from ember.cli.doctor import token_file_findings as token_file_findings
from ember.cli.policies import policy_app
from ember.cli.secrets import secret_app
from ember.cli.workspaces import token_app, workspace_app

PANEL = "Access, budgets, secrets"


def register(app: typer.Typer) -> None:
    """Add these commands to the `ember` app, in a help panel of their own."""
    for sub in (workspace_app, token_app, policy_app, secret_app):
        app.add_typer(sub, rich_help_panel=PANEL)
    app.command(rich_help_panel=PANEL)(audit)
    app.command(rich_help_panel=PANEL)(doctor)
