"""The server's settings, as the control plane and its rooms read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ember.core.lease import DEFAULT_TTL_S
from ember.core.placement import Gpu
from ember.core.pricing import PriceTable
from ember.core.quotas import Quotas
from ember.envs.bundle import DEFAULT_LIMIT as DEFAULT_BUNDLE_LIMIT


@dataclass
class Settings:
    data_dir: Path
    cancel_grace_s: float = 2.0
    drain_grace_s: float = 10.0
    inventory: tuple[Gpu, ...] = ()
    prices: PriceTable = field(default_factory=PriceTable)
    checkpoint_s: float = 1.0
    """How often open usage segments are written: the most metering a kill -9 can lose."""
    templates: bool = True
    """Fork workers from a pre-initialised template per function version."""
    template_idle_s: float = 600.0
    """A template that forked no worker for this long stops (started again on demand)."""
    template_memory: int = 4 << 30
    """Resident bytes all templates together may hold; the least recently used stop beyond."""
    sandbox: str = "auto"
    """Workers in bubblewrap sandboxes: `auto` (where it can run), `bwrap` (required), `off`."""
    tenant_isolation: bool = True
    """Without a sandbox, run the code of the `default` workspace only (False: every workspace's,
    able to read the data dir: `--no-tenant-isolation`)."""
    host: str = "127.0.0.1"
    tls: bool = False
    """Where the API listens and whether with TLS: facts for `ember doctor`."""
    quotas: Quotas = field(default_factory=Quotas)
    """What each workspace may queue, log and keep (docs/api.md, "Limits")."""
    bundle_limit: int = DEFAULT_BUNDLE_LIMIT
    """Bytes a code bundle may unpack to (EMBER_BUNDLE_LIMIT)."""
    durability: str = "normal"
    """SQLite's `synchronous` for the store: "normal" or "full" (docs/reliability.md)."""
    backend: str = "local"
    """What runs workers: `local` (processes here) or `ray` (actors of a Ray cluster)."""
    ray_address: str | None = None
    """The Ray cluster to join as a driver (`--ray-address`; None: Ray's own default)."""
    advertise_url: str = "http://127.0.0.1:8765"
    """Where other servers of a shared store reach this one (`--advertise-url`)."""
    lease_ttl_s: float = DEFAULT_TTL_S
    """How long the scheduler lease lasts unrenewed (EMBER_LEASE_TTL; control/lease.py)."""
    webhook_backoff_s: tuple[float, ...] = (1.0, 5.0)
    """The waits before a webhook's second and third attempts (EMBER_WEBHOOK_BACKOFF)."""
