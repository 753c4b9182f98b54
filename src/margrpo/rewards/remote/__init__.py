"""Remote rewards over HTTP: JSON + base64 PNG, schema version 1 (see :mod:`.schema`)."""

from __future__ import annotations

from .client import RemoteReward, RewardServerError
from .schema import SCHEMA_VERSION, Limits
from .server import RewardServer, is_loopback_host

__all__ = ["RemoteReward", "RewardServer", "RewardServerError", "Limits", "SCHEMA_VERSION", "is_loopback_host"]
