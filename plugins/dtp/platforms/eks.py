"""Amazon EKS: a run's preflight and training are Kubeflow PyTorchJobs on an existing cluster's GPU or Trainium nodes.

EKS clusters are long-lived in DTP: ``provision`` finds the ``dtp_eks`` connection's cluster and checks it is
ACTIVE, and ``teardown`` deletes the run's PyTorchJobs (the training operator deletes their pods), never the
cluster. The jobs (include/templates/eks/pytorchjob.yaml.j2) follow the reference repo's FSDP PyTorchJob: one pod
per node running torchrun with one process per accelerator, the node's EFA devices, the FSx for Lustre claim at
/fsx. ``check`` finds what the API server or the training operator would refuse in them
(``dtp.platforms.pytorchjob_manifest``). HyperPod on EKS (``dtp.platforms.hyperpod``) renders its jobs with the
same ``render_pytorchjobs``.
The Kubernetes API is reached with a kubeconfig the amazon provider generates from ``aws_default`` (as
``EksPodOperator`` does), so no Kubernetes connection is needed.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any, Literal

from airflow.providers.amazon.aws.hooks.eks import EksHook
from botocore.exceptions import ClientError
from pydantic import Field

from dtp.connections import AWS_CONN_ID
from dtp.hooks.pytorchjob import PyTorchJobHook
from dtp.naming import TAG_PREFIX
from dtp.pipeline.run_dirs import run_dir
from dtp.platforms.base import PREFLIGHT_DEADLINE_S, PlatformNotReady, PlatformSettings
from dtp.platforms.containers import (
    FSX_MOUNT,
    image_runtime,
    is_nvidia,
    is_trainium,
    ngc_pytorch_image,
    require_dtp_trainer,
    trainer_environment,
)
from dtp.platforms.pytorchjob_manifest import DNS_1123_LABEL, DNS_1123_SUBDOMAIN, manifest_problems
from dtp.templates import render

CONN_ID = "dtp_eks"
# Pod restarts before the job fails: the Slurm job's fresh launches after the first (dtp.pipeline.jobs).
MAX_RESTARTS = 3
LABEL_DOMAIN = "dtp.dev"
# Extended resources of the NVIDIA, Neuron and EFA device plugins.
GPU, NEURON, EFA = "nvidia.com/gpu", "aws.amazon.com/neuron", "vpc.amazonaws.com/efa"
EKS_CLUSTER_NAME = r"^[0-9A-Za-z][A-Za-z0-9_-]{0,99}$"
# The pods' schedulerName for each gang_scheduler: Volcano's, and that of scheduler-plugins installed as a second
# scheduler (its Helm chart's), which the training operator's --gang-scheduler-name=scheduler-plugins leaves as set.
GANG_SCHEDULER_NAMES = {"volcano": "volcano", "scheduler-plugins": "scheduler-plugins-scheduler"}


class PyTorchJobSettings(PlatformSettings):
    """where the run's PyTorchJobs go on an EKS cluster: namespace, fsx_claim, image_pull_policy"""

    # The namespace of the training operator's jobs, which holds the FSx claim.
    namespace: str = Field("kubeflow", pattern=rf"^{DNS_1123_LABEL}$")
    # A PersistentVolumeClaim bound to FSx for Lustre (the FSx CSI driver), mounted at /fsx.
    fsx_claim: str = Field("fsx-claim", max_length=253, pattern=rf"^{DNS_1123_SUBDOMAIN}$")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class EksSettings(PyTorchJobSettings):
    """the account's EKS settings: cluster_name and optional namespace, fsx_claim, image_pull_policy, max_nodes"""

    cluster_name: str = Field(pattern=EKS_CLUSTER_NAME)
    max_nodes: int = Field(64, ge=1)


