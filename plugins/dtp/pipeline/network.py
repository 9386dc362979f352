"""The run's network + storage stack: validate, create (idempotent), read outputs, tear down and verify.

A run on a platform whose cluster brings its own network (EKS) gets a stack with only the data bucket: no VPC,
subnets, NAT gateway (billed hourly) or Elastic IP (VPCs and addresses: 5 per region by default). So does a run
where the ``dtp_network`` connection names an existing VPC (``ExistingNetwork``): its cluster goes into that VPC's
subnets, which DTP neither tags nor deletes. A file system that outlives runs (an existing FSx for Lustre) can
only be mounted from its own VPC, so a platform set up with one needs that connection.

A stack that makes a VPC puts its subnets in zones that offer the run's instance type: the primary subnets in the
zone of the capacity the platform's settings reserve for it, where they name some, and the fallback subnet in
another zone."""

from __future__ import annotations

import logging
from typing import Any

from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
from airflow.sdk.exceptions import AirflowFailException
from pydantic import Field

from dtp.hooks.hyperpod import HyperPodHook
from dtp.hooks.stacks import StackHook
from dtp.hooks.sweeper import RunResourceSweeper
from dtp.naming import EXPIRES_TAG
from dtp.params import NODES_OUTLIVE_RUNS
from dtp.platforms.base import PlatformSettings
from dtp.templates import TEMPLATE_DIR

log = logging.getLogger(__name__)
NETWORK_TEMPLATE = TEMPLATE_DIR / "cloudformation" / "network.yaml"
# Platforms that use none of the stack's network outputs, only its DataBucket (dtp.pipeline.data): EKS runs its
# PyTorchJobs on an existing cluster, in the cluster's VPC (dtp.platforms.eks). The platforms do not say so
# themselves; every other one places its nodes in the stack's subnets and security group.
PLATFORMS_WITHOUT_NETWORK = frozenset({"eks"})
NETWORK_CONN_ID = "dtp_network"
_SUBNET, _GROUP = r"^subnet-[0-9a-f]{8,17}$", r"^sg-[0-9a-f]{8,17}$"


class ExistingNetwork(PlatformSettings):
    """an existing VPC for the runs' clusters, as JSON: vpc_id, private_subnet, security_group (with the EFA rules:
    all traffic to and from itself), and optionally fallback_private_subnet (another zone's, for HyperPod's capacity
    fallback) and public_subnet (ParallelCluster's head node; default private_subnet)"""

    vpc_id: str = Field(pattern=r"^vpc-[0-9a-f]{8,17}$")
    private_subnet: str = Field(pattern=_SUBNET)
    security_group: str = Field(pattern=_GROUP)
    fallback_private_subnet: str = Field("", pattern=f"^$|{_SUBNET}")
    public_subnet: str = Field("", pattern=f"^$|{_SUBNET}")

    def outputs(self) -> dict[str, str]:
        """The VPC's ids under the names of the network stack's outputs, which the platforms read."""
        outputs = {
            "VPC": self.vpc_id,
            "PrivateSubnet": self.private_subnet,
            "PublicSubnet": self.public_subnet or self.private_subnet,
            "FallbackPrivateSubnet": self.fallback_private_subnet,
            "SecurityGroup": self.security_group,
        }
        return {name: value for name, value in outputs.items() if value}


def existing_network() -> dict[str, str]:
    """The outputs of the VPC the ``dtp_network`` connection names; empty when there is no such connection (each
    run makes its own VPC). An invalid connection raises ``PlatformNotReady`` naming the field."""
    from airflow.sdk.bases.hook import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        BaseHook.get_connection(NETWORK_CONN_ID)
    except AirflowNotFoundException:
        return {}
    return ExistingNetwork.from_connection(NETWORK_CONN_ID).outputs()


class LeakedResources(RuntimeError):
    """Teardown finished but resources of the run still exist."""


def plan_network_stack(spec: dict[str, Any], aws_conn_id: str) -> str:
    """Validate the network template with CloudFormation and, where the run makes a network, choose its subnets'
    zones (``subnet_zones``: a region where none offers the run's instance type is refused here), before anything
    exists; return the stack's name."""
    StackHook(aws_conn_id=aws_conn_id).conn.validate_template(TemplateBody=NETWORK_TEMPLATE.read_text())
    if makes_network(spec):
        log.info("Subnets in %s, fallback subnet in %s", *subnet_zones(spec, aws_conn_id))
    log.info("Network template valid; stack %s will carry tags %s", spec["names"]["network_stack"], spec["tags"])
    return spec["names"]["network_stack"]


