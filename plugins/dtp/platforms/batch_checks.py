"""What Batch would refuse, or a run would fail on, in a run's compute environment, job queue and multi-node job
definition: what Batch's service model checks, Batch's names, a queue on another compute environment, a compute
environment without the launch template that gives its hosts the shared ``/fsx`` (and EFA interfaces), and node
ranges that do not cover the job's nodes exactly once."""

from __future__ import annotations

import re
from typing import Any

from dtp.platforms.containers import FSX_MOUNT
from dtp.platforms.service_models import request_problems

# Batch's rule for compute environment, job queue, job definition and job names.
BATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def batch_request_problems(
    environment: dict[str, Any], queue: dict[str, Any], definition: dict[str, Any], conn_id: str
) -> list[str]:
    """What Batch would refuse, or the run would fail on, in its CreateComputeEnvironment, CreateJobQueue and
    RegisterJobDefinition requests (``conn_id``: the connection that gives the launch template)."""
    problems = request_problems("batch", "CreateComputeEnvironment", environment)
    problems += request_problems("batch", "CreateJobQueue", queue)
    problems += request_problems("batch", "RegisterJobDefinition", definition)
    names = {
        "CreateComputeEnvironment.computeEnvironmentName": environment.get("computeEnvironmentName"),
        "CreateJobQueue.jobQueueName": queue.get("jobQueueName"),
        "RegisterJobDefinition.jobDefinitionName": definition.get("jobDefinitionName"),
    }
    problems += [
        f"{path}: {name!r} is not a Batch name (up to 128 letters, numbers, hyphens, underscores)"
        for path, name in names.items()
        if not BATCH_NAME.fullmatch(str(name))
    ]
    problems += [
        f"job-queue.json: computeEnvironmentOrder names {order.get('computeEnvironment')!r}, not the run's "
        f"compute environment {environment.get('computeEnvironmentName')!r}"
        for order in queue.get("computeEnvironmentOrder", [])
        if order.get("computeEnvironment") != environment.get("computeEnvironmentName")
    ]
    problems += launch_template_problems(environment, definition, conn_id)
    return problems + node_problems(definition.get("nodeProperties") or {})


def launch_template_problems(environment: dict[str, Any], definition: dict[str, Any], conn_id: str) -> list[str]:
    """A compute environment without a launch template (``conn_id``'s launch_template_id): its hosts get no
    ``/fsx``, which every job needs, and no EFA interfaces, which a job that maps EFA devices needs.

    Without the mount, ECS gives the container an empty ``/fsx`` of the host's own disk: the run's config and
    staged programs, which the Airflow worker writes to the run's folder on FSx, are not there, and what a job
    writes (the preflight's results, metrics, checkpoints) stays on the host and goes with it."""
    if (environment.get("computeResources") or {}).get("launchTemplate"):
        return []
    nodes = definition.get("nodeProperties") or {}
    containers = [node_range.get("container") or {} for node_range in nodes.get("nodeRangeProperties", [])]
    efa = max((len(_efa_devices(container)) for container in containers), default=0)
    count = nodes.get("numNodes", 0)
    shares = "which share" if count > 1 else "which shares"
    needs = [f"maps {efa} EFA devices (/dev/infiniband/uverbs*)"] if efa else []
    needs += [
        f"runs on {count} node{'s' if count > 1 else ''}, {shares} the run's files (config, programs, results, "
        f"checkpoints) with the Airflow workers through {FSX_MOUNT}"
    ]
    interfaces = (
        f"one network interface of InterfaceType efa on each network card 0..{efa - 1}, whose Groups hold the run's "
        "EFA security group (the dtp_network connection's security_group), and "
        if efa
        else ""
    )
    return [
        f"compute-environment.json: no launchTemplate (connection {conn_id!r} gives no launch_template_id), but the "
        f"job {' and '.join(needs)}: give launch_template_id, a launch template with {interfaces}user data that "
        f"mounts the FSx for Lustre file system at {FSX_MOUNT}"
    ]


def _efa_devices(container: dict[str, Any]) -> list[str]:
    """The EFA devices (``/dev/infiniband/uverbs*``) a job definition's container maps from its host."""
    devices = (container.get("linuxParameters") or {}).get("devices", [])
    return [d["hostPath"] for d in devices if str(d.get("hostPath", "")).startswith("/dev/infiniband/")]


def node_problems(nodes: dict[str, Any]) -> list[str]:
    """Batch's rules for a multi-node job's node ranges: together they cover nodes 0..numNodes-1 exactly once."""
    count, main = nodes.get("numNodes", 0), nodes.get("mainNode", 0)
    problems = [] if count >= 1 else [f"nodeProperties.numNodes: {count}; a job needs at least 1 node"]
    if not 0 <= main < max(count, 1):
        problems.append(f"nodeProperties.mainNode: {main} is not one of the job's nodes 0..{count - 1}")
    covered: list[int] = []
    for index, node_range in enumerate(nodes.get("nodeRangeProperties", [])):
        start, sep, end = str(node_range.get("targetNodes", "")).partition(":")
        if not re.fullmatch(r"\d*", start + end) or not (start or end):
            problems.append(f"nodeProperties.nodeRangeProperties[{index}].targetNodes: not a range like '0:' or '1:3'")
            continue
        first, last = int(start or 0), int(end) if end else (count - 1 if sep else int(start))
        covered += range(first, last + 1)
    if sorted(covered) != list(range(count)):
        problems.append(
            f"nodeProperties.nodeRangeProperties: the ranges cover nodes {sorted(covered)}, not 0..{count - 1}"
        )
    return problems