class EksPlatform:
    """Kubeflow PyTorchJobs on the EKS cluster of the ``dtp_eks`` connection, in the ``aws_default`` account."""

    name = "eks"
    scheduler = "kubernetes"

    def __init__(self, conn_id: str = CONN_ID, aws_conn_id: str = AWS_CONN_ID, delete_timeout: float = 600) -> None:
        self.conn_id = conn_id
        self.aws_conn_id = aws_conn_id
        self.delete_timeout = delete_timeout
        self.eks_hook = EksHook(aws_conn_id=aws_conn_id)

    @property
    def settings(self) -> EksSettings:
        return EksSettings.from_connection(self.conn_id)

    def max_nodes(self) -> int:
        return self.settings.max_nodes

    def existing_file_system(self) -> str:
        return ""  # the cluster's FSx claim, in the cluster's own VPC: the run makes no network

    def ami_family(self, instance: dict[str, Any]) -> str | None:
        # The cluster's GPU node groups boot DTP's EKS GPU AMI when one is published; DTP bakes none for the others.
        return "eks-gpu" if is_nvidia(instance) else None

    def default_image(self) -> dict[str, str]:
        return default_pod_runtime()

    def runtime(self, image: str, spec: dict[str, Any]) -> dict[str, str]:
        return image_runtime(image)

    # --- documents ------------------------------------------------------------------------------------------------
    def render(
        self, spec: dict[str, Any], network: dict[str, str], runtime: dict[str, str] | None = None
    ) -> dict[str, str]:
        """The run's PyTorchJobs (``render_pytorchjobs``) on the nodes of the run's instance type, running
        ``runtime``'s image (default: ``default_image()``); EKS needs no network, the cluster has its own VPC."""
        return self.pytorchjobs(spec, runtime or self.default_image())

    def pytorchjobs(self, spec: dict[str, Any], runtime: dict[str, str]) -> dict[str, str]:
        node_selector = {"node.kubernetes.io/instance-type": spec["params"]["instance_type"]}
        return render_pytorchjobs(spec, runtime, self.settings, node_selector)

    def check(self, documents: dict[str, str]) -> list[str]:
        return [f"{name}: {problem}" for name, text in sorted(documents.items()) for problem in manifest_problems(text)]

    # --- lifecycle --------------------------------------------------------------------------------------------------
    def provision(self, spec: dict[str, Any], network: dict[str, str], ami: str | None = None) -> dict[str, Any]:
        """Find the connection's cluster, which must be ACTIVE; its node groups boot what they were made with."""
        settings = self.settings
        cluster = self._describe_cluster(settings.cluster_name)
        if cluster["status"] != "ACTIVE":
            raise PlatformNotReady(
                f"EKS cluster {settings.cluster_name!r} (connection {self.conn_id!r}, cluster_name) is "
                f"{cluster['status']}, not ACTIVE"
            )
        return {
            "platform": self.name,
            "cluster_name": settings.cluster_name,
            "endpoint": cluster["endpoint"],
            "namespace": settings.namespace,
            "scheduler": self.scheduler,
            "eks_cluster_name": settings.cluster_name,
            "shared_dir": FSX_MOUNT,
            "job_name": spec["names"]["run_key"],
        }

    def ready_trigger(self, cluster: dict[str, Any]) -> None:
        return None  # the cluster exists before the run and provision checked it is ACTIVE

    def teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Stop the run's jobs: the EKS cluster is the connection's, and outlives runs."""
        return self.stop_jobs(spec)

    def stop_jobs(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Delete the run's PyTorchJobs (either may be gone already) and wait until they and their pods are gone."""
        return {
            "deleted_jobs": delete_pytorchjobs(self.jobs, spec, self.delete_timeout),
            "namespace": self.jobs.namespace,
        }

    @cached_property
    def jobs(self) -> PyTorchJobHook:
        """The hook of the run's PyTorchJobs: the connection's cluster and namespace, ``aws_default``'s identity."""
        settings = self.settings
        return PyTorchJobHook(settings.cluster_name, settings.namespace, self.aws_conn_id)

    def _describe_cluster(self, cluster_name: str) -> dict[str, Any]:
        try:
            cluster: dict[str, Any] = self.eks_hook.conn.describe_cluster(name=cluster_name)["cluster"]
        except ClientError as err:
            if err.response["Error"]["Code"] != "ResourceNotFoundException":
                raise
            raise PlatformNotReady(
                f"EKS cluster {cluster_name!r} (connection {self.conn_id!r}, cluster_name) does not exist in the "
                f"{self.aws_conn_id!r} account's region {self.eks_hook.conn_region_name}"
            ) from None
        return cluster


def default_pod_runtime() -> dict[str, str]:
    """Pods' runtime without a published image: the NGC image DTP's training image is built FROM, whose lack of
    DTP's programs the pipeline makes up for by staging them on FSx."""
    image = ngc_pytorch_image()
    return {"source": f"image {image}, programs on FSx", "image": image}


