"""The one interface every compute platform implements.

Modeled on SkyPilot's provision API: a few plain operations, one module per
platform, chosen by the ``platform`` param. The pipeline's graph is the same
for every platform; only these calls differ.
"""

from __future__ import annotations

from typing import Any, Protocol


class ComputePlatform(Protocol):
    """Provision a cluster for a run, report its capacity, tear it down."""

    name: str
    # The AMI family (images/packer/families) the platform's nodes boot; None where nodes boot no DTP AMI.
    ami_family: str | None

    def max_nodes(self) -> int:
        """How many compute nodes a run may ask for (a read, safe before anything exists)."""

    def default_image(self) -> dict[str, str]:
        """The training runtime to use when no baked image is published for this platform."""

    def runtime(self, image: str) -> dict[str, str]:
        """How jobs run the published training image ``image`` (``registry/repo@digest``)."""

    def provision(self, spec: dict[str, Any], network: dict[str, str]) -> dict[str, Any]:
        """Create (or find again) the run's cluster; return how to reach it."""

    def teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Stop the run's jobs and delete its cluster; verify nothing is left."""
