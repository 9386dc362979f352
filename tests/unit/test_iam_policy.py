"""docs/iam: the IAM policies DTP ships allow every AWS call DTP's code makes.

``dtp-worker-policy.json`` is checked against a static scan (``ast``) of what the Airflow workers run: the DAG files
and ``plugins/dtp``, less the local stack (never on AWS) and the MWAA deploy tool, whose own scan is checked against
``dtp-mwaa-deploy-policy.json``. The scan follows boto3 clients from where DTP gets them (an amazon provider hook's
``conn``, ``get_conn()`` or ``client``; ``AwsBaseHook(client_type=...)``; DTP's hooks built on those) through local
names, ``self`` attributes, properties and function arguments, and maps every operation asked of a client (called,
passed on as a bound method, or named to ``get_paginator``, ``get_waiter`` or ``getattr``) to its IAM action through
botocore's service model (``iam_inference``, ``iam_scan``). What the scan cannot see through is listed in the small
tables of ``iam_tables``. A call it cannot map (an unknown client attribute, an unlisted provider hook method, an
unlisted ``getattr``) fails the test instead of being skipped, so a new boto3 call either shows up as an action the
policy must allow or as a table to extend. The other way round, the worker policy grants nothing the scan, the
templates or a short list of reasons (``GRANTED_UNSCANNED``) do not account for, passes only roles of DTP's prefix
with no path, and lets the workers tag, take apart and delete EC2 resources only as they create them or once they
carry DTP's owner tag.

The network template's resource types are checked too: CloudFormation creates and deletes them with the caller's
permissions, and the actions listed for each are checked against the handler permissions of the resource provider
schemas that cfn-lint ships.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import cfnlint
import pytest
import yaml
from iam_policy_documents import allowing, allows, condition_values, listed, load, missing, statements
from iam_scan import Scan, operations, read_sources
from iam_tables import (
    DEPLOY_SOURCES,
    IAM_DIR,
    MANAGED_POLICY_CHARS,
    OWNER_TAG,
    PASSED_ROLES,
    PCLUSTER_CONFIG,
    PLUGINS,
    RESOURCE_ACTIONS,
    TAG_ON_CREATE,
    TEMPLATES,
    WORKER_SOURCES,
)

from dtp.naming import OWNER, PREFIX, passed_role_problem

# --- policies -------------------------------------------------------------------------------------------------------
POLICIES = sorted(IAM_DIR.glob("*.json"))
# What each policy is checked against: the sources whose calls it must allow.
SCANNED_POLICIES = {"dtp-worker-policy.json": WORKER_SOURCES, "dtp-mwaa-deploy-policy.json": DEPLOY_SOURCES}
# IAM prefixes that are not botocore's service name, and actions that are no operation (permission-only, or named
# otherwise than their operation): the rest of a policy's actions must be operations of their service.
PREFIX_SERVICES = {"airflow": "mwaa", "elasticfilesystem": "efs", "tag": "resourcegroupstaggingapi"}
PERMISSION_ONLY = frozenset(
    {
        "s3:ListBucket",
        "s3:ListAllMyBuckets",
        "s3:ListBucketVersions",
        "s3:DeleteObjectVersion",
        "s3:PutBucketPublicAccessBlock",
        "iam:PassRole",
        "lambda:InvokeFunction",
        "cloudformation:TagResource",
    }
)
# The only roles the worker and deploy policies let pass, less those on a path (IAM's * matches a / too).
PASSED_ROLES_ARN = f"arn:aws:iam::*:role/{PREFIX}-*"
PATHED_ROLES_ARN = f"{PASSED_ROLES_ARN}/*"
# Roles (path and name) a setting may name, and whether the policies let them pass: a role Admin on the path /dtp-ops/
# is no DTP role.
PASSABLE_ROLES = {
    "dtp-hyperpod-exec": True,
    "dtp-batch": True,
    "dtp-ops/Admin": False,
    "dtp-ops/dtp-batch": False,
    "admin/dtp-batch": False,
    "Admin": False,
}
# Actions the worker policy grants that neither the scan nor CloudFormation's handlers (RESOURCE_ACTIONS) account
# for, each with why the workers need it.
GRANTED_UNSCANNED = {
    "iam:PassRole": "no operation: CreateCluster and CreateComputeEnvironment pass the roles they name (PASSED_ROLES)",
    "iam:CreateServiceLinkedRole": "Batch and HyperPod create their service-linked role as the caller, on first use",
    "logs:GetLogEvents": "the provider's BatchOperator copies the job's CloudWatch log into the task log",
}


def needed(scan: Scan) -> set[str]:
    """The actions a scan found, with the tagging actions of the operations that tag what they create."""
    return scan.actions | {TAG_ON_CREATE[action] for action in scan.actions if action in TAG_ON_CREATE}


@cache
def scan_for(policy: str) -> Scan:
    """The scan of the sources ``policy`` is checked against (one per test session)."""
    return Scan(read_sources(SCANNED_POLICIES[policy]))


def without(policy: dict[str, Any], action: str) -> dict[str, Any]:
    """A copy of the policy with every Action entry that matches ``action`` (a wildcard too) taken out."""
    changed = copy.deepcopy(policy)
    for statement in statements(changed):
        patterns = listed(statement["Action"])
        statement["Action"] = [p for p in patterns if not fnmatch.fnmatchcase(action.lower(), p.lower())]
    return changed


def resource_schema(resource_type: str) -> dict[str, Any]:
    """The resource provider schema of ``resource_type`` that cfn-lint ships."""
    schemas = Path(cfnlint.__file__).parent / "data" / "schemas"
    digest = json.loads((schemas / "providers" / "us-east-1.json").read_text())[resource_type]
    schema: dict[str, Any] = json.loads((schemas / "resources" / f"{digest}.json").read_text())
    return schema


def handler_permissions(resource_type: str) -> dict[str, set[str]]:
    """The permissions CloudFormation's handlers of ``resource_type`` use, by handler (``create``, ``delete``, ...)."""
    return {name: set(handler["permissions"]) for name, handler in resource_schema(resource_type)["handlers"].items()}


