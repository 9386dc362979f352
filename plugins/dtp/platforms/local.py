"""The local platform: the stack's real Slurm cluster stands in for the compute nodes.

Nothing is created on AWS for the cluster; the run's identity on Slurm is its
job name, so teardown cancels by name and checks no job of the run is left.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from dtp.hooks.registry import ContainerRegistryHook
from dtp.hooks.slurm import SlurmHook
from dtp.pipeline.run_dirs import lease_shared_dir


class LocalSlurmPlatform:
    """Slurm on this host through the ``slurm_default`` connection."""

    name = "local"
    scheduler = "slurm"

    def __init__(self, slurm_conn_id: str = SlurmHook.default_conn_name) -> None:
        self.slurm_conn_id = slurm_conn_id

    @property
    def hook(self) -> SlurmHook:
        return SlurmHook(self.slurm_conn_id)

    def max_nodes(self) -> int:
        return self.hook.node_count()

    def node_names(self) -> list[str]:
        return sorted(self.hook.node_states())

    def existing_file_system(self) -> str:
        return ""  # the host's shared directory: no VPC to be in

    def ami_family(self, instance: dict[str, Any]) -> str:
        # The local cluster stands in for a ParallelCluster CPU cluster; its nodes are this host and boot nothing,
        # so the AMI is recorded with the run, not booted.
        return "pcluster-cpu"

    def default_image(self) -> dict[str, str]:
        # Slurm's nodes share this host, so the project's own virtualenv is the "image".
        return {"source": "project virtualenv", "python": sys.executable}

    def runtime(self, image: str, spec: dict[str, Any]) -> dict[str, str]:
        # No container runtime on the local nodes: the image is unpacked on the shared filesystem (as enroot
        # would import it) and its training programs run with the project's interpreter. Every run of the image
        # shares that directory: the run leases it first, so the reaper keeps it while a run may use it.
        digest = image.rsplit("@", 1)[-1].removeprefix("sha256:")
        shared_dir = self.hook.shared_dir
        dest = Path(shared_dir) / "images" / digest[:16]
        lease_shared_dir(spec, {"slurm_conn_id": self.slurm_conn_id, "shared_dir": shared_dir}, dest)
        rootfs = ContainerRegistryHook().unpack(image, dest)
        return {
            "source": f"image {image}",
            "image": image,
            "python": sys.executable,
            "training_dir": str(rootfs / "opt" / "dtp" / "training"),
        }

    def provision(self, spec: dict[str, Any], network: dict[str, str], ami: str | None = None) -> dict[str, Any]:
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

    def render(self, spec: dict[str, Any], network: dict[str, str]) -> dict[str, str]:
        # The stack's slurm.conf describes the cluster; a run sends nothing to create one.
        return {}

    def check(self, documents: dict[str, str]) -> list[str]:
        return []

    def ready_trigger(self, cluster: dict[str, Any]) -> None:
        return None

    def stop_jobs(self, spec: dict[str, Any]) -> dict[str, Any]:
        # Every job of the run (training, preflight, ...) is named with the run's key as prefix.
        return {"cancelled_jobs": self.hook.cancel_and_wait(spec["names"]["slurm_job"], prefix=True)}

    def teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        # The stack's Slurm cluster outlives runs: there is nothing else to delete.
        return self.stop_jobs(spec)
