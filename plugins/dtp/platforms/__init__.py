"""Compute platforms by name: adding one means adding a module, not editing if-chains."""

from __future__ import annotations

from importlib import import_module

from dtp.platforms.base import ComputePlatform

# name -> "module:class", imported on first use so a DAG file never pays for every platform's imports.
_PLATFORMS: dict[str, str] = {
    "local": "dtp.platforms.local:LocalSlurmPlatform",
    "hyperpod": "dtp.platforms.hyperpod:HyperPodPlatform",
    "parallelcluster": "dtp.platforms.parallelcluster:ParallelClusterPlatform",
    "eks": "dtp.platforms.eks:EksPlatform",
    "batch": "dtp.platforms.batch:BatchPlatform",
}


def get_platform(name: str) -> ComputePlatform:
    """The platform ``name``, its module imported only now (each pulls in its own service's client)."""
    try:
        module, cls = _PLATFORMS[name].split(":")
    except KeyError:
        raise ValueError(f"platform {name!r} is not available; available: {', '.join(sorted(_PLATFORMS))}") from None
    platform: ComputePlatform = getattr(import_module(module), cls)()
    return platform