class TemplateLoader(yaml.SafeLoader):
    """YAML for CloudFormation templates: their short-form intrinsic functions (``!Ref``, ``!Sub``...) load as None."""


TemplateLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def template_resource_types() -> list[str]:
    """The resource types the CloudFormation templates declare."""
    return sorted(
        {
            resource["Type"]
            for path in TEMPLATES
            for resource in yaml.load(path.read_text(), Loader=TemplateLoader)["Resources"].values()
        }
    )


def representative_actions() -> list[str]:
    """One action of each service the worker scan found (the first by name): the negative test's cases."""
    by_service: dict[str, str] = {}
    for action in sorted(scan_for("dtp-worker-policy.json").actions):
        by_service.setdefault(action.split(":")[0], action)
    return sorted(by_service.values())


# --- tests ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_policy_is_a_valid_managed_policy(path: Path) -> None:
    policy = json.loads(path.read_text())
    assert policy["Version"] == "2012-10-17"
    sids = [statement.get("Sid") for statement in statements(policy)]
    assert all(sids) and len(set(sids)) == len(sids), f"every statement needs a Sid of its own: {sids}"
    for statement in statements(policy):
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource", "Condition"}, statement["Sid"]
        assert statement["Effect"] in ("Allow", "Deny"), statement["Sid"]
        assert statement["Action"] and statement["Resource"], statement["Sid"]
        for action in listed(statement["Action"]):
            assert re.fullmatch(r"[a-z0-9-]+:[A-Za-z0-9*]+", action), f"{statement['Sid']}: {action}"
    assert len(re.sub(r"\s", "", path.read_text())) <= MANAGED_POLICY_CHARS, "over IAM's managed policy size"


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_every_action_exists(path: Path) -> None:
    """Each action without a wildcard is an operation of its service (or a known permission-only action): a typo
    in an action no scan exercises would otherwise go unseen."""
    unknown = []
    for statement in statements(json.loads(path.read_text())):
        for action in listed(statement["Action"]):
            prefix, _, name = action.partition(":")
            known = operations(PREFIX_SERVICES.get(prefix, prefix)).values()
            if "*" not in action and action not in PERMISSION_ONLY and name not in known:
                unknown.append(action)
    assert unknown == []


@pytest.mark.parametrize("policy", SCANNED_POLICIES)
def test_scan_maps_every_call(policy: str) -> None:
    """Every client attribute, provider method and getattr the scan meets maps to IAM actions."""
    assert scan_for(policy).problems == []


@pytest.mark.parametrize("policy", SCANNED_POLICIES)
def test_policy_allows_every_call(policy: str) -> None:
    assert missing(load(policy), needed(scan_for(policy))) == []


