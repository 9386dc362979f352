"""Compute platforms by name: adding one means adding a module, not editing if-chains."""

from __future__ import annotations

from dtp.platforms.base import ComputePlatform
from dtp.platforms.local import LocalSlurmPlatform

_PLATFORMS: dict[str, type] = {"local": LocalSlurmPlatform}


def get_platform(name: str) -> ComputePlatform:
    try:
        return _PLATFORMS[name]()
    except KeyError:
        raise ValueError(f"platform {name!r} is not available; available: {', '.join(sorted(_PLATFORMS))}") from None
