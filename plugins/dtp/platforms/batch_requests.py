"""The requests that make a run's AWS Batch resources: a managed EC2 compute environment of the run's instance type
in the run's private subnet, a job queue on it, and a ``multinode`` job definition whose nodes each run torchrun with
one process per accelerator (reference pattern: Batch's multi-node parallel jobs, whose nodes learn their index, the
node count and the main node's address from ``AWS_BATCH_JOB_*`` variables); and the node overrides that turn the job
into the run's preflight. Every node mounts the host's ``/fsx``, which the ``dtp_batch`` connection's launch template
mounts (ECS cannot mount FSx for Lustre itself)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dtp.naming import TAG_PREFIX
from dtp.pipeline.run_dirs import run_dir
from dtp.platforms.base import PlatformNotReady
from dtp.platforms.batch_settings import BatchSettings
from dtp.platforms.containers import FSX_MOUNT, is_nvidia, require_dtp_trainer, trainer_environment

DOCUMENTS = ("compute-environment.json", "job-queue.json", "job-definition.json")
DIGEST_TAG = f"{TAG_PREFIX}definition-sha256"
# The ECS agent and the OS keep part of a host's memory ("Compute resource memory management"): ask for 90%.
MEMORY_SHARE = 0.9
# The main node has no AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS: it is the main node, so it takes its own
# address. The script is constant; torchrun's arguments arrive as the script's own argv ("$@").
LAUNCH = (
    'MAIN="${AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS:-$(hostname -I | cut -d" " -f1)}"\n'
    'exec torchrun --nnodes "$AWS_BATCH_JOB_NUM_NODES" --node_rank "$AWS_BATCH_JOB_NODE_INDEX" '
    '--master_addr "$MAIN" --master_port 29500 "$@"\n'
)


def render_requests(
    spec: dict[str, Any], network: dict[str, str], settings: BatchSettings, runtime: dict[str, str]
) -> dict[str, str]:
    """The run's CreateComputeEnvironment, CreateJobQueue and RegisterJobDefinition requests (as ``DOCUMENTS``),
    its nodes running ``runtime``'s image, in the network stack's subnet and security group."""
    definition = job_definition_request(spec, runtime)
    environment = compute_environment_request(spec, network, settings)
    queue = {
        "jobQueueName": f"{spec['names']['run_key']}-queue",
        "state": "ENABLED",
        "priority": 1,
        "computeEnvironmentOrder": [{"order": 1, "computeEnvironment": environment["computeEnvironmentName"]}],
        "tags": spec["tags"],
    }
    requests = (environment, queue, definition)
    return {name: json.dumps(request, indent=2) for name, request in zip(DOCUMENTS, requests, strict=True)}


def compute_environment_request(
    spec: dict[str, Any], network: dict[str, str], settings: BatchSettings
) -> dict[str, Any]:
    """The run's managed EC2 compute environment: as many vCPUs as its nodes have, scaled down to none when idle,
    on ``settings``' instance role and launch template, in the network stack's cluster placement group where the
    stack has one (its ``PlacementGroup`` output)."""
    params, instance = spec["params"], spec["instance"]
    compute: dict[str, Any] = {
        "type": "EC2",
        "minvCpus": 0,
        "maxvCpus": instance["vcpus"] * params["num_nodes"],
        "instanceTypes": [params["instance_type"]],
        "subnets": [network["PrivateSubnet"]],
        "instanceRole": settings.instance_role_arn,
        "ec2Configuration": [{"imageType": "ECS_AL2023_NVIDIA" if is_nvidia(instance) else "ECS_AL2023"}],
        "tags": spec["tags"],
    }
    if settings.launch_template_id:
        compute["launchTemplate"] = {"launchTemplateId": settings.launch_template_id, "version": "$Latest"}
    # The launch template's EFA network interfaces carry the security groups where the instance type has any:
    # Batch would put securityGroupIds on the instances, and EC2 refuses those together with network interfaces.
    if not (settings.launch_template_id and instance["efa_interfaces"]):
        compute["securityGroupIds"] = [network["SecurityGroup"]]
    # Batch takes only an existing placement group: the network stack's, where it has one.
    if placement_group := network.get("PlacementGroup"):
        compute["placementGroup"] = placement_group
    environment: dict[str, Any] = {
        "computeEnvironmentName": f"{spec['names']['run_key']}-ce",
        "type": "MANAGED",
        "state": "ENABLED",
        "computeResources": compute,
        "tags": spec["tags"],
    }
    if settings.service_role_arn:
        environment["serviceRole"] = settings.service_role_arn
    return environment


def job_definition_request(spec: dict[str, Any], runtime: dict[str, str]) -> dict[str, Any]:
    """The run's ``multinode`` job definition (RegisterJobDefinition's request) running ``runtime``'s image, its
    content digest as a tag."""
    require_dtp_trainer(spec)
    params, instance, instance_type = spec["params"], spec["instance"], spec["params"]["instance_type"]
    vcpus, memory_gib = instance["vcpus"], instance["memory_gib"]
    if not (vcpus and memory_gib):
        raise PlatformNotReady(f"include/instance_types.yaml gives no vcpus and memory_gib for {instance_type}")
    workdir = run_dir(spec, {"shared_dir": FSX_MOUNT})
    procs, memory = str(instance["accelerators_per_node"]), int(memory_gib * 1024 * MEMORY_SHARE)
    resources = {"VCPU": str(vcpus), "MEMORY": str(memory)} | ({"GPU": procs} if is_nvidia(instance) else {})
    env = {**trainer_environment(instance["efa_interfaces"] > 0, is_nvidia(instance)), **params["extra_env"]}
    container: dict[str, Any] = {
        "image": runtime["image"],
        "command": _launch(spec, runtime, "train.py", "--config", str(workdir / "train.json")),
        "instanceType": instance_type,
        "resourceRequirements": [{"type": kind, "value": value} for kind, value in resources.items()],
        "volumes": [{"name": "fsx", "host": {"sourcePath": FSX_MOUNT}}],
        "mountPoints": [{"sourceVolume": "fsx", "containerPath": FSX_MOUNT, "readOnly": False}],
        # NCCL and the data loader's workers share memory through /dev/shm; the container default is 64 MiB.
        "linuxParameters": {"sharedMemorySize": memory // 2},
        "environment": [{"name": name, "value": value} for name, value in env.items()],
    }
    if efa := instance["efa_interfaces"]:
        devices = [f"/dev/infiniband/uverbs{i}" for i in range(efa)]
        container["linuxParameters"]["devices"] = [{"hostPath": d, "containerPath": d} for d in devices]
        container["ulimits"] = [{"name": "memlock", "softLimit": -1, "hardLimit": -1}]
    definition: dict[str, Any] = {
        "jobDefinitionName": f"{spec['names']['run_key']}-train",
        "type": "multinode",
        "nodeProperties": {
            "numNodes": params["num_nodes"],
            "mainNode": 0,
            "nodeRangeProperties": [{"targetNodes": "0:", "container": container}],
        },
        "retryStrategy": {"attempts": 1},
        # Every run has a limit (budget_usd, expiry_hours) of at least a minute, Batch's least.
        "timeout": {"attemptDurationSeconds": spec["training_time_limit_minutes"] * 60},
        "propagateTags": True,
        "tags": spec["tags"],
    }
    # A retried registration reuses the active revision only when nothing changed.
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
    definition["tags"] = {**spec["tags"], DIGEST_TAG: digest}
    return definition


def preflight_node_overrides(spec: dict[str, Any], runtime: dict[str, str]) -> dict[str, Any]:
    """SubmitJob's ``nodeOverrides`` that turn the run's job definition into its preflight: every node runs
    ``preflight.py`` (environment screen, all-reduce sweep) in place of the trainer."""
    workdir = run_dir(spec, {"shared_dir": FSX_MOUNT})
    command = _launch(
        spec,
        runtime,
        "preflight.py",
        *("--results", str(workdir / "preflight.json"), "--max-bytes", str(spec["instance"]["busbw_at_bytes"])),
    )
    return {"nodePropertyOverrides": [{"targetNodes": "0:", "containerOverrides": {"command": command}}]}


def _launch(spec: dict[str, Any], runtime: dict[str, str], program: str, *args: str) -> list[str]:
    """A node's command: ``LAUNCH`` starting torchrun on ``program`` of the runtime (or of the run's folder on
    FSx, where the pipeline stages the programs for an image without them)."""
    programs = runtime.get("training_dir") or str(run_dir(spec, {"shared_dir": FSX_MOUNT}) / "programs")
    procs = str(spec["instance"]["accelerators_per_node"])
    return ["sh", "-c", LAUNCH, "torchrun", "--nproc_per_node", procs, f"{programs}/{program}", *args]