@pytest.mark.parametrize("policy", SCANNED_POLICIES)
def test_roles_are_passed_to_the_services_that_take_them(policy: str) -> None:
    """An operation whose request names a role needs iam:PassRole for that service."""
    passing = allowing(load(policy), "iam:PassRole")
    for action in sorted(scan_for(policy).actions & PASSED_ROLES.keys()):
        for service in PASSED_ROLES[action]:
            assert any(service in condition_values(s, "iam:PassedToService") for s in passing), (action, service)


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_roles_are_passed_only_to_named_services(path: Path) -> None:
    for statement in allowing(json.loads(path.read_text()), "iam:PassRole"):
        assert condition_values(statement, "iam:PassedToService"), statement["Sid"]


@pytest.mark.parametrize("policy", SCANNED_POLICIES)
def test_roles_are_passed_only_if_named_as_dtps(policy: str) -> None:
    """iam:PassRole is on the roles of DTP's prefix only (on any role, the worker could hand an admin's to an instance
    it starts and read its credentials there), the prefix every setting that names a passed role requires
    (``dtp.naming.passed_role_problem``)."""
    resources = {r for s in allowing(load(policy), "iam:PassRole") for r in listed(s["Resource"])}
    denying = [s for s in statements(load(policy)) if s["Effect"] == "Deny"]
    assert resources == {PASSED_ROLES_ARN}
    assert [(listed(s["Action"]), s["Resource"], s.get("Condition")) for s in denying] == [
        (["iam:PassRole"], PATHED_ROLES_ARN, None)
    ]


@pytest.mark.parametrize("policy", SCANNED_POLICIES)
@pytest.mark.parametrize("role", PASSABLE_ROLES)
def test_roles_are_passed_only_if_named_as_dtps_with_no_path(policy: str, role: str) -> None:
    """A role is passable exactly when its name starts with DTP's prefix and it has no path, as the settings that name
    it require (``dtp.naming.passed_role_problem``): the Allow on role/dtp-* alone would also pass a role Admin on the
    path /dtp-ops/ (role/dtp-ops/Admin), which a Deny on role/dtp-*/* stops. It is passable to the services of the
    operations that pass roles (``PASSED_ROLES``), and to no other."""
    passing = scan_for(policy).actions & PASSED_ROLES.keys()
    services = {service for action in passing for service in PASSED_ROLES[action]}
    arn = f"arn:aws:iam::123456789012:role/{role}"
    passable = PASSABLE_ROLES[role]
    assert (passed_role_problem(arn) is None) == passable
    for service in sorted(services | {"lambda.amazonaws.com"}):
        context = {"iam:PassedToService": service}
        assert allows(load(policy), "iam:PassRole", arn, context) == (passable and service in services), service


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_tag_conditions_name_dtps_owner_tag(path: Path) -> None:
    """Every tag condition is on the owner tag DTP puts on what it creates (``dtp.naming.resource_tags``)."""
    for statement in statements(json.loads(path.read_text())):
        for test in statement.get("Condition", {}).values():
            for key, value in test.items():
                if key.startswith(("aws:ResourceTag/", "aws:RequestTag/")):
                    assert (key.partition("/")[2], value) == (OWNER_TAG, OWNER), statement["Sid"]


def test_worker_policy_tags_ec2_resources_as_it_creates_them_or_once_they_are_dtps() -> None:
    """ec2:CreateTags is allowed within the calls that create the template's resources (ec2:CreateAction: their
    schemas say CloudFormation tags them as it creates them), or on what carries DTP's owner tag already (an AMI
    packer tagged, a NAT gateway's address): were it allowed on anything, the worker could tag any resource as DTP's
    and then delete it."""
    policy = load("dtp-worker-policy.json")
    tagged = [resource_type for resource_type, (create, _) in RESOURCE_ACTIONS.items() if "ec2:CreateTags" in create]
    assert all(resource_schema(resource_type)["tagging"]["tagOnCreate"] for resource_type in tagged)
    tagged_on_create = {RESOURCE_ACTIONS[resource_type][0][0] for resource_type in tagged}
    tagging = allowing(policy, "ec2:CreateTags")
    for statement in tagging:
        creating = condition_values(statement, "ec2:CreateAction")
        assert creating or condition_values(statement, f"aws:ResourceTag/{OWNER_TAG}") == [OWNER], statement["Sid"]
        assert not creating or {f"ec2:{action}" for action in creating} == tagged_on_create, statement["Sid"]
    assert any(condition_values(s, "ec2:CreateAction") for s in tagging) and missing(policy, tagged_on_create) == []


