"""Capacity fallback: when the cloud has no capacity for the run's nodes, try the next placement.

A placement is an instance type, a subnet (hence an availability zone) and optionally reserved
capacity. The order (``placements``) is: for each instance type, its reserved capacity in each
subnet, then on demand in each subnet; the instance types are the run's, then the recipe's
``fallback_instance_types`` (e.g. p5.48xlarge, then p5e.48xlarge, then p4de.24xlarge), and the subnets
the network stack's private subnet, then its fallback subnet in a second zone. Only types with the
run's accelerators per node and collective test qualify, so the job's ranks and the preflight stay as
validated; their price, peak and expected bandwidth come with the cluster (``instance_of``) and are
what preflight, MFU and the report use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from dtp.recipes import instance_types

# Error codes meaning "no capacity (or quota) for this instance type now", from EC2 and SageMaker.
CAPACITY_ERROR_CODES = frozenset(
    {"InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientCapacityException", "ResourceLimitExceeded"}
)
# How a cluster that failed later says the same (HyperPod's FailureMessage, pcluster's failures).
_CAPACITY_MESSAGE = re.compile(r"insufficient\s*(instance\s*)?capacity|not have sufficient capacity", re.IGNORECASE)


def is_capacity_error(err: ClientError) -> bool:
    """Whether an AWS call was refused for want of capacity (worth trying another instance type)."""
    return err.response.get("Error", {}).get("Code") in CAPACITY_ERROR_CODES


def is_capacity_failure(message: str) -> bool:
    """Whether a cluster's failure message says it got no capacity."""
    return bool(_CAPACITY_MESSAGE.search(message or ""))


def candidates(spec: dict[str, Any], platform: str) -> list[str]:
    """The run's instance type, then the recipe's fallbacks offered on ``platform`` with the same node shape."""
    chosen = spec["params"]["instance_type"]
    table = instance_types()
    shape = (table[chosen].accelerators_per_node, table[chosen].collective_test)
    fallbacks = [
        name
        for name in spec["recipe"]["defaults"].get("fallback_instance_types", [])
        if name != chosen
        and name in table
        and platform in table[name].platforms
        and (table[name].accelerators_per_node, table[name].collective_test) == shape
    ]
    return [chosen, *fallbacks]


@dataclass(frozen=True)
class Placement:
    """Where a cluster's compute nodes are asked for."""

    instance_type: str
    subnet: str
    # Reserved capacity for the instance type (a HyperPod training plan ARN); "" is on demand.
    reservation: str = ""

    def __str__(self) -> str:
        capacity = f"reservation {self.reservation}" if self.reservation else "on demand"
        return f"{self.instance_type} in {self.subnet} ({capacity})"


def placements(
    spec: dict[str, Any], platform: str, network: dict[str, str], reservations: Mapping[str, str]
) -> list[Placement]:
    """Every placement to try, in order; ``reservations`` maps an instance type to its reserved capacity."""
    subnets = [subnet for subnet in (network["PrivateSubnet"], network.get("FallbackPrivateSubnet")) if subnet]
    order: list[Placement] = []
    for instance_type in candidates(spec, platform):
        if reserved := reservations.get(instance_type):
            order += [Placement(instance_type, subnet, reserved) for subnet in subnets]
        order += [Placement(instance_type, subnet) for subnet in subnets]
    return order


def instance_of(spec: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    """The instance type the cluster actually got (a fallback's), else the one the run asked for."""
    instance: dict[str, Any] = cluster.get("instance") or spec["instance"]
    return instance


def instance_fields(name: str) -> dict[str, Any]:
    """What a cluster record carries about its instance type."""
    return {"instance_type": name, "instance": instance_types()[name].model_dump()}
