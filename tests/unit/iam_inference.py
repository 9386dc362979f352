"""What each name of DTP's sources may hold, for the IAM scan (``iam_scan``): boto3 clients and instances of DTP's
and the amazon provider's classes, followed through the provider's hooks, local names, ``self`` attributes,
properties and function arguments."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsGenericHook

Function = ast.FunctionDef | ast.AsyncFunctionDef


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


class KindInference:
    """The kinds of object (a boto3 client, an instance of a known class) each name of a set of Python modules may
    hold.

    A scope is a module (its statements outside functions, class bodies included) or a function at module level or
    directly in a class, with whatever is nested in it. Each scope has an environment: the kinds of object each of
    its names may hold, from annotations, assignments and the arguments its callers pass, inferred until nothing
    changes.

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
        self._resolving: set[tuple[str, str]] = set()
        self._services: dict[str, str | None] = {}
        for module, source in sources.items():
            self._index(module, ast.parse(source))
        self._infer()

    # --- indexing ---------------------------------------------------------------------------------------------------
    def _index(self, module: str, tree: ast.Module) -> None:
        """Record the module's scopes, functions, classes (with what their properties return and their methods
        assign to ``self``) and imports, with the objects of those from the amazon provider."""
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
                    name = alias.asname or alias.name
                    self.imports[module][name] = f"{node.module}.{alias.name}"
                    if node.module.startswith("airflow.providers.amazon"):
                        self.provider[name] = getattr(importlib.import_module(node.module), alias.name)

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
