"""docs/iam: the IAM policies DTP ships allow every AWS call DTP's code makes.

``dtp-worker-policy.json`` is checked against a static scan (``ast``) of what the Airflow workers run: the DAG files
and ``plugins/dtp``, less the local stack (never on AWS) and the MWAA deploy tool, whose own scan is checked against
``dtp-mwaa-deploy-policy.json``. The scan follows boto3 clients from where DTP gets them (an amazon provider hook's
``conn``, ``get_conn()`` or ``client``; ``AwsBaseHook(client_type=...)``; DTP's hooks built on those) through local
names, ``self`` attributes, properties and function arguments, and maps every operation asked of a client (called,
passed on as a bound method, or named to ``get_paginator``, ``get_waiter`` or ``getattr``) to its IAM action through
botocore's service model. What the scan cannot see through is listed in the small tables below. A call it cannot map
(an unknown client attribute, an unlisted provider hook method, an unlisted ``getattr``) fails the test instead of
being skipped, so a new boto3 call either shows up as an action the policy must allow or as a table to extend.

The network template's resource types are checked too: CloudFormation creates and deletes them with the caller's
permissions, and the actions listed for each are checked against the handler permissions of the resource provider
schemas that cfn-lint ships.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import importlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import botocore.session
import cfnlint
import pytest
import yaml
from airflow.providers.amazon.aws import waiters as provider_waiters
from airflow.providers.amazon.aws.hooks.base_aws import AwsGenericHook
from botocore import xform_name
from botocore.exceptions import DataNotFoundError

from dtp.naming import OWNER, PREFIX, TAG_PREFIX

ROOT = Path(__file__).resolve().parents[2]
IAM_DIR = ROOT / "docs" / "iam"
PLUGINS = ROOT / "plugins" / "dtp"
WORKER_SOURCES = sorted(
    [
        *(ROOT / "dags").glob("*.py"),
        *(p for p in PLUGINS.rglob("*.py") if p.relative_to(PLUGINS).parts[0] not in {"local", "deploy"}),
    ]
)
DEPLOY_SOURCES = [PLUGINS / "deploy" / "mwaa.py"]
TEMPLATES = sorted((ROOT / "include" / "templates" / "cloudformation").glob("*.yaml"))
PCLUSTER_CONFIG = ROOT / "include" / "templates" / "parallelcluster" / "cluster-config.yaml.j2"
OWNER_TAG = f"{TAG_PREFIX}owner"
# IAM's limit on a managed policy, whitespace not counted.
MANAGED_POLICY_CHARS = 6144

# IAM actions that are not named "<signing name>:<operation>" (the Service Authorization Reference's tables).
ACTION_EXCEPTIONS: dict[str, tuple[str, ...]] = {
    "s3:HeadBucket": ("s3:ListBucket",),
    "s3:HeadObject": ("s3:GetObject",),
    "s3:ListObjectsV2": ("s3:ListBucket",),
    "s3:ListObjectVersions": ("s3:ListBucketVersions",),
    "s3:ListBuckets": ("s3:ListAllMyBuckets",),
    "s3:DeleteObjects": ("s3:DeleteObject", "s3:DeleteObjectVersion"),  # per key, by version when one is given
    "s3:CopyObject": ("s3:GetObject", "s3:PutObject"),
    # The Resource Groups Tagging API signs as "tagging", is authorized as "tag", and tags a bucket through S3.
    "tagging:TagResources": ("tag:TagResources", "s3:GetBucketTagging", "s3:PutBucketTagging"),
}
# Methods of the amazon provider's hooks that DTP calls, and what they call (the scan sees the hook, not its client).
PROVIDER_METHODS: dict[str, tuple[str, ...]] = {
    "S3Hook.check_for_bucket": ("s3:ListBucket",),  # HeadBucket
    "S3Hook.create_bucket": ("s3:CreateBucket",),
    "S3Hook.delete_bucket": ("s3:DeleteBucket",),
    "S3Hook.put_bucket_tagging": ("s3:PutBucketTagging",),
    "S3Hook.check_for_key": ("s3:GetObject",),  # HeadObject
    "S3Hook.head_object": ("s3:GetObject",),
    "S3Hook.read_key": ("s3:GetObject",),
    "S3Hook.list_keys": ("s3:ListBucket",),
    "S3Hook.iter_file_metadata": ("s3:ListBucket",),
    "S3Hook.load_file": ("s3:PutObject",),
    "S3Hook.load_string": ("s3:PutObject",),
    "S3Hook.copy_object": ("s3:GetObject", "s3:PutObject"),
    "S3Hook.delete_objects": ("s3:DeleteObject",),
    "S3Hook.generate_presigned_url": ("s3:GetObject",),  # the URL reads with its signer's permissions
    "S3Hook.parse_s3_url": (),
    "SsmHook.get_parameter_value": ("ssm:GetParameter",),
    "EksHook.generate_config_file_with_credentials": ("eks:DescribeCluster",),
    # The token buildah and the local platform push and pull images with, through ECR's registry API.
    "EcrHook.get_temporary_credentials": (
        "ecr:GetAuthorizationToken",
        "ecr:BatchCheckLayerAvailability",
        "ecr:InitiateLayerUpload",
        "ecr:UploadLayerPart",
        "ecr:CompleteLayerUpload",
        "ecr:PutImage",
        "ecr:BatchGetImage",
        "ecr:GetDownloadUrlForLayer",
    ),
}
# The amazon provider's operators, sensors and triggers DTP uses (subclassed or deferred to), and what they call.
PROVIDER_CLASSES: dict[str, tuple[str, ...]] = {
    "BatchOperator": ("batch:SubmitJob", "batch:DescribeJobs", "batch:TerminateJob"),  # on_kill terminates
    "BatchJobTrigger": ("batch:DescribeJobs",),
    "CloudFormationCreateStackSensor": ("cloudformation:DescribeStacks",),
}
# boto3's own methods of an S3 client (s3transfer): no operation of the service model.
BOTO3_METHODS: dict[str, tuple[str, ...]] = {
    "s3.download_file": ("s3:GetObject",),
    "s3.upload_file": ("s3:PutObject",),
}
# getattr(client, <expression>): the operations each expression (as ast.unparse writes it) names.
DYNAMIC_CALLS: dict[str, tuple[str, ...]] = {
    "f'describe_{kind}s'": ("describe_compute_environments", "describe_job_queues"),  # dtp.platforms.batch
    "f'update_{kind}'": ("update_compute_environment", "update_job_queue"),
    "f'delete_{kind}'": ("delete_compute_environment", "delete_job_queue"),
    "operation": ("describe_data_repository_associations", "describe_data_repository_tasks"),  # FsxHook._described
}
# Operations DTP calls with tags: AWS authorizes the tags with the service's tagging action too.
TAG_ON_CREATE: dict[str, str] = {
    "sagemaker:CreateCluster": "sagemaker:AddTags",
    "batch:CreateComputeEnvironment": "batch:TagResource",
    "batch:CreateJobQueue": "batch:TagResource",
    "batch:RegisterJobDefinition": "batch:TagResource",
    "ecr:CreateRepository": "ecr:TagResource",
    "fsx:CreateDataRepositoryTask": "fsx:TagResource",
    "cloudformation:CreateStack": "cloudformation:TagResource",
    "airflow:CreateEnvironment": "airflow:TagResource",
}
# Operations whose request names an IAM role, and the services it is passed to (iam:PassedToService).
PASSED_ROLES: dict[str, tuple[str, ...]] = {
    "sagemaker:CreateCluster": ("sagemaker.amazonaws.com",),  # the instance groups' execution role
    "batch:CreateComputeEnvironment": ("batch.amazonaws.com", "ec2.amazonaws.com"),  # service and instance role
    "airflow:CreateEnvironment": ("airflow.amazonaws.com",),
    "airflow:UpdateEnvironment": ("airflow.amazonaws.com",),
}
# What CloudFormation calls, with the caller's permissions, to create and to delete each resource type the templates
# declare (for the properties they set; tags are the stack's, which CloudFormation puts on every resource).
RESOURCE_ACTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "AWS::EC2::VPC": (
        ("ec2:CreateVpc", "ec2:ModifyVpcAttribute", "ec2:CreateTags", "ec2:DescribeVpcs", "ec2:DescribeVpcAttribute"),
        ("ec2:DeleteVpc", "ec2:DescribeVpcs"),
    ),
    "AWS::EC2::InternetGateway": (
        ("ec2:CreateInternetGateway", "ec2:CreateTags", "ec2:DescribeInternetGateways"),
        ("ec2:DeleteInternetGateway", "ec2:DescribeInternetGateways"),
    ),
    "AWS::EC2::VPCGatewayAttachment": (
        ("ec2:AttachInternetGateway", "ec2:DescribeInternetGateways"),
        ("ec2:DetachInternetGateway", "ec2:DescribeInternetGateways"),
    ),
    "AWS::EC2::EIP": (
        ("ec2:AllocateAddress", "ec2:CreateTags", "ec2:DescribeAddresses"),
        ("ec2:ReleaseAddress", "ec2:DisassociateAddress", "ec2:DescribeAddresses"),
    ),
    "AWS::EC2::NatGateway": (
        ("ec2:CreateNatGateway", "ec2:CreateTags", "ec2:DescribeNatGateways"),
        ("ec2:DeleteNatGateway", "ec2:DescribeNatGateways"),
    ),
    "AWS::EC2::SecurityGroup": (
        (
            "ec2:CreateSecurityGroup",
            "ec2:AuthorizeSecurityGroupIngress",
            "ec2:AuthorizeSecurityGroupEgress",
            "ec2:RevokeSecurityGroupEgress",
            "ec2:CreateTags",
            "ec2:DescribeSecurityGroups",
        ),
        ("ec2:DeleteSecurityGroup", "ec2:DescribeSecurityGroups", "ec2:DescribeInstances"),
    ),
    "AWS::EC2::SecurityGroupIngress": (
        ("ec2:AuthorizeSecurityGroupIngress", "ec2:DescribeSecurityGroupRules"),
        ("ec2:RevokeSecurityGroupIngress", "ec2:DescribeSecurityGroupRules"),
    ),
    "AWS::EC2::SecurityGroupEgress": (
        ("ec2:AuthorizeSecurityGroupEgress", "ec2:DescribeSecurityGroupRules"),
        ("ec2:RevokeSecurityGroupEgress", "ec2:DescribeSecurityGroupRules"),
    ),
    "AWS::EC2::Subnet": (
        ("ec2:CreateSubnet", "ec2:ModifySubnetAttribute", "ec2:CreateTags", "ec2:DescribeSubnets"),
        ("ec2:DeleteSubnet", "ec2:DescribeSubnets"),
    ),
    "AWS::EC2::RouteTable": (
        ("ec2:CreateRouteTable", "ec2:CreateTags", "ec2:DescribeRouteTables"),
        ("ec2:DeleteRouteTable", "ec2:DescribeRouteTables"),
    ),
    "AWS::EC2::Route": (
        ("ec2:CreateRoute", "ec2:DescribeRouteTables", "ec2:DescribeNetworkInterfaces"),
        ("ec2:DeleteRoute", "ec2:DescribeRouteTables"),
    ),
    "AWS::EC2::SubnetRouteTableAssociation": (
        ("ec2:AssociateRouteTable", "ec2:DescribeSubnets", "ec2:DescribeRouteTables"),
        ("ec2:DisassociateRouteTable", "ec2:DescribeSubnets", "ec2:DescribeRouteTables"),
    ),
    "AWS::S3::Bucket": (
        ("s3:CreateBucket", "s3:PutBucketPublicAccessBlock", "s3:PutBucketTagging", "s3:ListBucket"),
        ("s3:DeleteBucket", "s3:ListBucket"),
    ),
}
# Attributes of a boto3 client that are no operation and call none.
CLIENT_PLUMBING = frozenset({"get_paginator", "get_waiter", "can_paginate", "exceptions", "meta", "close"})
# The provider's hooks hand out clients or sessions this scan does not follow: using one fails the scan.
UNFOLLOWED = frozenset({"async_conn", "get_async_conn", "get_session", "get_resource_type"})
Function = ast.FunctionDef | ast.AsyncFunctionDef
SESSION = botocore.session.get_session()


@dataclass(frozen=True)
class Client:
    """A boto3 client of ``service`` (botocore's name for it)."""

    service: str


@dataclass(frozen=True)
class Instance:
    """An instance of the class ``name``, DTP's or the amazon provider's; ``service`` is its client's when it is an
    AWS hook."""

    name: str
    service: str | None


Kind = Client | Instance


@cache
def operations(service: str) -> dict[str, str]:
    """boto3's method name of each of ``service``'s operations, to the operation's name."""
    return {xform_name(name): name for name in SESSION.get_service_model(service).operation_names}


@cache
def waiters(service: str) -> dict[str, str]:
    """The waiters of a ``service`` client or hook, to the operation each polls: botocore's (by boto3's names) and
    the amazon provider's own, which a hook's ``get_waiter`` looks up first."""
    try:
        model = SESSION.get_waiter_model(service)
        found = {xform_name(name): model.get_waiter(name).operation for name in model.waiter_names}
    except DataNotFoundError:
        found = {}
    custom = Path(provider_waiters.__file__).parent / f"{service}.json"
    if custom.exists():
        found |= {name: w["operation"] for name, w in json.loads(custom.read_text())["waiters"].items()}
    return found


def iam_actions(service: str, operation: str) -> tuple[str, ...]:
    """The IAM actions that authorize ``service``'s ``operation``: ``<signing name>:<operation>`` unless
    ``ACTION_EXCEPTIONS`` says otherwise."""
    action = f"{SESSION.get_service_model(service).signing_name}:{operation}"
    return ACTION_EXCEPTIONS.get(action, (action,))


@cache
def provider_service(cls: Any) -> str | None:
    """The boto3 service of an amazon provider hook class; None for any other class (and for ``AwsBaseHook``,
    whose service its ``client_type`` argument names)."""
    if not (isinstance(cls, type) and issubclass(cls, AwsGenericHook)):
        return None
    hook = cls()
    return hook.client_type or hook.resource_type


def assignments(node: ast.AST) -> Iterator[tuple[str, ast.expr]]:
    """(name, value) for each name ``node`` assigns (a tuple assigned a tuple, element by element)."""
    if isinstance(node, ast.Assign):
        pairs = [(target, node.value) for target in node.targets]
    elif isinstance(node, ast.AnnAssign | ast.NamedExpr) and node.value is not None:
        pairs = [(node.target, node.value)]
    else:
        return
    while pairs:
        target, value = pairs.pop()
        if isinstance(target, ast.Name):
            yield target.id, value
        elif isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            pairs += zip(target.elts, value.elts, strict=True)


def is_property(function: Function) -> bool:
    """Whether ``function`` is decorated ``@property`` or ``@cached_property``."""
    return any(isinstance(d, ast.Name) and d.id in ("property", "cached_property") for d in function.decorator_list)


class Scan:
    """The IAM actions a set of Python modules needs, found by following boto3 clients through them.

    A scope is a module (its statements outside functions, class bodies included) or a function at module level or
    directly in a class, with whatever is nested in it. Each scope has an environment: the kinds of object (a client,
    an instance of a known class) each of its names may hold, from annotations, assignments and the arguments its
    callers pass, inferred until nothing changes. Then every attribute of a client, every ``get_paginator``,
    ``get_waiter`` or ``getattr`` on one and every call of an amazon provider method is mapped to IAM actions
    (``actions``), or to a line of ``problems`` where it cannot be.

    :param sources: module name (``dtp.reaper``, ``dags.reaper``) -> its Python source
    """

    def __init__(self, sources: dict[str, str]) -> None:
        self.provider: dict[str, Any] = {}  # names imported from the amazon provider -> the objects
        self.imports: dict[str, dict[str, str]] = {}  # module -> imported name -> what it names ("dtp.images.ami")
        self.classes: dict[str, ast.ClassDef] = {}
        self.scopes: dict[ast.AST, tuple[str, str | None]] = {}  # scope -> (module, class of a method)
        self.scope_of: dict[ast.AST, ast.AST] = {}  # every function -> its scope
        self.functions: dict[tuple[str, str], Function] = {}  # (module, name) -> module-level function
        self.nested: dict[tuple[ast.AST, str], Function] = {}  # (scope, name) -> function nested in that scope
        self.methods: set[ast.AST] = set()  # methods called with an implicit first argument
        self.members: dict[tuple[str, str], list[tuple[ast.expr, ast.AST]]] = {}  # (class, attribute) -> values
        self.env: dict[ast.AST, dict[str, set[Kind]]] = {}
        self.actions: set[str] = set()
        self.problems: list[str] = []
        self._resolving: set[tuple[str, str]] = set()
        self._services: dict[str, str | None] = {}
        for module, source in sources.items():
            self._index(module, ast.parse(source))
        self._infer()
        for scope in self.scopes:
            self._collect(scope)

    # --- indexing ---------------------------------------------------------------------------------------------------
    def _index(self, module: str, tree: ast.Module) -> None:
        """Record the module's scopes, functions, classes (with what their properties return and their methods
        assign to ``self``) and imports; count the provider operators, sensors and triggers it imports."""
        self.scopes[tree] = (module, None)
        self.imports[module] = {}
        for statement in tree.body:
            if isinstance(statement, Function):
                self.scopes[statement] = (module, None)
                self.functions[module, statement.name] = statement
            elif isinstance(statement, ast.ClassDef):
                self.classes[statement.name] = statement
                for item in statement.body:
                    if isinstance(item, Function):
                        self._index_method(module, statement.name, item)
        for scope in [s for s, (name, _) in self.scopes.items() if name == module]:
            self.env[scope] = {}
            for node in self.nodes(scope):
                if isinstance(node, Function):
                    self.scope_of[node] = scope
                    self.nested.setdefault((scope, node.name), node)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    self.imports[module][alias.asname or alias.name] = f"{node.module}.{alias.name}"
                    if node.module.startswith("airflow.providers.amazon"):
                        self._import_provider(node.module, alias.name, alias.asname, module)

    def _index_method(self, module: str, cls: str, method: Function) -> None:
        """Record a method as a scope, and what it makes of an attribute: a property's return values, and the values
        it assigns to ``self.<attribute>``."""
        self.scopes[method] = (module, cls)
        if not any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in method.decorator_list):
            self.methods.add(method)
        returns = is_property(method)
        for node in ast.walk(method):
            if returns and isinstance(node, ast.Return) and node.value is not None:
                self.members.setdefault((cls, method.name), []).append((node.value, method))
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and ast.unparse(target.value) == "self":
                        self.members.setdefault((cls, target.attr), []).append((node.value, method))

    def _import_provider(self, source: str, name: str, asname: str | None, module: str) -> None:
        """Record a name imported from the amazon provider; count what a provider operator, sensor or trigger
        calls."""
        self.provider[asname or name] = getattr(importlib.import_module(source), name)
        if re.match(r"airflow\.providers\.amazon\.aws\.(operators|sensors|triggers)\b", source):
            if name in PROVIDER_CLASSES:
                self.actions.update(PROVIDER_CLASSES[name])
            else:
                self.problems.append(f"{module}: the provider's {name} is not in PROVIDER_CLASSES")

    def nodes(self, scope: ast.AST) -> Iterator[ast.AST]:
        """Every node of ``scope``: a function's whole subtree; a module's statements outside functions."""
        if not isinstance(scope, ast.Module):
            yield from ast.walk(scope)
            return
        for statement in scope.body:
            for item in statement.body if isinstance(statement, ast.ClassDef) else [statement]:
                if not isinstance(item, Function | ast.ClassDef):
                    yield from ast.walk(item)

    # --- inference --------------------------------------------------------------------------------------------------
    def _infer(self) -> None:
        """Fill the environments from annotations, assignments and call arguments until they stop changing."""
        assigned: list[tuple[ast.AST, str, ast.expr]] = []
        calls: list[tuple[ast.AST, ast.Call]] = []
        for scope in self.scopes:
            for node in self.nodes(scope):
                if isinstance(node, ast.arg) and node.annotation is not None:
                    self._add(scope, node.arg, self._annotated(node.annotation))
                assigned += [(scope, name, value) for name, value in assignments(node)]
                if isinstance(node, ast.Call):
                    calls.append((scope, node))
        changed = True
        while changed:
            changed = False
            for scope, name, value in assigned:
                changed |= self._add(scope, name, self.kinds(value, scope))
            for scope, call in calls:
                for function, parameter, value in self._bindings(call, scope):
                    changed |= self._add(self.scope_of[function], parameter, self.kinds(value, scope))

    def _add(self, scope: ast.AST, name: str, kinds: set[Kind]) -> bool:
        """Add ``kinds`` to what ``name`` may hold in ``scope``; whether that added anything."""
        known = self.env[scope].setdefault(name, set())
        if kinds <= known:
            return False
        known |= kinds
        return True

    def _annotated(self, annotation: ast.expr) -> set[Kind]:
        """The kinds an annotation names: a class (``S3Hook``, ``"S3Hook"``), or either side of ``X | None``."""
        if isinstance(annotation, ast.BinOp):
            return self._annotated(annotation.left) | self._annotated(annotation.right)
        name = annotation.id if isinstance(annotation, ast.Name) else getattr(annotation, "value", None)
        return {self.instance(name)} if name in self.classes or name in self.provider else set()

    def _callees(self, call: ast.Call, scope: ast.AST) -> list[Function]:
        """The functions ``call`` may call: by name, one nested in the scope, or the module's, or the one it
        imports; as ``module.name``, that module's; as ``receiver.name``, the methods of the receiver's classes."""
        module, func = self.scopes[scope][0], call.func
        if isinstance(func, ast.Name):
            source, _, name = self.imports[module].get(func.id, "").rpartition(".")
            found = (
                self.nested.get((scope, func.id))
                or self.functions.get((module, func.id))
                or self.functions.get((source, name))
            )
            return [found] if found else []
        if not isinstance(func, ast.Attribute):
            return []
        if isinstance(func.value, ast.Name) and (self.imports[module].get(func.value.id), func.attr) in self.functions:
            return [self.functions[self.imports[module][func.value.id], func.attr]]
        return [
            item
            for kind in self.kinds(func.value, scope)
            if isinstance(kind, Instance)
            for cls in self.lineage(kind.name)
            for item in cls.body
            if isinstance(item, Function) and item.name == func.attr
        ]

    def _bindings(self, call: ast.Call, scope: ast.AST) -> Iterator[tuple[Function, str, ast.expr]]:
        """(function, parameter, argument) for each function ``call`` may call and each argument it passes."""
        for function in self._callees(call, scope):
            args = function.args
            positional = [a.arg for a in args.posonlyargs + args.args]
            if isinstance(call.func, ast.Attribute) and function in self.methods:
                positional = positional[1:]
            for parameter, value in zip(positional, call.args, strict=False):
                if not isinstance(value, ast.Starred):
                    yield function, parameter, value
            named = set(positional) | {a.arg for a in args.kwonlyargs}
            for keyword in call.keywords:
                if keyword.arg is not None and keyword.arg in named:
                    yield function, keyword.arg, keyword.value

    def kinds(self, node: ast.expr, scope: ast.AST) -> set[Kind]:
        """What ``node``, evaluated in ``scope``, may be: clients and instances of known classes."""
        if isinstance(node, ast.Name):
            owner = self.scopes[scope][1]
            return {self.instance(owner)} if node.id == "self" and owner else set(self.env[scope].get(node.id, ()))
        if isinstance(node, ast.Attribute):
            kinds = self.kinds(node.value, scope)
            return {k for kind in kinds if isinstance(kind, Instance) for k in self.attribute(kind, node.attr)}
        if not isinstance(node, ast.Call):
            return set()
        func = node.func
        if isinstance(func, ast.Name) and func.id == "cast" and len(node.args) == 2:
            return self.kinds(node.args[1], scope)
        if isinstance(func, ast.Name) and (func.id in self.classes or func.id in self.provider):
            return {self.instance(func.id, node)}
        if isinstance(func, ast.Attribute) and func.attr in ("get_conn", "get_client_type"):
            return {Client(k.service) for k in self.kinds(func.value, scope) if isinstance(k, Instance) and k.service}
        if ast.unparse(func) == "boto3.client" and node.args and isinstance(node.args[0], ast.Constant):
            return {Client(str(node.args[0].value))}
        return set()

    def instance(self, name: str, call: ast.Call | None = None) -> Instance:
        """An instance of class ``name``; ``AwsBaseHook(client_type="...")`` takes its service from the call."""
        literal = [
            kw.value.value
            for kw in (call.keywords if call else [])
            if kw.arg == "client_type" and isinstance(kw.value, ast.Constant)
        ]
        return Instance(name, str(literal[0]) if literal else self.service(name))

    def service(self, name: str) -> str | None:
        """The boto3 service of class ``name``'s client: a provider hook's, or the ``kwargs["client_type"]`` a DTP
        hook sets in its ``__init__``, or its base class's."""
        if name in self.provider:
            return provider_service(self.provider[name])
        if name not in self._services:
            own = [
                str(getattr(node.value, "value", None))
                for node in ast.walk(self.classes[name])
                if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "kwargs['client_type']"
            ]
            self._services[name] = own[0] if own else next(filter(None, map(self.service, self.bases(name))), None)
        return self._services[name]

    def bases(self, name: str) -> list[str]:
        """The known classes (DTP's or the provider's) among DTP class ``name``'s bases."""
        found = [base.id for base in self.classes[name].bases if isinstance(base, ast.Name)]
        return [base for base in found if base in self.classes or base in self.provider]

    def lineage(self, name: str) -> Iterator[ast.ClassDef]:
        """DTP class ``name`` and its DTP base classes (none for a provider class)."""
        if name in self.classes:
            yield self.classes[name]
            for base in self.bases(name):
                yield from self.lineage(base)

    def provider_base(self, name: str) -> Any:
        """The amazon provider class behind class ``name`` (itself, or its nearest provider base), if any."""
        if name in self.provider:
            return self.provider[name]
        return next(filter(None, map(self.provider_base, self.bases(name))), None) if name in self.classes else None

    def attribute(self, kind: Instance, attr: str) -> set[Kind]:
        """What attribute ``attr`` of an instance may be: a hook's client, what a DTP class's property returns or its
        methods assign to ``self.<attr>``, or an operator's or sensor's ``hook``."""
        if attr in ("conn", "client") and kind.service:
            return {Client(kind.service)}
        if (kind.name, attr) in self._resolving:
            return set()
        self._resolving.add((kind.name, attr))
        found = {
            k
            for cls in self.lineage(kind.name)
            for value, method in self.members.get((cls.name, attr), [])
            for k in self.kinds(value, method)
        }
        self._resolving.discard((kind.name, attr))
        return found | (self._operator_hook(kind.name) if attr == "hook" else set())

    def _operator_hook(self, name: str) -> set[Kind]:
        """The hook of an operator or sensor: its class body's ``aws_hook_class``, else its provider base's."""
        for cls in self.lineage(name):
            for node in cls.body:
                if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "aws_hook_class":
                    return {self.instance(ast.unparse(node.value))}
        hook_class = getattr(self.provider_base(name), "aws_hook_class", None)
        if hook_class is None:
            return set()
        self.provider.setdefault(hook_class.__name__, hook_class)
        return {self.instance(hook_class.__name__)}

    # --- collection -------------------------------------------------------------------------------------------------
    def _collect(self, scope: ast.AST) -> None:
        """Map every client attribute and provider method call of ``scope`` to IAM actions (or to a problem)."""
        for node in self.nodes(scope):
            where = f"{self.scopes[scope][0]}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute):
                for kind in self.kinds(node.value, scope):
                    if isinstance(kind, Client):
                        self._client_attribute(kind.service, node.attr, where)
                    elif node.attr in UNFOLLOWED:
                        self.problems.append(f"{where}: {kind.name}.{node.attr} gives what this scan cannot follow")
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("get_paginator", "get_waiter"):
                for kind in self.kinds(func.value, scope):
                    if kind.service:
                        self._named_operation(kind.service, func.attr, node.args[0] if node.args else None, where)
            elif isinstance(func, ast.Attribute):
                for kind in self.kinds(func.value, scope):
                    if isinstance(kind, Instance):
                        self._method_call(kind, func.attr, where)
            elif isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) >= 2:
                for kind in self.kinds(node.args[0], scope):
                    if isinstance(kind, Client):
                        self._dynamic_call(kind.service, node.args[1], where)

    def _client_attribute(self, service: str, attr: str, where: str) -> None:
        """An attribute of a ``service`` client: an operation (called or passed on), boto3's own, or plumbing."""
        if attr in operations(service):
            self.actions.update(iam_actions(service, operations(service)[attr]))
        elif f"{service}.{attr}" in BOTO3_METHODS:
            self.actions.update(BOTO3_METHODS[f"{service}.{attr}"])
        elif attr not in CLIENT_PLUMBING:
            self.problems.append(f"{where}: a {service} client has no operation {attr}")

    def _named_operation(self, service: str, method: str, name: ast.expr | None, where: str) -> None:
        """``get_paginator(name)`` (named after the operation it pages) or ``get_waiter(name)`` (botocore's waiter
        model names the operation it polls) on a ``service`` client or hook."""
        table = operations(service) if method == "get_paginator" else waiters(service)
        if isinstance(name, ast.Constant) and name.value in table:
            self.actions.update(iam_actions(service, table[name.value]))
        else:
            self.problems.append(f"{where}: {method}({ast.unparse(name) if name else ''}) of {service} is unknown")

    def _dynamic_call(self, service: str, name: ast.expr, where: str) -> None:
        """``getattr(client, name)``: a literal operation, or an expression ``DYNAMIC_CALLS`` lists."""
        names = (name.value,) if isinstance(name, ast.Constant) else DYNAMIC_CALLS.get(ast.unparse(name), ())
        if not names:
            self.problems.append(f"{where}: getattr({service} client, {ast.unparse(name)}) is not in DYNAMIC_CALLS")
        for operation in names:
            self._client_attribute(service, str(operation), where)

    def _method_call(self, kind: Instance, method: str, where: str) -> None:
        """A method call on an instance: DTP's own methods are scanned where they are defined; an amazon provider
        method comes from ``PROVIDER_METHODS``, but for the generic AWS hook's (credentials, region, waiters)."""
        if any(isinstance(item, Function) and item.name == method for c in self.lineage(kind.name) for item in c.body):
            return
        provider = self.provider_base(kind.name)
        definer = next((cls for cls in getattr(provider, "__mro__", ()) if method in vars(cls)), None)
        if provider is not None and definer is None:
            self.problems.append(f"{where}: {provider.__name__} has no method {method}")
        if definer is None or not definer.__module__.startswith("airflow.providers.amazon"):
            return  # no amazon provider code behind it (Airflow's BaseHook, BaseOperator, ...)
        if definer.__name__ in ("AwsGenericHook", "AwsBaseHook"):
            return  # UNFOLLOWED ones are problems already, as attributes
        key = f"{definer.__name__}.{method}"
        if key in PROVIDER_METHODS:
            self.actions.update(PROVIDER_METHODS[key])
        else:
            self.problems.append(f"{where}: {key} is not in PROVIDER_METHODS")


