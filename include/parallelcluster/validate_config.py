"""Validate a ParallelCluster 3 cluster configuration against aws-parallelcluster's own schema, offline.

Runs inside the ``.venv-pcluster`` virtualenv (aws-parallelcluster cannot share a virtualenv with Airflow), so it
imports neither Airflow nor DTP::

    .venv-pcluster/bin/python include/parallelcluster/validate_config.py --cluster-name NAME < cluster-config.yaml

Reads the YAML on stdin, loads it with ``ClusterSchema(cluster_name=NAME)`` (types, required keys, unknown keys,
patterns, ranges, cross-field rules), then runs those of pcluster's validators that need no AWS call (cluster name,
MinCount <= MaxCount) and checks every instance type against the EC2 API model's ``InstanceType`` enum; prints a
JSON list of problems on stdout (empty: valid). The rest of pcluster's validators describe AWS resources (subnets,
AMIs, key pairs): ``pcluster create-cluster --dryrun true`` runs them. It never calls AWS; the region and dummy
credentials are there because pcluster's modules create boto3 sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

# Before pcluster (and boto3) are imported: no instance metadata lookups, a region and dummy credentials.
OFFLINE_ENV = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "offline",
    "AWS_SECRET_ACCESS_KEY": "offline",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _flatten(messages: Any, path: str = "") -> list[str]:
    """marshmallow's nested error dict as one ``Path.To.Key: message`` line per problem."""
    if isinstance(messages, dict):
        return [line for key, value in messages.items() for line in _flatten(value, f"{path}.{key}" if path else key)]
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return [f"{path or 'config'}: {m}" for m in messages]
    if isinstance(messages, list):
        return [line for item in messages for line in _flatten(item, path)]
    return [f"{path or 'config'}: {messages}"]


def problems(text: str, cluster_name: str) -> list[str]:
    import yaml
    from marshmallow import ValidationError
    from pcluster.schemas.cluster_schema import ClusterSchema

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"not valid YAML: {err}"]
    if not isinstance(config, dict):
        return [f"the configuration must be a mapping, got {type(config).__name__}"]
    try:
        cluster = ClusterSchema(cluster_name=cluster_name).load(config)
    except ValidationError as err:
        return _flatten(err.messages)
    return _offline_validators(cluster) + _instance_types(cluster)


def _offline_validators(cluster: Any) -> list[str]:
    from pcluster.validators.cluster_validators import ClusterNameValidator, ComputeResourceSizeValidator

    results = ClusterNameValidator().execute(name=cluster.cluster_name, scheduling=cluster.scheduling)
    for queue in cluster.scheduling.queues:
        for resource in queue.compute_resources:
            results += ComputeResourceSizeValidator().execute(
                min_count=resource.min_count, max_count=resource.max_count, capacity_type=queue.capacity_type
            )
    return [f"{r.validator_type}: {r.message}" for r in results if r.level.name == "ERROR"]


def _instance_types(cluster: Any) -> list[str]:
    import botocore.session

    known = set(botocore.session.get_session().get_service_model("ec2").shape_for("InstanceType").enum)
    wanted = {"HeadNode.InstanceType": cluster.head_node.instance_type}
    for queue in cluster.scheduling.queues:
        for resource in queue.compute_resources:
            for instance_type in resource.instance_types:
                wanted[f"Scheduling.SlurmQueues.{queue.name}.ComputeResources.{resource.name}.InstanceType"] = (
                    instance_type
                )
    return [f"{path}: {value!r} is not an EC2 instance type" for path, value in wanted.items() if value not in known]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster-name", required=True)
    args = parser.parse_args()
    os.environ.update(OFFLINE_ENV)
    json.dump(problems(sys.stdin.read(), args.cluster_name), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
