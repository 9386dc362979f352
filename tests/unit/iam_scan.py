"""The static scan behind test_iam_policy.py: the boto3 client operations DTP's sources call, found on what
``iam_inference`` says their names hold, mapped to IAM actions through botocore's service model and the tables of
``iam_tables``."""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path

import botocore.session
from airflow.providers.amazon.aws import waiters as provider_waiters
from botocore import xform_name
from botocore.exceptions import DataNotFoundError
from iam_inference import Client, Function, Instance, KindInference
from iam_tables import (
    ACTION_EXCEPTIONS,
    BOTO3_METHODS,
    CLIENT_PLUMBING,
    DYNAMIC_CALLS,
    PLUGINS,
    PROVIDER_CLASSES,
    PROVIDER_METHODS,
    ROOT,
    UNFOLLOWED,
)

import dtp.hooks as dtp_hooks

SESSION = botocore.session.get_session()
# The amazon provider's modules whose classes (operators, sensors, triggers) call AWS themselves.
PROVIDER_CLASS_MODULES = re.compile(r"airflow\.providers\.amazon\.aws\.(operators|sensors|triggers)\b")


@cache
def operations(service: str) -> dict[str, str]:
    """boto3's method name of each of ``service``'s operations, to the operation's name."""
    return {xform_name(name): name for name in SESSION.get_service_model(service).operation_names}


@cache
def waiters(service: str) -> dict[str, str]:
    """The waiters of a ``service`` client or hook, to the operation each polls: botocore's (by boto3's names), the
    amazon provider's own, which a hook's ``get_waiter`` looks up first, and DTP's hooks' own (``dtp/hooks/waiters``,
    their ``waiter_path``)."""
    try:
        model = SESSION.get_waiter_model(service)
        found = {xform_name(name): model.get_waiter(name).operation for name in model.waiter_names}
    except DataNotFoundError:
        found = {}
    for folder in (Path(provider_waiters.__file__).parent, Path(dtp_hooks.__file__).parent / "waiters"):
        custom = folder / f"{service}.json"
        if custom.exists():
            found |= {name: w["operation"] for name, w in json.loads(custom.read_text())["waiters"].items()}
    return found


def iam_actions(service: str, operation: str) -> tuple[str, ...]:
    """The IAM actions that authorize ``service``'s ``operation``: ``<signing name>:<operation>`` unless
    ``ACTION_EXCEPTIONS`` says otherwise."""
    action = f"{SESSION.get_service_model(service).signing_name}:{operation}"
    return ACTION_EXCEPTIONS.get(action, (action,))


class Scan:
    """The IAM actions a set of Python modules needs, found by following boto3 clients through them.

    What each name may hold comes from a ``KindInference`` of the modules. Then every attribute of a client, every
    ``get_paginator``, ``get_waiter`` or ``getattr`` on one, every call of an amazon provider method and every
    provider operator, sensor or trigger imported is mapped to IAM actions (``actions``), or to a line of
    ``problems`` where it cannot be.

    :param sources: module name (``dtp.reaper``, ``dags.reaper``) -> its Python source
    """

    def __init__(self, sources: dict[str, str]) -> None:
        self.inference = KindInference(sources)
        self.actions: set[str] = set()
        self.problems: list[str] = []
        for scope, (module, _) in self.inference.scopes.items():
            if isinstance(scope, ast.Module):
                self._provider_classes(module, scope)
        for scope in self.inference.scopes:
            self._collect(scope)

    def _provider_classes(self, module: str, tree: ast.Module) -> None:
        """Count what the provider operators, sensors and triggers ``module`` imports call."""
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and PROVIDER_CLASS_MODULES.match(node.module):
                for alias in node.names:
                    if alias.name in PROVIDER_CLASSES:
                        self.actions.update(PROVIDER_CLASSES[alias.name])
                    else:
                        self.problems.append(f"{module}: the provider's {alias.name} is not in PROVIDER_CLASSES")

    def _collect(self, scope: ast.AST) -> None:
        """Map every client attribute and provider method call of ``scope`` to IAM actions (or to a problem)."""
        for node in self.inference.nodes(scope):
            where = f"{self.inference.scopes[scope][0]}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute):
                for kind in self.inference.kinds(node.value, scope):
                    if isinstance(kind, Client):
                        self._client_attribute(kind.service, node.attr, where)
                    elif node.attr in UNFOLLOWED:
                        self.problems.append(f"{where}: {kind.name}.{node.attr} gives what this scan cannot follow")
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("get_paginator", "get_waiter"):
                for kind in self.inference.kinds(func.value, scope):
                    if kind.service:
                        self._named_operation(kind.service, func.attr, node.args[0] if node.args else None, where)
            elif isinstance(func, ast.Attribute):
                for kind in self.inference.kinds(func.value, scope):
                    if isinstance(kind, Instance):
                        self._method_call(kind, func.attr, where)
            elif isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) >= 2:
                for kind in self.inference.kinds(node.args[0], scope):
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
        own = (item for cls in self.inference.lineage(kind.name) for item in cls.body)
        if any(isinstance(item, Function) and item.name == method for item in own):
            return
        provider = self.inference.provider_base(kind.name)
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