def render_pytorchjobs(
    spec: dict[str, Any], runtime: dict[str, str], settings: PyTorchJobSettings, node_selector: dict[str, str]
) -> dict[str, str]:
    """The run's PyTorchJobs on the nodes ``node_selector`` picks, running ``runtime``'s image: ``preflight.yaml``
    (environment screen and all-reduce sweep on every node) and ``pytorchjob.yaml`` (training). An image without
    DTP's programs finds them in the run's folder on FSx, where the pipeline stages them."""
    require_dtp_trainer(spec)
    instance = spec["instance"]
    devices = _devices(instance)
    workdir = run_dir(spec, {"shared_dir": FSX_MOUNT})
    programs = runtime.get("training_dir") or str(workdir / "programs")
    run_key = spec["names"]["run_key"]
    labels = {f"{LABEL_DOMAIN}/run": run_key, f"{LABEL_DOMAIN}/dag": _label_value(spec["dag_id"])}
    common = {
        "namespace": settings.namespace,
        "labels": labels,
        "annotations": {f"{LABEL_DOMAIN}/{key.removeprefix(TAG_PREFIX)}": value for key, value in spec["tags"].items()},
        "procs_per_node": instance["accelerators_per_node"],
        "num_nodes": spec["params"]["num_nodes"],
        "node_selector": node_selector,
        # Accelerated node groups are often tainted with their accelerator so other pods stay off them.
        "tolerations": [{"key": name, "operator": "Exists", "effect": "NoSchedule"} for name in devices if name != EFA],
        "image": runtime["image"],
        "image_pull_policy": settings.image_pull_policy,
        "env": [
            {"name": k, "value": v}
            for k, v in {**trainer_environment(EFA in devices, GPU in devices), **spec["params"]["extra_env"]}.items()
        ],
        "devices": devices,
        "fsx_mount": FSX_MOUNT,
        "fsx_claim": settings.fsx_claim,
        **_gang_scheduling(spec["params"]),
    }
    # A gang scheduler places none of a job's pods until all of them fit, while the training operator counts a job's
    # activeDeadlineSeconds from its start, not its pods': the jobs get the pending timeout besides, so that a gang's
    # wait neither fails the preflight at its 15 minutes nor takes training's time from what its budget pays for.
    waiting = spec["params"]["pending_timeout_minutes"] * 60 if common["scheduler_name"] else 0
    limit = spec["training_time_limit_minutes"] * 60
    preflight = render(
        "eks/pytorchjob.yaml.j2",
        **common,
        job_name=preflight_job_name(spec),
        command=[
            *("torchrun", f"{programs}/preflight.py", "--results", str(workdir / "preflight.json")),
            *("--max-bytes", str(instance["busbw_at_bytes"])),
        ],
        max_restarts=0,
        deadline_seconds=PREFLIGHT_DEADLINE_S + waiting,
    )
    training = render(
        "eks/pytorchjob.yaml.j2",
        **common,
        job_name=run_key,
        command=["torchrun", f"{programs}/train.py", "--config", str(workdir / "train.json")],
        max_restarts=MAX_RESTARTS,
        deadline_seconds=limit + waiting if limit else 0,
    )
    return {"preflight.yaml": preflight, "pytorchjob.yaml": training}


def delete_pytorchjobs(hook: PyTorchJobHook, spec: dict[str, Any], timeout: float) -> list[str]:
    """Delete the run's PyTorchJobs and wait until they and their pods are gone; the names of those there were."""
    names = [preflight_job_name(spec), spec["names"]["run_key"]]
    with hook.kubernetes() as kubernetes:
        return [name for name in names if hook.delete_job(kubernetes, name, timeout=timeout)]


def preflight_job_name(spec: dict[str, Any]) -> str:
    """The name of the run's preflight PyTorchJob (its training job has the run key)."""
    return f"{spec['names']['run_key']}-preflight"


def _gang_scheduling(params: dict[str, Any]) -> dict[str, Any]:
    """The template's gang scheduling value: the pods' ``scheduler_name`` (None: the default scheduler's, pod by
    pod). The PodGroup gets no ``scheduleTimeoutSeconds``: the pods scheduler-plugins has placed hold their nodes
    while they wait for the rest, so they wait the scheduler's own short time, not the run's pending timeout (which
    the operator applies to the job as a whole). A spec from before ``gang_scheduler`` asks for none."""
    return {"scheduler_name": GANG_SCHEDULER_NAMES.get(params.get("gang_scheduler", "none"))}


def _devices(instance: dict[str, Any]) -> dict[str, int]:
    """The extended resources one worker pod takes: all of its node's accelerators and EFA interfaces
    (the Neuron device plugin counts devices, where ``accelerators_per_node`` counts NeuronCores)."""
    if is_trainium(instance):
        devices = {NEURON: instance["neuron_devices"]}
    else:
        devices = {GPU: instance["accelerators_per_node"]}
    if instance["efa_interfaces"]:
        devices[EFA] = instance["efa_interfaces"]
    return devices


def _label_value(text: str) -> str:
    """``text`` as a Kubernetes label value: at most 63 of [A-Za-z0-9_.-], alphanumeric at both ends."""
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:63])
