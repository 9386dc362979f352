"""Whether an EC2 capacity reservation can take a run's nodes now: concurrent runs, or a run's earlier incarnation,
may hold its instances."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

from dtp.platforms.base import PlatformNotReady, ReservationUnavailable

log = logging.getLogger(__name__)

# States in which a capacity reservation may still become active (a Capacity Block before its start, a reservation
# being paid for or assessed); in any other but ``active`` it never takes instances again (expired, cancelled, ...).
RESERVATION_STATES_BEFORE_ACTIVE = frozenset({"scheduled", "pending", "payment-pending", "assessing", "delayed"})
# The tag pcluster gives the instances of a cluster.
CLUSTER_NAME_TAG = "parallelcluster:cluster-name"


def check_reservation(ec2: Any, reservation_id: str, field: str, spec: dict[str, Any]) -> None:
    """Refuse to create the run's cluster where the capacity reservation ``reservation_id`` (the settings' ``field``)
    cannot take its nodes (concurrent runs, or a run's earlier incarnation, share it): ``ReservationUnavailable``
    while it is not active yet or has fewer instances available than the run's ``num_nodes`` (naming the clusters
    whose instances use it), ``PlatformNotReady`` where it never will (expired, cancelled, too small, missing). One
    that ends before the run's training time limit is logged: the run may finish before."""
    try:
        found = ec2.describe_capacity_reservations(CapacityReservationIds=[reservation_id])["CapacityReservations"]
    except ClientError as err:
        if not err.response.get("Error", {}).get("Code", "").startswith("InvalidCapacityReservationId"):
            raise
        raise PlatformNotReady(f"{field}: {err}") from None
    reservation = found[0]
    zone, instance_type = reservation["AvailabilityZone"], reservation["InstanceType"]
    what = f"capacity reservation {reservation_id} ({instance_type} in {zone})"
    state, total, needed = reservation["State"], reservation["TotalInstanceCount"], spec["params"]["num_nodes"]
    if state in RESERVATION_STATES_BEFORE_ACTIVE:
        start = reservation.get("StartDate")
        raise ReservationUnavailable(f"{what} is {state}" + (f", active from {start.isoformat()}" if start else ""))
    if state != "active":
        raise PlatformNotReady(f"{field}: {what} is {state}; name an active one")
    if total < needed:
        raise PlatformNotReady(f"{field}: {what} holds {total} instances; the run needs {needed}")
    if (available := reservation["AvailableInstanceCount"]) < needed:
        users = ", ".join(clusters_using_reservation(ec2, reservation_id)) or "none found running"
        raise ReservationUnavailable(
            f"{what} has {available} of its {total} instances available and the run needs {needed}; the clusters "
            f"(or instances) using it: {users}"
        )
    limit = timedelta(minutes=spec["training_time_limit_minutes"])
    if (end := reservation.get("EndDate")) and end < datetime.now(UTC) + limit:
        log.warning("%s ends at %s, before the run's training time limit (%s from now)", what, end, limit)


def clusters_using_reservation(ec2: Any, reservation_id: str) -> list[str]:
    """The clusters whose running (or starting) instances are in the capacity reservation, by pcluster's cluster name
    tag (an instance without one by its id)."""
    filters = [
        {"Name": "capacity-reservation-id", "Values": [reservation_id]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]},
    ]
    users = set()
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for group in page["Reservations"]:
            for instance in group["Instances"]:
                tags = {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
                users.add(tags.get(CLUSTER_NAME_TAG, instance["InstanceId"]))
    return sorted(users)
