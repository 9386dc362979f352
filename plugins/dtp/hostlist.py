"""Slurm hostlist expressions (``n[1-3,7],gpu-a``), expanded without a Slurm installation.

Used to validate ``exclude_nodes`` before any job exists: the expression must
parse, and what it names counts against the cluster's capacity.
"""

from __future__ import annotations

import re

_ITEM = re.compile(r"(?P<prefix>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:\[(?P<ranges>[0-9,-]+)\])?(?P<suffix>[A-Za-z0-9_.-]*)")
MAX_HOSTS = 10_000


def _items(expression: str) -> list[str]:
    """Split on the commas that are outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(expression):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            raise ValueError("unbalanced ']'")
        if depth > 1:
            raise ValueError("brackets must not nest")
        if char == "," and depth == 0:
            items.append(expression[start:i])
            start = i + 1
    if depth:
        raise ValueError("unbalanced '['")
    return [*items, expression[start:]]


def expand_hostlist(expression: str) -> list[str]:
    """``n[1-2],gpu-7`` -> ``["n1", "n2", "gpu-7"]``; ``ValueError`` saying what is malformed."""
    hosts: list[str] = []
    for item in _items(expression) if expression else []:
        match = _ITEM.fullmatch(item)
        if not match:
            raise ValueError(f"{item!r} is not a host name or name[ranges]")
        if match["ranges"] is None:
            hosts.append(item)
            continue
        for part in match["ranges"].split(","):
            low, _, high = part.partition("-")
            if not low.isdigit() or (high and not high.isdigit()):
                raise ValueError(f"range {part!r} in {item!r} must be N or N-M")
            width = len(low)
            end = int(high or low)
            if end < int(low) or end - int(low) + len(hosts) >= MAX_HOSTS:
                raise ValueError(f"range {part!r} in {item!r} is empty or larger than {MAX_HOSTS} hosts")
            hosts += [f"{match['prefix']}{n:0{width}d}{match['suffix']}" for n in range(int(low), end + 1)]
    return hosts
