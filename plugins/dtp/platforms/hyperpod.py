"""SageMaker HyperPod: one cluster per run, jobs through its controller's Slurm or as PyTorchJobs on EKS.

``provision`` uploads the lifecycle scripts (the reference base-config, DTP's
``on_create.sh`` and the run's ``provisioning_parameters.json``) under the
run's prefix of the lifecycle bucket and calls ``CreateCluster`` with a
controller group and a compute group; the task then waits in the triggerer
until the cluster is InService. ``teardown`` cancels the run's Slurm jobs,
starts deleting the cluster, deletes the run's lifecycle objects, has the
cluster's log group expire (``dtp.platforms.hyperpod_logs``) and waits until the
cluster is gone (``teardown_cluster`` waits in the triggerer).
Jobs reach the controller through the Slurm connection the
``dtp_hyperpod`` connection names: on AWS its ssh goes to the run's controller,
``sagemaker-cluster:<cluster id>_controller-machine-<instance id>``, through
the ProxyCommand (SSM) the worker's ``~/.ssh/config`` gives such names; on the
local profile, the stack's Slurm cluster stands in for the controller's.

With ``eks`` in the connection, the cluster's orchestrator is that EKS cluster instead: the compute group's
nodes join it, labelled with the run, and the run's jobs are PyTorchJobs pinned to them (``dtp.platforms.eks``
renders them); there is no controller group, and the base-config is the reference's EKS lifecycle scripts. The
nodes must reach the EKS cluster's control plane from its VPC, so such a run needs the ``dtp_network`` connection
naming that VPC's subnets and a security group the cluster accepts; it is refused before anything exists without.
"""

from __future__ import annotations

import json
import logging
import re
from functools import cached_property
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.exceptions import ClientError

from dtp.connections import AWS_CONN_ID
from dtp.hooks.hyperpod import HyperPodHook
from dtp.hooks.pytorchjob import PyTorchJobHook
from dtp.hooks.slurm import SlurmHook
from dtp.naming import OWNER, TAG_PREFIX, aws_tags
from dtp.pipeline.network import NETWORK_CONN_ID
from dtp.pipeline.results import owned_bucket_exists
from dtp.platforms.base import PlatformNotReady, Scheduler, stop_before_delete
from dtp.platforms.capacity import Placement, instance_fields, is_capacity_error, is_capacity_failure, placements
from dtp.platforms.containers import FSX_MOUNT, image_runtime
from dtp.platforms.eks import LABEL_DOMAIN, default_pod_runtime, delete_pytorchjobs, render_pytorchjobs
from dtp.platforms.hyperpod_lifecycle import delete_lifecycle_objects, lifecycle_prefix
from dtp.platforms.hyperpod_logs import expire_cluster_logs
from dtp.platforms.hyperpod_settings import HyperPodEksSettings, HyperPodSettings
from dtp.platforms.pyxis import pyxis_runtime
from dtp.platforms.service_models import request_problems
from dtp.recipes import INCLUDE_DIR
from dtp.triggers.hyperpod import HyperPodClusterDeleteTrigger, HyperPodClusterTrigger

log = logging.getLogger(__name__)
CONTROLLER_GROUP = "controller-machine"
COMPUTE_GROUP = "compute-nodes"
ON_CREATE = INCLUDE_DIR / "hyperpod" / "on_create.sh"
# The Kubernetes label of a run's nodes on HyperPod on EKS (the compute group's KubernetesConfig).
RUN_LABEL = f"{LABEL_DOMAIN}/run"
# ClusterStatus values of a cluster whose nodes may run the run's jobs.
JOB_STATES = frozenset({"InService", "Updating", "SystemUpdating"})
FSX_DNS_NAME = re.compile(r"^(?P<file_system_id>fs-[0-9a-f]{17})\.fsx\.")


