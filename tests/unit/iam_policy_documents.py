"""Reading DTP's IAM policy documents (docs/iam) and evaluating them as IAM does, for the policy check
(test_iam_policy.py): which statements allow an action, and whether a policy allows an action on a resource in a
given request (Deny statements included)."""

from __future__ import annotations

import fnmatch
import json
from typing import Any

from iam_tables import IAM_DIR


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


def applies(statement: dict[str, Any], action: str, resource: str, context: dict[str, str]) -> bool:
    """Whether ``statement`` covers ``action`` on ``resource`` in a request whose condition keys are ``context``:
    IAM's wildcards (``*`` and ``?`` match a ``/`` too; actions case-insensitive, ARNs not), and the StringEquals
    conditions DTP's policies use (an operator this does not evaluate fails the test rather than passing unseen)."""
    actions = listed(statement["Action"])
    if not any(fnmatch.fnmatchcase(action.lower(), pattern.lower()) for pattern in actions):
        return False
    if not any(fnmatch.fnmatchcase(resource, pattern) for pattern in listed(statement["Resource"])):
        return False
    for operator, test in statement.get("Condition", {}).items():
        assert operator in ("StringEquals", "StringEqualsIfExists"), f"{statement['Sid']}: cannot evaluate {operator}"
        for key, values in test.items():
            checked = key in context or operator == "StringEquals"  # ...IfExists: a request without the key passes
            if checked and context.get(key) not in listed(values):
                return False
    return True


def allows(policy: dict[str, Any], action: str, resource: str, context: dict[str, str]) -> bool:
    """Whether ``policy`` allows ``action`` on ``resource``: a statement allows it and none denies it."""
    covering = [s for s in statements(policy) if applies(s, action, resource, context)]
    return any(s["Effect"] == "Allow" for s in covering) and not any(s["Effect"] == "Deny" for s in covering)


def condition_values(statement: dict[str, Any], key: str) -> list[str]:
    """The values a statement's Condition (any operator) gives ``key``."""
    tests = statement.get("Condition", {}).values()
    return [value for test in tests for name, values in test.items() if name == key for value in listed(values)]