def availability_zones(aws_conn_id: str) -> list[str]:
    """The region's available zones (not Local or Wavelength zones), in name order."""
    ec2 = EC2Hook(aws_conn_id=aws_conn_id, api_type="client_type").conn
    zones = ec2.describe_availability_zones(
        Filters=[{"Name": "state", "Values": ["available"]}, {"Name": "zone-type", "Values": ["availability-zone"]}]
    )["AvailabilityZones"]
    return sorted(zone["ZoneName"] for zone in zones)


def zones_offering(aws_conn_id: str, instance_type: str) -> set[str]:
    """The zones where EC2 offers ``instance_type``, Local Zones among them where they offer it."""
    ec2 = EC2Hook(aws_conn_id=aws_conn_id, api_type="client_type").conn
    offerings = ec2.describe_instance_type_offerings(
        LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": [instance_type]}]
    )["InstanceTypeOfferings"]
    return {offering["Location"] for offering in offerings}


def reserved_zone(spec: dict[str, Any], aws_conn_id: str) -> str:
    """The zone of the capacity the run's platform settings reserve for its instance type: ParallelCluster's
    ``capacity_reservation_id``, the reserved capacity of HyperPod's training plan for the type; empty where they
    reserve none."""
    platform, instance_type = spec["params"]["platform"], spec["params"]["instance_type"]
    if platform == "parallelcluster":
        from dtp.platforms.parallelcluster import ParallelClusterPlatform

        if reservation := ParallelClusterPlatform().settings.capacity_reservation_id:
            ec2 = EC2Hook(aws_conn_id=aws_conn_id, api_type="client_type").conn
            found = ec2.describe_capacity_reservations(CapacityReservationIds=[reservation])["CapacityReservations"]
            zone: str = found[0]["AvailabilityZone"]
            return zone
    if platform == "hyperpod":
        from dtp.platforms.hyperpod import HyperPodPlatform

        if plan := HyperPodPlatform().settings.training_plans.get(instance_type):
            described = HyperPodHook(aws_conn_id=aws_conn_id).conn.describe_training_plan(TrainingPlanName=plan)
            zones = [s["AvailabilityZone"] for s in described["ReservedCapacitySummaries"] if "AvailabilityZone" in s]
            return zones[0] if zones else ""
    return ""


def subnet_zones(spec: dict[str, Any], aws_conn_id: str) -> tuple[str, str]:
    """The zones of the run's subnets: the primary (public and private) subnets', then the fallback subnet's.

    Both offer the run's instance type, first in name order; the primary is the zone of the capacity the platform
    reserves for the type (``reserved_zone``) where it reserves some. A type only one zone offers gets its fallback
    subnet in another zone (the capacity fallback's other instance types may be offered there). On a platform whose
    nodes outlive runs (local) no instance goes into the subnets: the region's first two zones. Raises
    ``AirflowFailException`` where no zone offers the type."""
    zones = availability_zones(aws_conn_id)
    if len(zones) < 2:
        raise RuntimeError(f"the region has {len(zones)} available zone(s) ({zones}); the network stack needs two")
    if spec["params"]["platform"] in NODES_OUTLIVE_RUNS:
        return zones[0], zones[1]
    instance_type = spec["params"]["instance_type"]
    offering = zones_offering(aws_conn_id, instance_type)
    offered = [zone for zone in zones if zone in offering]
    primary = reserved_zone(spec, aws_conn_id) or next(iter(offered), "")
    if not primary:
        region = EC2Hook(aws_conn_id=aws_conn_id, api_type="client_type").conn.meta.region_name
        raise AirflowFailException(
            f"instance_type: got {instance_type!r}; no availability zone of {region} offers it "
            f"(zones: {', '.join(zones)}): choose another instance type, or another region"
        )
    others = [zone for zone in offered if zone != primary] or [zone for zone in zones if zone != primary]
    return primary, others[0]


def needs_network(spec: dict[str, Any]) -> bool:
    """Whether the run's platform uses a network (VPC, subnets, security groups), not only the stack's bucket."""
    return spec["params"].get("platform") not in PLATFORMS_WITHOUT_NETWORK


def makes_network(spec: dict[str, Any]) -> bool:
    """Whether the run's stack makes a network: its platform needs one and ``dtp_network`` names none."""
    return needs_network(spec) and not spec.get("existing_network")