def test_worker_policy_grants_only_what_dtp_needs() -> None:
    """Each action the worker policy grants (a wildcard: an action it matches) is one the scan found, one
    CloudFormation takes for the templates' resources, or one of GRANTED_UNSCANNED: what no code calls, such as EKS
    access entries (with which the worker could make itself any cluster's admin), is not granted."""
    needs = needed(scan_for("dtp-worker-policy.json")) | {
        action for create, delete in RESOURCE_ACTIONS.values() for action in (*create, *delete)
    }
    granted = {
        action for statement in statements(load("dtp-worker-policy.json")) for action in listed(statement["Action"])
    }
    unneeded = [
        pattern
        for pattern in sorted(granted)
        if not any(fnmatch.fnmatchcase(action.lower(), pattern.lower()) for action in needs)
    ]
    assert unneeded == sorted(GRANTED_UNSCANNED)


@pytest.mark.parametrize("resource_type", template_resource_types())
def test_cloudformation_can_create_and_delete(resource_type: str) -> None:
    """CloudFormation creates and deletes the template's resources with the worker's permissions."""
    assert resource_type in RESOURCE_ACTIONS, f"add {resource_type} to RESOURCE_ACTIONS"
    create, delete = RESOURCE_ACTIONS[resource_type]
    handlers = handler_permissions(resource_type)
    assert set(create) <= handlers["create"] and set(delete) <= handlers["delete"], "not what CloudFormation calls"
    assert missing(load("dtp-worker-policy.json"), {*create, *delete}) == []


def test_parallelcluster_policy_attaches_what_the_cluster_config_names() -> None:
    """pcluster creates the cluster's roles and attaches the config's AdditionalIamPolicies, and the FSx for Lustre
    file system of a run without one."""
    policy = load("dtp-parallelcluster-policy.json")
    attachable = [arn for s in allowing(policy, "iam:AttachRolePolicy") for arn in condition_values(s, "iam:PolicyARN")]
    for arn in re.findall(r"Policy: (arn:\S+)", PCLUSTER_CONFIG.read_text()):
        assert any(fnmatch.fnmatchcase(arn, pattern) for pattern in attachable), arn
    assert missing(policy, {"iam:CreateRole", "fsx:CreateFileSystem", "fsx:DeleteFileSystem"}) == []


@pytest.mark.parametrize("action", representative_actions())
def test_policy_without_an_action_fails_the_check(action: str) -> None:
    """The check against a copy of the worker policy lacking one action (wildcards that match it too) names it."""
    assert action in missing(
        without(load("dtp-worker-policy.json"), action), needed(scan_for("dtp-worker-policy.json"))
    )


NEW_CALLS = """
from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from dtp.hooks.stacks import StackHook


def protect(bucket: str, stacks: StackHook) -> None:
    S3Hook(aws_conn_id="aws_default").get_conn().put_bucket_policy(Bucket=bucket, Policy="{}")
    stacks.conn.update_termination_protection(StackName=bucket, EnableTerminationProtection=True)
"""


def test_a_new_boto3_call_needs_the_policy() -> None:
    """New calls, on a client from a provider hook and on one from DTP's StackHook passed as an argument, are found
    and are missing from the worker policy: the check fails until the policy allows them."""
    scan = Scan(read_sources([PLUGINS / "hooks" / "stacks.py"]) | {"dtp.new": NEW_CALLS})
    assert {"s3:PutBucketPolicy", "cloudformation:UpdateTerminationProtection"} <= scan.actions
    assert {"s3:PutBucketPolicy", "cloudformation:UpdateTerminationProtection"} <= set(
        missing(load("dtp-worker-policy.json"), scan.actions)
    )


UNMAPPABLE_CALLS = """
from airflow.providers.amazon.aws.hooks.s3 import S3Hook


def unmappable(name: str) -> None:
    s3 = S3Hook(aws_conn_id="aws_default")
    s3.conn.no_such_operation()
    getattr(s3.conn, name)()
    s3.load_bytes(b"", "key", "bucket")
    s3.no_such_method()
"""


def test_a_call_the_scan_cannot_map_is_a_problem() -> None:
    problems = Scan({"dtp.new": UNMAPPABLE_CALLS}).problems
    assert sorted(p.split(": ", 1)[1] for p in problems) == [
        "S3Hook has no method no_such_method",
        "S3Hook.load_bytes is not in PROVIDER_METHODS",
        "a s3 client has no operation no_such_operation",
        "getattr(s3 client, name) is not in DYNAMIC_CALLS",
    ]
