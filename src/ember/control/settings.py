"""The server's settings, as the control plane and its rooms read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ember.core.placement import Gpu
from ember.core.pricing import PriceTable


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
    host: str = "127.0.0.1"
    tls: bool = False
    """Where the API listens and whether with TLS: facts for `ember doctor`."""
