"""The static scan behind test_iam_policy.py: the boto3 client operations DTP's sources call, followed through the
amazon provider's hooks, local names, ``self`` attributes, properties and function arguments, mapped to IAM actions
through botocore's service model and the tables of ``iam_tables``."""

from __future__ import annotations

import ast
import importlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import botocore.session
from airflow.providers.amazon.aws import waiters as provider_waiters
from airflow.providers.amazon.aws.hooks.base_aws import AwsGenericHook
from botocore import xform_name
from botocore.exceptions import DataNotFoundError
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
