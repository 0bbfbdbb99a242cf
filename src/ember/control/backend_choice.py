"""Which backend runs the workers: `local` (processes here) or `ray` (a Ray cluster's nodes).

A helper of the plane, so that the plane builds one from the settings in a line and imports
Ray only when asked to (the `ray` extra is optional)."""

from __future__ import annotations

from pathlib import Path

from ember.backends.base import Backend
from ember.backends.local import LocalBackend
from ember.backends.sandbox import Sandbox
from ember.control.settings import Settings

BACKENDS = ("local", "ray")


def make_backend(settings: Settings, control_socket: Path, sandbox: Sandbox | None) -> Backend:
    """The backend the settings name (ValueError for another name; RayUnavailable without the
    `ray` package or a cluster to join)."""
    log_dir = settings.data_dir / "logs" / "workers"
    if settings.backend == "ray":
        from ember.backends.ray import RayBackend

        return RayBackend(
            settings.ray_address,
            log_dir,
            data_dir=settings.data_dir,
            control_socket=control_socket,
            sandbox=settings.sandbox,
            templates=settings.templates,
            isolated_only=settings.tenant_isolation,
        )
    if settings.backend != "local":
        raise ValueError(
            f"--backend must be one of {', '.join(BACKENDS)}, not {settings.backend!r}"
        )
    return LocalBackend(
        log_dir,
        templates=settings.templates,
        inventory=settings.inventory,
        control_socket=control_socket,
        sandbox=sandbox,
        isolated_only=settings.tenant_isolation,
    )
