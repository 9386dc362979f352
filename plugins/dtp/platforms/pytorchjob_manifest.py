"""What the Kubernetes API server and Kubeflow's training operator would refuse in a PyTorchJob manifest.

The manifest is checked against the training operator's CRD schema (include/schemas), read as the API server
applies it with strict field validation, and against the rules of the operator's webhook (pkg/webhooks/pytorch)
and API types (pkg/apis/kubeflow.org/v1) of training-operator v1.9.0, and for what a gang scheduler could never
place. EKS and HyperPod on EKS check their jobs with it before anything is submitted.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import yaml
from jsonschema import Draft7Validator

from dtp.hooks.pytorchjob import GROUP, VERSION
from dtp.recipes import INCLUDE_DIR

SCHEMA_PATH = INCLUDE_DIR / "schemas" / "kubeflow.org_pytorchjobs.v1.json"
REPLICA_TYPES = ("Master", "Worker")
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_1123_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS_1123_SUBDOMAIN = rf"{DNS_1123_LABEL}(\.{DNS_1123_LABEL})*"
QUALIFIED_NAME = re.compile(rf"^(({DNS_1123_SUBDOMAIN})/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def manifest_problems(text: str) -> list[str]:
    """What the API server and the training operator would refuse in one PyTorchJob manifest."""
    try:
        manifests = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        return [f"not YAML: {err}"]
    if len(manifests) != 1 or not isinstance(manifests[0], dict):
        return [f"expected one PyTorchJob mapping, found {len(manifests)} YAML documents"]
    job = manifests[0]
    errors = sorted(_validator().iter_errors(job), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_path(error.absolute_path)}: {error.message}" for error in errors] + _operator_problems(job)


@cache
def _validator() -> Draft7Validator:
    return Draft7Validator(_as_api_server_judges(json.loads(SCHEMA_PATH.read_text())))


def _as_api_server_judges(schema: Any) -> Any:
    """The CRD schema as the API server applies it: an int-or-string without its own type takes either, and
    undeclared fields are refused (kubectl's strict field validation) unless the schema preserves them."""
    if isinstance(schema, list):
        return [_as_api_server_judges(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    adapted = {key: _as_api_server_judges(value) for key, value in schema.items()}
    if adapted.get("x-kubernetes-int-or-string") and "type" not in adapted and "anyOf" not in adapted:
        adapted["type"] = ["integer", "string"]
    if "properties" in adapted and not adapted.get("x-kubernetes-preserve-unknown-fields"):
        adapted.setdefault("additionalProperties", False)
    return adapted


def _path(parts: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "(document)"


def _operator_problems(job: dict[str, Any]) -> list[str]:
    """What the training operator requires beyond its CRD schema: the webhook's rules and its API types' enums."""
    problems = []
    if (job.get("apiVersion"), job.get("kind")) != (f"{GROUP}/{VERSION}", "PyTorchJob"):
        problems.append(f"apiVersion/kind: expected {GROUP}/{VERSION} PyTorchJob")
    metadata = job.get("metadata") or {}
    name = str(metadata.get("name", ""))
    if not DNS_1035_LABEL.fullmatch(name):
        problems.append(f"metadata.name: {name!r} is not a DNS-1035 label (a-z, 0-9, '-', a letter first, <= 63)")
    for field in ("labels", "annotations"):
        for key, value in (metadata.get(field) or {}).items():
            if not QUALIFIED_NAME.fullmatch(str(key)):
                problems.append(f"metadata.{field}: key {key!r} is not a qualified name ([prefix/]name)")
            if field == "labels" and not LABEL_VALUE.fullmatch(str(value)):
                problems.append(f"metadata.labels.{key}: {value!r} is not a label value (<= 63 of A-Za-z0-9_.-)")
    spec = job.get("spec") or {}
    replica_specs = spec.get("pytorchReplicaSpecs") or {}
    if spec.get("elasticPolicy") is not None and "Worker" not in replica_specs:
        problems.append("spec.pytorchReplicaSpecs.Worker: required with an elasticPolicy")
    if (spec.get("elasticPolicy") or {}).get("nProcPerNode") is not None and "nprocPerNode" in spec:
        problems.append("spec.elasticPolicy.nProcPerNode: must not be used with spec.nprocPerNode")
    for replica_type, replica in replica_specs.items():
        problems += _replica_problems(f"spec.pytorchReplicaSpecs.{replica_type}", replica_type, replica or {})
    return problems + _gang_problems(spec, replica_specs)


def _gang_problems(spec: dict[str, Any], replica_specs: dict[str, Any]) -> list[str]:
    """What a gang scheduler could never place: the operator makes a job with ``runPolicy.schedulingPolicy`` a
    PodGroup of ``minAvailable`` members, and one of more members than the job has pods waits for ever (Volcano keeps
    it Pending; scheduler-plugins' coscheduling refuses its pods for want of siblings)."""
    minimum = (((spec.get("runPolicy") or {}).get("schedulingPolicy")) or {}).get("minAvailable")
    # The operator defaults a replica spec without replicas to 1.
    counts = [(replica or {}).get("replicas", 1) for replica in replica_specs.values()]
    if not isinstance(minimum, int) or not all(isinstance(count, int) for count in counts):
        return []  # none asked for, or the schema names what is wrong
    if minimum > (pods := sum(counts)):
        return [f"spec.runPolicy.schedulingPolicy.minAvailable: {minimum} is more than the job's {pods} pods"]
    return []


def _replica_problems(path: str, replica_type: str, replica: dict[str, Any]) -> list[str]:
    problems = []
    if replica_type not in REPLICA_TYPES:
        problems.append(f"{path}: unsupported replica type (supported: {', '.join(REPLICA_TYPES)})")
    policy = replica.get("restartPolicy")
    if policy is not None and policy not in RESTART_POLICIES:
        problems.append(f"{path}.restartPolicy: {policy!r} is not one of {', '.join(RESTART_POLICIES)}")
    replicas = replica.get("replicas")
    if replica_type == "Master" and replicas != 1:
        problems.append(f"{path}.replicas: must be 1")
    elif isinstance(replicas, int) and replicas < 1:
        problems.append(f"{path}.replicas: must be at least 1")
    containers = ((replica.get("template") or {}).get("spec") or {}).get("containers") or []
    if not containers:
        problems.append(f"{path}.template.spec.containers: must be specified")
    elif not any(isinstance(c, dict) and c.get("name") == "pytorch" for c in containers):
        problems.append(f"{path}.template.spec.containers: needs a container named 'pytorch'")
    problems += [
        f"{path}.template.spec.containers[{index}].image: required"
        for index, container in enumerate(containers)
        if isinstance(container, dict) and not container.get("image")
    ]
    return problems
