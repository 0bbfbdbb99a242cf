"""Whose code may run on a server without the worker sandbox: one rule, read where a worker
starts (the backend refuses it) and where an app is deployed (the answer warns of it)."""

from __future__ import annotations


def refusal(
    *, sandboxed: bool, workspace: str, tenant_isolation: bool, block_network: bool = False
) -> str | None:
    """Why a worker of `workspace` may not start here, or None when it may. With a sandbox every
    workspace's code runs; without one, only the `default` workspace's (a single user's own
    machine), unless the operator gave up isolation (`--no-tenant-isolation`); and
    `block_network` can be kept only by a sandbox."""
    if sandboxed:
        return None
    if block_network:
        return (
            "block_network=True needs the worker sandbox (bubblewrap), which this server "
            "does not run: install bubblewrap and restart the server (see `ember doctor`)"
        )
    if workspace != "default" and tenant_isolation:
        return (
            f"this server runs user code without a sandbox, so it runs the code of the "
            f"'default' workspace only, not of {workspace!r}: install bubblewrap (see "
            "`ember doctor`), or restart the server with --no-tenant-isolation to run every "
            "workspace's code as the server's user, able to read the data dir"
        )
    return None
