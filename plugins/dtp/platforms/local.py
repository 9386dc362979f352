"""The local platform: the stack's real Slurm cluster stands in for the compute nodes.

Nothing is created on AWS for the cluster; the run's identity on Slurm is its
job name, so teardown cancels by name and checks no job of the run is left.
"""

from __future__ import annotations

import sys
from typing import Any

from dtp.hooks.slurm import SlurmHook


class LocalSlurmPlatform:
    """Slurm on this host through the ``slurm_default`` connection."""

    name = "local"

    def __init__(self, slurm_conn_id: str = SlurmHook.default_conn_name) -> None:
        self.slurm_conn_id = slurm_conn_id

    @property
    def hook(self) -> SlurmHook:
        return SlurmHook(self.slurm_conn_id)

    def max_nodes(self) -> int:
        return self.hook.node_count()

    def default_image(self) -> dict[str, str]:
        # Slurm's nodes share this host, so the project's own virtualenv is the "image".
        return {"source": "project virtualenv", "python": sys.executable}

    def provision(self, spec: dict[str, Any], network: dict[str, str]) -> dict[str, Any]:
        hook = self.hook
        nodes = hook.node_count()
        wanted = spec["params"]["num_nodes"]
        if nodes < wanted:
            raise RuntimeError(f"the local Slurm cluster has {nodes} nodes; the run asks for {wanted}")
        return {
            "platform": self.name,
            "slurm_conn_id": self.slurm_conn_id,
            "shared_dir": hook.shared_dir,
            "nodes": nodes,
            "scheduler": "slurm",
        }

    def teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        # Every job of the run (training, preflight, ...) is named with the run's key as prefix.
        return {"cancelled_jobs": self.hook.cancel_and_wait(spec["names"]["slurm_job"], prefix=True)}