def create_network_stack(spec: dict[str, Any], aws_conn_id: str) -> str:
    """Create the run's stack, its subnets in the zones ``subnet_zones`` chooses; where the run makes no network
    (``makes_network``), a stack with only the data bucket."""
    names = spec["names"]
    parameters = {"VPCName": names["run_key"], "DataBucketName": names["data_bucket"]}
    if makes_network(spec):
        primary, fallback = subnet_zones(spec, aws_conn_id)
        parameters |= {"CreateNetwork": "true", "SubnetsAZ": primary, "FallbackSubnetAZ": fallback}
    else:
        why = (
            f"the cluster goes into {spec['existing_network']['VPC']} ({NETWORK_CONN_ID})"
            if needs_network(spec)
            else f"platform {spec['params']['platform']} needs no network"
        )
        log.info("Stack %s holds only the bucket: %s", names["network_stack"], why)
        parameters["CreateNetwork"] = "false"
    StackHook(aws_conn_id=aws_conn_id).ensure_stack(
        names["network_stack"], NETWORK_TEMPLATE.read_text(), parameters, spec["tags"]
    )
    return names["network_stack"]


def network_outputs(spec: dict[str, Any], aws_conn_id: str) -> dict[str, str]:
    """The stack's exports, and the run's tags on the bucket and the NAT gateway's Elastic IP (stack tags reach
    neither everywhere; a sweep finds an address its NAT gateway no longer holds by them).

    The bucket's tags are added to, never replaced: CloudFormation's system tags on it cannot be removed
    (``RunResourceSweeper.tag_bucket``)."""
    outputs = StackHook(aws_conn_id=aws_conn_id).stack_outputs(spec["names"]["network_stack"])
    sweeper = RunResourceSweeper(aws_conn_id=aws_conn_id)
    how = sweeper.tag_bucket(outputs["DataBucket"], spec["tags"])
    log.info("Run tags on bucket %s: %s", outputs["DataBucket"], how)
    if "VPC" in outputs:  # a bucket-only stack has no NAT gateway, so no address
        sweeper.tag_addresses(spec["names"]["run_key"], spec["tags"])
    outputs = {**spec.get("existing_network", {}), **outputs}
    log.info("Network ready: %s", outputs)
    return outputs


def destroy_run_resources(
    aws_conn_id: str, run_key: str, stacks: list[str], buckets: tuple[str, ...]
) -> dict[str, Any]:
    """Empty the buckets, delete the stacks, sweep what is still tagged with the run, verify nothing is left.

    Shared by teardown and the reaper. A DELETE_FAILED stack (retained or blocking
    resources) is deleted again once the sweep has removed what blocked it.
    """
    stack_hook, sweeper = StackHook(aws_conn_id=aws_conn_id), RunResourceSweeper(aws_conn_id=aws_conn_id)
    emptied = sum(sweeper.empty_bucket(b) for b in buckets)
    statuses = {name: stack_hook.delete_and_wait(name) for name in stacks}
    for name, status in statuses.items():
        if status == "DELETE_FAILED":
            log.warning("Stack %s: DELETE_FAILED (%s); sweeping what blocks it", name, stack_hook.failure_reasons(name))
    swept = sweeper.sweep(run_key, buckets)
    for name, status in statuses.items():
        if status == "DELETE_FAILED":
            statuses[name] = stack_hook.delete_and_wait(name)
    left = {kind: ids for kind, ids in sweeper.find(run_key, buckets).items() if ids}
    for name in stacks:
        remaining = stack_hook.describe(name)
        if remaining is not None and remaining["StackStatus"] != "DELETE_COMPLETE":
            left.setdefault("stacks", []).append(f"{name} ({remaining['StackStatus']})")
    if left:
        raise LeakedResources(f"resources of run {run_key} still exist after deletion: {left}")
    return {"objects_deleted": emptied, "stack_status": statuses, "swept": {k: v for k, v in swept.items() if v}}


def teardown_network(spec: dict[str, Any], aws_conn_id: str) -> dict[str, Any]:
    """Delete the run's network stack and bucket, and verify nothing of the run remains."""
    names = spec["names"]
    if spec["params"]["keep_cluster"]:
        log.warning(
            "keep_cluster=true: keeping %s; it expires at %s", names["network_stack"], spec["tags"][EXPIRES_TAG]
        )
        return {"kept": True}
    return destroy_network(spec, aws_conn_id)


def destroy_network(spec: dict[str, Any], aws_conn_id: str) -> dict[str, Any]:
    """Delete the network stack and bucket of ``spec``'s names, whatever ``keep_cluster`` says."""
    names = spec["names"]
    return destroy_run_resources(aws_conn_id, names["run_key"], [names["network_stack"]], (names["data_bucket"],))
