"""Check an AWS request offline against botocore's service model, as the service itself would.

botocore's ``ParamValidator`` checks required members, types, unknown keys and
minimum lengths; the service also enforces enums, patterns and maximums, which
botocore leaves to the server. ``request_problems`` checks both, so a request
DTP would send is known good (or its fault named) before any account sees it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import botocore.session
import regex
from botocore.model import ListShape, MapShape, Shape, StructureShape
from botocore.validate import ParamValidator


@cache
def _service_model(service: str) -> Any:
    return botocore.session.get_session().get_service_model(service)


def enum_values(service: str, shape: str) -> tuple[str, ...]:
    """The values the service model allows for the enum ``shape`` (read on first use, not at import)."""
    return tuple(_service_model(service).shape_for(shape).enum)


def input_shape(service: str, operation: str) -> StructureShape:
    """The request shape of ``operation`` in botocore's model of ``service``."""
    shape: StructureShape = _service_model(service).operation_model(operation).input_shape
    return shape


def request_problems(service: str, operation: str, params: dict[str, Any]) -> list[str]:
    """Everything ``service`` would refuse in ``params`` for ``operation``, one message each."""
    shape = input_shape(service, operation)
    report = ParamValidator().validate(params, shape)
    problems = report.generate_report().splitlines() if report.has_errors() else []
    return [p.strip() for p in problems] + _constraint_problems(params, shape, operation)


def _constraint_problems(value: Any, shape: Shape, path: str) -> list[str]:
    """Enum, pattern and maximum violations, walking ``value`` along ``shape``."""
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        return [
            problem
            for name, member in value.items()
            if name in shape.members
            for problem in _constraint_problems(member, shape.members[name], f"{path}.{name}")
        ]
    if isinstance(shape, ListShape) and isinstance(value, list):
        found = [p for i, item in enumerate(value) for p in _constraint_problems(item, shape.member, f"{path}[{i}]")]
        return found + _bound_problems(len(value), shape, path, "items")
    if isinstance(shape, MapShape) and isinstance(value, dict):
        return [p for k, v in value.items() for p in _constraint_problems(v, shape.value, f"{path}[{k!r}]")]
    if shape.type_name == "string" and isinstance(value, str):
        problems = _bound_problems(len(value), shape, path, "characters")
        if shape.enum and value not in shape.enum:
            allowed = ", ".join(shape.enum[:12]) + (", ..." if len(shape.enum) > 12 else "")
            problems.append(f"{path}: {value!r} is not one of the allowed values ({allowed})")
        compiled = _python_regex(shape.metadata.get("pattern", ""))
        # AWS services match the whole value (SageMaker refuses "-name" under the unanchored "[a-zA-Z0-9](-*...)*").
        if compiled is not None and not compiled.fullmatch(value):
            problems.append(f"{path}: {value!r} does not match the pattern {compiled.pattern}")
        return problems
    if shape.type_name in ("integer", "long") and isinstance(value, int):
        return _bound_problems(value, shape, path, "")
    return []


def _bound_problems(size: int, shape: Shape, path: str, unit: str) -> list[str]:
    maximum = shape.metadata.get("max")
    if maximum is not None and size > maximum:
        return [f"{path}: {size} {unit} is more than the maximum {maximum}".replace("  ", " ")]
    return []


@cache
def _python_regex(pattern: str) -> regex.Pattern[str] | None:
    """The service's (Java-flavoured) pattern as a compiled ``regex``, which reads the Unicode classes of AWS's tag
    patterns (``\\p{L}``) that ``re`` cannot; None where there is none or it cannot be read."""
    if not pattern:
        return None
    try:
        return regex.compile(pattern)
    except regex.error:
        return None
