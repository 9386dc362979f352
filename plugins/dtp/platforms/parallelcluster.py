"""The ParallelCluster platform: one AWS ParallelCluster 3 Slurm cluster per run, created with the pcluster CLI.

The cluster configuration is rendered from ``include/templates/parallelcluster/cluster-config.yaml.j2`` in the
shape of the reference repo's (aws-samples/awsome-distributed-training, 1.architectures/2.aws-parallelcluster) and
validated offline against aws-parallelcluster's own schema. aws-parallelcluster cannot share a virtualenv with
Airflow, so both the schema check and the CLI run in ``.venv-pcluster`` (made by ``scripts/setup``), in a
subprocess: ``include/parallelcluster/validate_config.py`` for the schema, ``pcluster`` for the cluster.

Jobs reach the cluster through the Slurm connection of the head node (``slurm_conn_id``, transport ssh) and run
the training image with enroot + pyxis (``srun --container-image``), which the ``pcluster-gpu`` AMIs carry.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
import time
from datetime import datetime
from functools import cached_property
from typing import Any, Literal

from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
from pydantic import Field, model_validator

from dtp.costs import FSX_SMALLEST_GIB, FSX_STEP_GIB, checkpoint_footprint_bytes, fsx_storage_gib_for
from dtp.hooks.stacks import StackHook
from dtp.params import TrainParams
from dtp.platforms import capacity_reservations, host_keys
from dtp.platforms.base import CLUSTER_LOG_RETENTION_DAYS, PlatformNotReady, PlatformSettings, stop_before_delete
from dtp.platforms.containers import FSX_MOUNT, ngc_pytorch_image
from dtp.platforms.pcluster_cli import WHERE_PCLUSTER_IS, PclusterCli
from dtp.platforms.pyxis import pyxis_runtime
from dtp.recipes import INCLUDE_DIR, Recipe, instance_types
from dtp.templates import render
from dtp.triggers.parallelcluster import ParallelClusterCreateTrigger, ParallelClusterDeleteTrigger

log = logging.getLogger(__name__)
# Cluster states in which its head node runs Slurm (a cluster updated after creation included).
READY_STATES = ("CREATE_COMPLETE", "UPDATE_COMPLETE")
# How long a deleted cluster may take to be gone (its own FSx file system included).
DELETE_TIMEOUT_S = 3600
# How often, and how far apart, deploy_cluster reads a ready cluster's head node's host keys from its console output,
# which may lag the cluster's CREATE_COMPLETE by a little.
HOST_KEY_READS = 4
HOST_KEY_READ_INTERVAL_S = 15.0

PROJECT_ROOT = INCLUDE_DIR.parent
PCLUSTER_VENV = PROJECT_ROOT / ".venv-pcluster"
VALIDATE_SCRIPT = INCLUDE_DIR / "parallelcluster" / "validate_config.py"
CONFIG_DOCUMENT = "cluster-config.yaml"
# A file system DTP sizes to the run holds its checkpoints at their most and a fifth more beside them: the dataset's
# mirror, the logs and traces.
FSX_ROOM_BESIDE_CHECKPOINTS = 1.2


class ParallelClusterSettings(PlatformSettings):
    """the ParallelCluster account settings as JSON: key_name (the head node's EC2 key pair), ssh_allowed_ips (the
    IPv4 CIDR of the Airflow workers' egress, the only addresses that may reach the head node's ssh) and optionally
    fsx_file_system_id (an existing FSx for Lustre file system; empty: a new PERSISTENT_2 one per cluster, of
    fsx_storage_capacity_gib, by default sized to the run's checkpoints: ``fsx_storage_capacity_gib``),
    custom_ami, capacity_reservation_id with capacity_type (CAPACITY_BLOCK for an EC2 Capacity Block, else
    ONDEMAND), head_node_instance_type, os, slurm_conn_id, max_nodes, pcluster"""

    key_name: str = Field(min_length=1, max_length=255)
    # The head node is in the public subnet and the workers reach its ssh at its public address; pcluster opens that
    # ssh to 0.0.0.0/0 unless told otherwise. Required to create a cluster (``creation_problems``), not to delete one.
    ssh_allowed_ips: str = ""
    head_node_instance_type: str = Field("m5.8xlarge", pattern=r"^[a-z0-9]+(-[a-z0-9]+)?\.[a-z0-9]+$")
    fsx_file_system_id: str = Field("", pattern=r"^$|^fs-[0-9a-f]{17}$")
    # None: the new file system is sized to each run (ParallelClusterPlatform.fsx_storage_capacity_gib).
    fsx_storage_capacity_gib: int | None = Field(None, ge=FSX_SMALLEST_GIB)
    fsx_throughput_per_tib: Literal[125, 250, 500, 1000] = 250
    custom_ami: str = Field("", pattern=r"^$|^ami-[0-9a-f]{8}([0-9a-f]{9})?$")
    capacity_reservation_id: str = Field("", pattern=r"^$|^cr-[0-9a-f]{17}$")
    # How the compute nodes are bought: a Capacity Block reservation is usable only as CAPACITY_BLOCK.
    capacity_type: Literal["ONDEMAND", "CAPACITY_BLOCK"] = "ONDEMAND"
    os: Literal["alinux2023", "ubuntu2204", "ubuntu2404", "rhel8", "rocky8", "rhel9", "rocky9"] = "ubuntu2204"
    slurm_conn_id: str = Field("dtp_parallelcluster_slurm", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    max_nodes: int = Field(64, ge=1, le=512)
    pcluster: str = str(PCLUSTER_VENV / "bin" / "pcluster")

    @model_validator(mode="after")
    def _capacity_block_needs_its_reservation(self) -> ParallelClusterSettings:
        if self.capacity_type == "CAPACITY_BLOCK" and not self.capacity_reservation_id:
            raise ValueError("capacity_type CAPACITY_BLOCK needs capacity_reservation_id, the Capacity Block's id")
        return self

    @model_validator(mode="after")
    def _fsx_storage_capacity_is_a_persistent_2_size(self) -> ParallelClusterSettings:
        size = self.fsx_storage_capacity_gib
        if size is not None and size != FSX_SMALLEST_GIB and size % FSX_STEP_GIB:
            raise ValueError(
                f"fsx_storage_capacity_gib: got {size}; a PERSISTENT_2 FSx for Lustre holds {FSX_SMALLEST_GIB} GiB or "
                f"a multiple of {FSX_STEP_GIB} GiB"
            )
        return self

    def creation_problems(self) -> list[str]:
        """Why a cluster may not be created with these settings, each as ``field: message``: no ``ssh_allowed_ips``,
        or one that is not the IPv4 CIDR of the Airflow workers' egress. Not a validator: a connection from before
        the rule still reads, so that the clusters made with it can be torn down."""
        value = self.ssh_allowed_ips
        if not value:
            return [
                "ssh_allowed_ips: required: the IPv4 CIDR of the Airflow workers' egress (their NAT gateway's "
                "address/32, say), the only addresses that may reach the head node's ssh"
            ]
        try:
            network = ipaddress.ip_network(value)
        except ValueError as err:
            return [f"ssh_allowed_ips: got {value!r}, which is no CIDR: {err}"]
        if network.prefixlen == 0:
            return [
                f"ssh_allowed_ips: got {value}, which opens the head node's ssh to the whole internet; give the IPv4 "
                "CIDR of the Airflow workers' egress"
            ]
        if network.version != 4:
            return [f"ssh_allowed_ips: got {value}; ParallelCluster takes an IPv4 CIDR"]
        return []


class ParallelClusterPlatform:
    """An AWS ParallelCluster 3 Slurm cluster per run, with the account settings of ``dtp_parallelcluster``."""

    name = "parallelcluster"
    scheduler: Literal["slurm"] = "slurm"
    conn_id = "dtp_parallelcluster"
    aws_conn_id = "aws_default"

    @cached_property
    def settings(self) -> ParallelClusterSettings:
        return ParallelClusterSettings.from_connection(self.conn_id)

    def ami_family(self, instance: dict[str, Any]) -> str:
        """The cluster's AMI (head node and compute nodes alike) for ``instance``'s accelerators."""
        if instance["accelerator"] == "cpu":
            return "pcluster-cpu"
        return "pcluster-neuron" if str(instance["accelerator"]).startswith("trainium") else "pcluster-gpu"

    @cached_property
    def cli(self) -> PclusterCli:
        return PclusterCli(self.settings.pcluster, self.aws_conn_id)

    def max_nodes(self) -> int:
        return self.settings.max_nodes

    def existing_file_system(self) -> str:
        return self.settings.fsx_file_system_id

    def fsx_storage_capacity_gib(self, spec: dict[str, Any]) -> int:
        """The size of the FSx for Lustre the cluster makes: the settings', else the smallest that holds the run's
        checkpoints at their most (``dtp.costs.checkpoint_footprint_bytes``) with ``FSX_ROOM_BESIDE_CHECKPOINTS``
        for its dataset, logs and traces."""
        if self.settings.fsx_storage_capacity_gib is not None:
            return self.settings.fsx_storage_capacity_gib
        params, recipe = TrainParams.model_validate(spec["params"]), Recipe.model_validate(spec["recipe"])
        return fsx_storage_gib_for(checkpoint_footprint_bytes(params, recipe) * FSX_ROOM_BESIDE_CHECKPOINTS)

    def default_image(self) -> dict[str, str]:
        """With no published DTP image, the NGC PyTorch image the training image builds on, run with pyxis; the
        task copies the training programs to the run's directory on FSx, which the container mounts."""
        return {
            "source": "NGC PyTorch (no DTP image published)",
            "image": ngc_pytorch_image(registry_separator="#"),
            "container_runtime": "pyxis",
            "python": "python3",
        }

    def runtime(self, image: str, spec: dict[str, Any]) -> dict[str, str]:
        return pyxis_runtime(image)

    # --- documents -----------------------------------------------------------------
    def cluster_name(self, spec: dict[str, Any]) -> str:
        """The run key: it starts with a letter and has at most 39 characters of [a-z0-9-], as pcluster requires
        (at most 60, or 40 with Slurm accounting)."""
        name: str = spec["names"]["run_key"]
        return name

    def render(self, spec: dict[str, Any], network: dict[str, str], ami: str | None = None) -> dict[str, str]:
        """The cluster configuration; ``ami`` (the runtime's published AMI) is used unless settings name one.
        Refused (``PlatformNotReady``) where the settings may not create a cluster
        (``ParallelClusterSettings.creation_problems``)."""
        settings = self.settings.for_creation(self.conn_id)
        instance_type = spec["params"]["instance_type"]
        text = render(
            "parallelcluster/cluster-config.yaml.j2",
            region=self.cli.region,
            os=settings.os,
            custom_ami=settings.custom_ami or ami or "",
            head_node_instance_type=settings.head_node_instance_type,
            key_name=settings.key_name,
            ssh_allowed_ips=str(ipaddress.ip_network(settings.ssh_allowed_ips)),  # an address as its /32
            network=network,
            capacity_reservation_id=settings.capacity_reservation_id,
            capacity_type=settings.capacity_type,
            compute_resource=instance_type.replace(".", "-"),
            instance_type=instance_type,
            num_nodes=spec["params"]["num_nodes"],
            efa=instance_types()[instance_type].efa_interfaces > 0,
            fsx_file_system_id=settings.fsx_file_system_id,
            fsx_storage_capacity_gib=self.fsx_storage_capacity_gib(spec),
            fsx_throughput_per_tib=settings.fsx_throughput_per_tib,
            log_retention_days=CLUSTER_LOG_RETENTION_DAYS,
            tags=spec["tags"],
        )
        return {CONFIG_DOCUMENT: text}

    def check(self, documents: dict[str, str], cluster_name: str = "dtp-check") -> list[str]:
        """Problems aws-parallelcluster's schema (plus its offline validators) finds in the configuration."""
        python = PCLUSTER_VENV / "bin" / "python"
        if not python.exists():
            raise PlatformNotReady(f"{PCLUSTER_VENV} (aws-parallelcluster) is missing: {WHERE_PCLUSTER_IS}")
        proc = subprocess.run(
            [str(python), str(VALIDATE_SCRIPT), "--cluster-name", cluster_name],
            input=documents[CONFIG_DOCUMENT],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{VALIDATE_SCRIPT.name} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        problems: list[str] = json.loads(proc.stdout)
        return [f"{CONFIG_DOCUMENT}: {p}" for p in problems]

    # --- lifecycle -------------------------------------------------------------------
    def cluster_status(self, name: str) -> str | None:
        """The cluster's status (CREATE_IN_PROGRESS, CREATE_COMPLETE, ...); None when it does not exist."""
        described = self.cli.describe_cluster(name)
        return None if described is None else str(described["clusterStatus"])

    def provision(self, spec: dict[str, Any], network: dict[str, str], ami: str | None = None) -> dict[str, Any]:
        """Create the cluster (or find it again); ``ready_trigger`` waits for it to be created."""
        name = self.cluster_name(spec)
        documents = self.render(spec, network, ami)
        if problems := self.check(documents, name):
            raise PlatformNotReady(f"cluster configuration of {name} is invalid:\n" + "\n".join(problems))
        existing = self.cli.describe_cluster(name)
        if existing is None:
            self.check_reservation(spec)
            if file_system := self.settings.fsx_file_system_id:
                log.info("Creating ParallelCluster cluster %s, which mounts %s", name, file_system)
            else:
                size = self.fsx_storage_capacity_gib(spec)
                log.info("Creating ParallelCluster cluster %s with an FSx for Lustre of %d GiB", name, size)
            self.cli.create_cluster(name, documents[CONFIG_DOCUMENT])
            created_at = time.time()
        elif existing["clusterStatus"] == "CREATE_FAILED":
            # Retrying would find it failed again; the run's teardown deletes it, and the next run creates anew.
            raise PlatformNotReady(f"cluster {name} exists and is CREATE_FAILED: {failures(existing)}")
        else:
            log.info("Reusing ParallelCluster cluster %s (%s)", name, existing["clusterStatus"])
            created_at = datetime.fromisoformat(existing["creationTime"]).timestamp()
        return {
            "platform": self.name,
            "cluster_name": name,
            # The wait for the cluster counts from here, so a retry after a timed-out wait does not wait as long again.
            "created_at": created_at,
            "slurm_conn_id": self.settings.slurm_conn_id,
            "shared_dir": FSX_MOUNT,
            "nodes": spec["params"]["num_nodes"],
            "scheduler": self.scheduler,
            # An existing file system outlives the cluster; save_checkpoint has it export the run's checkpoint.
            **({"fsx_file_system_id": self.settings.fsx_file_system_id} if self.settings.fsx_file_system_id else {}),
        }

    def check_reservation(self, spec: dict[str, Any]) -> None:
        """Refuse to create the run's cluster where the settings' ``capacity_reservation_id`` cannot take its nodes
        now or ever (``dtp.platforms.capacity_reservations.check_reservation``)."""
        if reservation_id := self.settings.capacity_reservation_id:
            ec2 = EC2Hook(aws_conn_id=self.aws_conn_id, api_type="client_type").conn
            field = f"connection {self.conn_id!r} extra: capacity_reservation_id"
            capacity_reservations.check_reservation(ec2, reservation_id, field, spec)

    def ready_trigger(self, cluster: dict[str, Any]) -> ParallelClusterCreateTrigger:
        """Wait in the triggerer until ``create-cluster`` is done, at most an hour after the cluster was created; the
        event adds the head node's address."""
        return ParallelClusterCreateTrigger(cluster["cluster_name"], started_at=cluster["created_at"])

    def head_node_host_keys(self, cluster: dict[str, Any]) -> list[str]:
        """The host keys of the ready ``cluster``'s head node (``host_keys.head_node_host_keys``), its instance as
        describe-cluster names it."""
        described = self.cli.describe_cluster(cluster["cluster_name"]) or {}
        return self._host_keys(described, reads=HOST_KEY_READS)

    def _host_keys(self, described: dict[str, Any], reads: int = 1) -> list[str]:
        instance_id = (described.get("headNode") or {}).get("instanceId")
        return host_keys.head_node_host_keys(
            instance_id,
            head_node_address(described),
            self.settings.slurm_conn_id,
            self.aws_conn_id,
            reads=reads,
            interval_s=HOST_KEY_READ_INTERVAL_S,
        )

    def stop_jobs(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Cancel the run's Slurm jobs on the head node (none while the cluster is not up)."""
        name = self.cluster_name(spec)
        described = self.cli.describe_cluster(name)
        if described is None or described["clusterStatus"] not in READY_STATES:
            return {"cluster_name": name, "cancelled_jobs": []}
        return {"cluster_name": name, "cancelled_jobs": self._cancel_jobs(spec, described)}

    def start_teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Cancel the run's Slurm jobs (where the head node is up) and ``pcluster delete-cluster``; a cluster already
        DELETE_IN_PROGRESS (a retried teardown's) is left to it."""
        name = self.cluster_name(spec)
        described = self.cli.describe_cluster(name)
        if described is None:
            return {"cluster_name": name, "cancelled_jobs": [], "deleted": False}
        status = described["clusterStatus"]
        cancelled = stop_before_delete(lambda: self._cancel_jobs(spec, described)) if status in READY_STATES else []
        if status == "DELETE_IN_PROGRESS":
            log.info("ParallelCluster cluster %s is already DELETE_IN_PROGRESS; not deleting it again", name)
            deleted = True
        else:
            deleted = self.cli.delete_cluster(name)
        return {"cluster_name": name, "cancelled_jobs": cancelled, "deleted": deleted}

    def deleted_trigger(self, specs: list[dict[str, Any]]) -> ParallelClusterDeleteTrigger:
        """Wait in the triggerer until the runs' clusters are gone (FSx made with them included), at most an hour."""
        return ParallelClusterDeleteTrigger([self.cluster_name(spec) for spec in specs], timeout=DELETE_TIMEOUT_S)

    def teardown(self, spec: dict[str, Any], timeout: float = DELETE_TIMEOUT_S, poll: float = 30) -> dict[str, Any]:
        """``start_teardown``, then wait until the cluster is gone."""
        done = self.start_teardown(spec)
        name = done["cluster_name"]
        deadline = time.monotonic() + timeout
        while (status := self.cluster_status(name)) is not None:
            if status == "DELETE_FAILED" or time.monotonic() > deadline:
                raise RuntimeError(f"cluster {name} is still there ({status}) after delete-cluster")
            time.sleep(poll)
        return done

    def _cancel_jobs(self, spec: dict[str, Any], described: dict[str, Any]) -> list[str]:
        from dtp.hooks.slurm import SlurmHook

        hook = SlurmHook(self.settings.slurm_conn_id, head_node_address(described), self._host_keys(described))
        return hook.cancel_and_wait(spec["names"]["slurm_job"], prefix=True)


def head_node_address(described: dict[str, Any]) -> str:
    """Where the Slurm connection's ssh reaches a described cluster's head node: its public address, else its
    private one (a worker in the cluster's VPC); empty when it has neither."""
    head = described.get("headNode") or {}
    return str(head.get("publicIpAddress") or head.get("privateIpAddress") or "")


def deletion_failures(cluster_name: str, aws_conn_id: str) -> str:
    """Why a DELETE_FAILED cluster was not deleted: pcluster reports failures of a cluster's creation only, so the
    failed resources of its root stack (named after the cluster), read from CloudFormation."""
    return StackHook(aws_conn_id=aws_conn_id).failure_reasons(cluster_name)


def failures(described: dict[str, Any]) -> str:
    """pcluster's failure codes and reasons for a cluster, or when it gives none its description less its
    ``clusterConfiguration``: a presigned S3 URL, which carries a session token."""
    failures = described.get("failures") or []
    status = {key: value for key, value in described.items() if key != "clusterConfiguration"}
    return "; ".join(f"{f.get('failureCode')}: {f.get('failureReason')}" for f in failures) or json.dumps(status)