class HyperPodPlatform:
    """SageMaker HyperPod (Slurm or EKS orchestrator) in the account of the ``aws_default`` connection."""

    name = "hyperpod"

    def __init__(self, conn_id: str = "dtp_hyperpod", aws_conn_id: str = AWS_CONN_ID) -> None:
        self.conn_id = conn_id
        self.aws_conn_id = aws_conn_id

    @property
    def settings(self) -> HyperPodSettings:
        return HyperPodSettings.from_connection(self.conn_id)

    @property
    def scheduler(self) -> Scheduler:
        return "kubernetes" if self.settings.eks else "slurm"

    def max_nodes(self) -> int:
        return self.settings.max_nodes

    def existing_file_system(self) -> str:
        return self.settings.fsx_dns_name

    def ami_family(self, instance: dict[str, Any]) -> None:
        return None  # HyperPod nodes boot SageMaker's own HyperPod AMI

    def default_image(self) -> dict[str, str]:
        if self.settings.eks:
            return default_pod_runtime()
        # The task copies the training programs to the run's directory on the shared filesystem (dtp.pipeline.jobs).
        return {"source": "the nodes' python", "python": self.settings.python}

    def runtime(self, image: str, spec: dict[str, Any]) -> dict[str, str]:
        if self.settings.eks:
            return image_runtime(image)
        # The reference base-config installs enroot + pyxis on every node.
        return pyxis_runtime(image)

    def pytorchjobs(self, spec: dict[str, Any], runtime: dict[str, str]) -> dict[str, str]:
        """The run's PyTorchJobs (HyperPod on EKS), on the healthy nodes of the run's compute group."""
        return render_pytorchjobs(spec, runtime, self._eks(), _run_nodes(spec))

    @cached_property
    def jobs(self) -> PyTorchJobHook:
        """The hook of the run's PyTorchJobs (HyperPod on EKS): the EKS cluster and namespace of the settings."""
        eks = self._eks()
        return PyTorchJobHook(eks.cluster_name, eks.namespace, self.aws_conn_id)

    def _eks(self) -> HyperPodEksSettings:
        if self.settings.eks is None:
            raise PlatformNotReady(f"connection {self.conn_id!r} has no eks: the cluster's orchestrator is Slurm")
        return self.settings.eks

    # --- documents ------------------------------------------------------------------------------------------------
    def lifecycle_uri(self, spec: dict[str, Any]) -> str:
        return f"s3://{self.settings.lifecycle_bucket}/{lifecycle_prefix(spec['names']['run_key'])}"

    def render(
        self, spec: dict[str, Any], network: dict[str, str], placement: Placement | None = None
    ) -> dict[str, str]:
        """The CreateCluster request and provisioning parameters; ``placement`` overrides the run's first one.

        Refused (``PlatformNotReady``) where the settings may not create a cluster
        (``HyperPodSettings.creation_problems``), and on EKS unless the run's network is the existing one
        ``dtp_network`` names: a VPC made for the run could not reach the EKS cluster's control plane."""
        settings = self.settings.for_creation(self.conn_id)
        if settings.eks and not spec.get("existing_network"):
            raise PlatformNotReady(
                f"HyperPod on EKS ({self.conn_id}'s eks): the nodes join EKS cluster {settings.eks.cluster_name} "
                "and must reach its control plane from its VPC, while each run makes a VPC of its own: define the "
                f"{NETWORK_CONN_ID!r} connection with that VPC's private subnets and a security group the EKS "
                "cluster accepts (see the README's Going to a real AWS account)"
            )
        placement = placement or Placement(spec["params"]["instance_type"], network["PrivateSubnet"])
        instance_type = placement.instance_type
        lifecycle = {"SourceS3Uri": self.lifecycle_uri(spec), "OnCreate": ON_CREATE.name}
        group = {"LifeCycleConfig": lifecycle, "ExecutionRole": settings.execution_role_arn}
        compute_placement: dict[str, Any] = {}
        if placement.subnet != network["PrivateSubnet"]:
            compute_placement["OverrideVpcConfig"] = {
                "SecurityGroupIds": [network["SecurityGroup"]],
                "Subnets": [placement.subnet],
            }
        if placement.reservation:
            compute_placement["TrainingPlanArn"] = placement.reservation
        compute = {
            "InstanceGroupName": COMPUTE_GROUP,
            "InstanceType": f"ml.{instance_type}",
            "InstanceCount": spec["params"]["num_nodes"],
            # One thread per core: the reference's setting for GPU and Trainium training nodes.
            "ThreadsPerCore": 1,
            **group,
            **compute_placement,
        }
        controller = {
            "InstanceGroupName": CONTROLLER_GROUP,
            "InstanceType": settings.controller_instance_type,
            "InstanceCount": 1,
            "ThreadsPerCore": 2,
            **group,
        }
        request: dict[str, Any] = {
            "ClusterName": spec["names"]["run_key"],
            "InstanceGroups": [controller, compute],
            "VpcConfig": {"SecurityGroupIds": [network["SecurityGroup"]], "Subnets": [network["PrivateSubnet"]]},
            "Tags": aws_tags(spec["tags"]),
        }
        if settings.eks:
            # The nodes join the EKS cluster labelled with the run; the run's PyTorchJobs select them by it.
            compute["KubernetesConfig"] = {"Labels": {RUN_LABEL: spec["names"]["run_key"]}}
            request |= {
                "InstanceGroups": [compute],
                "Orchestrator": {"Eks": {"ClusterArn": settings.eks.cluster_arn}},
                "NodeRecovery": "Automatic",
            }
            return {"cluster-config.json": json.dumps(request, indent=2)}
        provisioning = {
            "version": "1.0.0",
            "workload_manager": "slurm",
            "controller_group": CONTROLLER_GROUP,
            "worker_groups": [{"instance_group_name": COMPUTE_GROUP, "partition_name": instance_type}],
        }
        if settings.fsx_dns_name:
            provisioning |= {"fsx_dns_name": settings.fsx_dns_name, "fsx_mountname": settings.fsx_mount_name}
        return {
            "cluster-config.json": json.dumps(request, indent=2),
            "provisioning_parameters.json": json.dumps(provisioning, indent=2),
        }

    def check(self, documents: dict[str, str]) -> list[str]:
        request = json.loads(documents["cluster-config.json"])
        problems = request_problems("sagemaker", "CreateCluster", request)
        if "provisioning_parameters.json" not in documents:  # EKS: the reference's own lifecycle scripts
            return problems
        provisioning = json.loads(documents["provisioning_parameters.json"])
        groups = {g["InstanceGroupName"] for g in request.get("InstanceGroups", [])}
        named = [provisioning.get("controller_group")] + [
            w.get("instance_group_name") for w in provisioning.get("worker_groups", [])
        ]
        problems += [
            f"provisioning_parameters.json: instance group {name!r} is not in the cluster's groups ({sorted(groups)})"
            for name in named
            if name not in groups
        ]
        if bool(provisioning.get("fsx_dns_name")) != bool(provisioning.get("fsx_mountname")):
            problems.append("provisioning_parameters.json: fsx_dns_name and fsx_mountname go together")
        return problems

    # --- lifecycle --------------------------------------------------------------------------------------------------
    def provision(self, spec: dict[str, Any], network: dict[str, str], ami: str | None = None) -> dict[str, Any]:
        """Create the run's cluster (or find it again), falling back to the next placement (reserved capacity,
        zone, then the recipe's next instance type) when CreateCluster has no capacity, or when an earlier
        try's cluster failed for capacity."""
        settings = self.settings  # a platform that is not set up fails here, before any AWS call
        hook = HyperPodHook(aws_conn_id=self.aws_conn_id)
        name = spec["names"]["run_key"]
        every = placements(spec, self.name, network, settings.training_plans)
        options = every
        existing = hook.describe_cluster(name)
        if existing is not None and existing["ClusterStatus"] != "Failed":
            log.info("HyperPod cluster %s exists (%s); not creating it again", name, existing["ClusterStatus"])
            return self._record(spec, existing, placement_of(existing))
        if existing is not None:
            options = options_after_failure(existing, options)
            log.warning("HyperPod cluster %s failed for capacity (%s); deleting it", name, existing["FailureMessage"])
            hook.delete_cluster_and_wait(name)
            expire_cluster_logs(existing, self.aws_conn_id)
        for placement in options:
            documents = self.render(spec, network, placement)
            if problems := self.check(documents):
                raise PlatformNotReady("the HyperPod cluster request is invalid:\n" + "\n".join(problems))
            self._upload_lifecycle(spec, settings, documents.get("provisioning_parameters.json"))
            try:
                cluster = hook.ensure_cluster(json.loads(documents["cluster-config.json"]))
            except ClientError as err:
                if not is_capacity_error(err):
                    raise
                log.warning("No capacity for %d x %s: %s", spec["params"]["num_nodes"], placement, err)
                continue
            if placement != options[0] or existing is not None:
                log.warning("Capacity fallback: cluster %s asks for %s", name, placement)
            return self._record(spec, cluster, placement)
        tried = "; ".join(str(p) for p in every)
        raise RuntimeError(
            f"no capacity for {spec['params']['num_nodes']} nodes in any placement: {tried} (the run's instance "
            "type, then the recipe's fallback_instance_types, each reserved then on demand, in each zone's "
            "subnet); a retry tries again"
        )

    def _record(self, spec: dict[str, Any], cluster: dict[str, Any], placement: Placement) -> dict[str, Any]:
        settings = self.settings
        if settings.eks:
            jobs = {"eks_cluster_name": settings.eks.cluster_name, "namespace": settings.eks.namespace,
                    "shared_dir": FSX_MOUNT}  # fmt: skip
        else:
            jobs = {"slurm_conn_id": settings.slurm_conn_id, "shared_dir": SlurmHook(settings.slurm_conn_id).shared_dir}
            # The lifecycle scripts mount fsx_dns_name's file system (fs-<id>.fsx.<region>.amazonaws.com) at /fsx:
            # when that is the shared directory, save_checkpoint can have FSx export the run's checkpoint.
            if (match := FSX_DNS_NAME.match(settings.fsx_dns_name)) and jobs["shared_dir"] == FSX_MOUNT:
                jobs["fsx_file_system_id"] = match["file_system_id"]
        return {
            "platform": self.name,
            "cluster_name": cluster["ClusterName"],
            "cluster_arn": cluster["ClusterArn"],
            # The wait for InService counts from here, so a retry after a timed-out wait does not wait as long again.
            "created_at": cluster["CreationTime"].timestamp(),
            **jobs,
            "nodes": spec["params"]["num_nodes"],
            "scheduler": self.scheduler,
            "placement": str(placement),
            **instance_fields(placement.instance_type),
        }

    def ready_trigger(self, cluster: dict[str, Any]) -> HyperPodClusterTrigger | None:
        """Wait in the triggerer until the cluster is InService (minutes to hours on AWS), at most
        ``create_timeout_minutes`` after the cluster was created."""
        timeout = self.settings.create_timeout_minutes * 60
        return HyperPodClusterTrigger(
            cluster["cluster_name"],
            aws_conn_id=self.aws_conn_id,
            timeout=timeout,
            started_at=cluster["created_at"],
            controller_group=CONTROLLER_GROUP if self._controller_over_ssh() else None,
        )

    def _controller_over_ssh(self) -> bool:
        """Whether the run's jobs reach its controller over ssh, at an address only the cluster knows."""
        settings = self.settings
        return settings.eks is None and SlurmHook(settings.slurm_conn_id).transport == "ssh"

    def stop_jobs(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Cancel the run's Slurm jobs, or delete its PyTorchJobs (EKS); none while the cluster is not up (never
        created, failed, or being created or deleted: no job of the run runs on it)."""
        described = HyperPodHook(aws_conn_id=self.aws_conn_id).describe_cluster(spec["names"]["run_key"])
        if described is None or described["ClusterStatus"] not in JOB_STATES:
            return {"cancelled_jobs": []}
        return {"cancelled_jobs": self._stop_jobs(spec, described)}

    def _stop_jobs(self, spec: dict[str, Any], described: dict[str, Any]) -> list[str]:
        if self.settings.eks:
            return delete_pytorchjobs(self.jobs, spec, timeout=600)
        controller = None
        if self._controller_over_ssh():  # to the run's controller, which only the run's cluster names
            controller = HyperPodHook(aws_conn_id=self.aws_conn_id).node_target(described, CONTROLLER_GROUP)
            if controller is None:
                raise RuntimeError(f"HyperPod cluster {described['ClusterName']} has no {CONTROLLER_GROUP} node")
        hook = SlurmHook(self.settings.slurm_conn_id, controller)
        return hook.cancel_and_wait(spec["names"]["slurm_job"], prefix=True)

    def _upload_lifecycle(self, spec: dict[str, Any], settings: HyperPodSettings, provisioning: str | None) -> None:
        """Copy the base-config, then DTP's on_create.sh and the run's parameters (Slurm; on EKS the base-config's
        own on_create.sh runs), under the run's prefix."""
        s3 = S3Hook(aws_conn_id=self.aws_conn_id)
        bucket = settings.lifecycle_bucket
        try:  # the nodes run its scripts as root: never another account's bucket
            exists = owned_bucket_exists(s3, bucket, s3.account_id)
        except PermissionError as err:
            raise PlatformNotReady(f"connection {self.conn_id!r} extra: lifecycle_bucket: {err}") from None
        if not exists:  # shared by every run: DTP's, with no expiry
            s3.create_bucket(bucket)
            s3.put_bucket_tagging(tag_set={f"{TAG_PREFIX}owner": OWNER, f"{TAG_PREFIX}role": "hyperpod-lifecycle"},
                                  bucket_name=bucket)  # fmt: skip
        prefix = lifecycle_prefix(spec["names"]["run_key"])
        if settings.base_config_uri:
            source_bucket, source_prefix = S3Hook.parse_s3_url(settings.base_config_uri)
            for key in s3.list_keys(source_bucket, prefix=source_prefix) or []:
                relative = key[len(source_prefix) :].lstrip("/")
                s3.copy_object(key, prefix + relative, source_bucket, bucket)
        else:
            log.warning("dtp_hyperpod has no base_config_uri: the nodes' on_create.sh will find no lifecycle_script.py")
        if provisioning is not None:
            s3.load_file(str(ON_CREATE), prefix + ON_CREATE.name, bucket, replace=True)
            s3.load_string(provisioning, prefix + "provisioning_parameters.json", bucket, replace=True)

    def start_teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Cancel the run's jobs, start deleting its cluster (one already Deleting is left to it), delete the
        run's lifecycle objects (the nodes read them only when they are created) and have the cluster's log group
        expire (``expire_cluster_logs``)."""
        settings = self.settings
        name = spec["names"]["run_key"]
        hook = HyperPodHook(aws_conn_id=self.aws_conn_id)
        cancelled: list[str] = []
        if (described := hook.describe_cluster(name)) is not None:
            cancelled = stop_before_delete(lambda: self._stop_jobs(spec, described))
        deleted = hook.delete_cluster(name)
        objects = delete_lifecycle_objects(S3Hook(aws_conn_id=self.aws_conn_id), settings.lifecycle_bucket, name)
        if described is not None:  # the id naming its log group is in the description
            expire_cluster_logs(described, self.aws_conn_id)
        return {"cancelled_jobs": cancelled, "deleted_cluster": deleted, "deleted_lifecycle_objects": objects}

    def deleted_trigger(self, specs: list[dict[str, Any]]) -> HyperPodClusterDeleteTrigger:
        """Wait in the triggerer until the runs' clusters are gone, at most 30 minutes."""
        names = [spec["names"]["run_key"] for spec in specs]
        return HyperPodClusterDeleteTrigger(names, aws_conn_id=self.aws_conn_id)

    def teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``start_teardown``, then wait until the cluster is gone."""
        done = self.start_teardown(spec)
        HyperPodHook(aws_conn_id=self.aws_conn_id).wait_until_deleted(spec["names"]["run_key"])
        return done


def _run_nodes(spec: dict[str, Any]) -> dict[str, str]:
    """The node selector of the run's PyTorchJobs on HyperPod: its compute group's nodes, while healthy."""
    return {RUN_LABEL: spec["names"]["run_key"], "sagemaker.amazonaws.com/node-health-status": "Schedulable"}


def options_after_failure(cluster: dict[str, Any], options: list[Placement]) -> list[Placement]:
    """The placements left to try after ``cluster`` failed: those after its own, if it failed for capacity."""
    failed, message = placement_of(cluster), cluster.get("FailureMessage", "")
    if not is_capacity_failure(message) or failed not in options:
        raise RuntimeError(f"HyperPod cluster {cluster['ClusterName']} failed: {message or 'no failure message'}")
    return options[options.index(failed) + 1 :]


def placement_of(cluster: dict[str, Any]) -> Placement:
    """Where a described cluster's compute group was asked for (EC2 type, without SageMaker's ``ml.`` prefix)."""
    group = next(g for g in cluster["InstanceGroups"] if g["InstanceGroupName"] == COMPUTE_GROUP)
    subnets = (group.get("OverrideVpcConfig") or cluster["VpcConfig"])["Subnets"]
    return Placement(str(group["InstanceType"]).removeprefix("ml."), subnets[0], group.get("TrainingPlanArn", ""))