def module_name(path: Path) -> str:
    """The dotted name a source file imports as: ``dtp.hooks.s3`` (``dtp.images`` for its ``__init__``), or
    ``dags.reaper`` for a DAG file."""
    parts = path.relative_to(PLUGINS.parent if PLUGINS in path.parents else ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_sources(paths: list[Path]) -> dict[str, str]:
    """Module name -> source of each file."""
    return {module_name(path): path.read_text() for path in paths}


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


def load(name: str) -> dict[str, Any]:
    """The policy document ``docs/iam/<name>``."""
    policy: dict[str, Any] = json.loads((IAM_DIR / name).read_text())
    return policy


def listed(value: str | list[str]) -> list[str]:
    """A policy element that may be one string or a list of them, as a list."""
    return [value] if isinstance(value, str) else list(value)


def statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    """The policy's statements."""
    found = policy["Statement"]
    return [found] if isinstance(found, dict) else list(found)


def allowing(policy: dict[str, Any], action: str) -> list[dict[str, Any]]:
    """The policy's Allow statements whose Action matches ``action`` (IAM's wildcards, case-insensitive)."""
    return [
        statement
        for statement in statements(policy)
        if statement["Effect"] == "Allow"
        and any(fnmatch.fnmatchcase(action.lower(), pattern.lower()) for pattern in listed(statement["Action"]))
    ]


def missing(policy: dict[str, Any], actions: set[str]) -> list[str]:
    """The ``actions`` no statement of the policy allows."""
    return sorted(action for action in actions if not allowing(policy, action))


def needed(scan: Scan) -> set[str]:
    """The actions a scan found, with the tagging actions of the operations that tag what they create."""
    return scan.actions | {TAG_ON_CREATE[action] for action in scan.actions if action in TAG_ON_CREATE}


def condition_values(statement: dict[str, Any], key: str) -> list[str]:
    """The values a statement's Condition (any operator) gives ``key``."""
    tests = statement.get("Condition", {}).values()
    return [value for test in tests for name, values in test.items() if name == key for value in listed(values)]


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


def handler_permissions(resource_type: str) -> dict[str, set[str]]:
    """The permissions CloudFormation's handlers of ``resource_type`` use, by handler (``create``, ``delete``, ...),
    from the resource provider schema cfn-lint ships."""
    schemas = Path(cfnlint.__file__).parent / "data" / "schemas"
    digest = json.loads((schemas / "providers" / "us-east-1.json").read_text())[resource_type]
    handlers = json.loads((schemas / "resources" / f"{digest}.json").read_text())["handlers"]
    return {name: set(handler["permissions"]) for name, handler in handlers.items()}


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
        assert statement["Effect"] == "Allow" and statement["Action"] and statement["Resource"], statement["Sid"]
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


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_tag_conditions_name_dtps_owner_tag(path: Path) -> None:
    """Every tag condition is on the owner tag DTP puts on what it creates (``dtp.naming.resource_tags``)."""
    for statement in statements(json.loads(path.read_text())):
        for test in statement.get("Condition", {}).values():
            for key, value in test.items():
                if key.startswith(("aws:ResourceTag/", "aws:RequestTag/")):
                    assert (key.partition("/")[2], value) == (OWNER_TAG, OWNER), statement["Sid"]


def test_worker_policy_scopes_deletes_to_dtps_resources() -> None:
    """Deleting what DTP creates by id (network pieces, clusters, FSx tasks) takes its owner tag; what it creates by
    name (stacks, buckets, Batch resources, parameters, repositories) is scoped by the name's prefix."""
    policy = load("dtp-worker-policy.json")
    for action in ("ec2:DeleteVpc", "ec2:ReleaseAddress", "sagemaker:DeleteCluster", "fsx:CancelDataRepositoryTask"):
        assert all(condition_values(s, f"aws:ResourceTag/{OWNER_TAG}") == [OWNER] for s in allowing(policy, action))
    for action in ("cloudformation:DeleteStack", "s3:DeleteBucket", "batch:DeleteComputeEnvironment"):
        resources = [r for s in allowing(policy, action) for r in listed(s["Resource"])]
        assert resources and all(f"/{PREFIX}-" in r or f":::{PREFIX}-" in r for r in resources), (action, resources)


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
