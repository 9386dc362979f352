"""Slurm hostlist expressions (``n[1-3,7],gpu-a``), expanded without a Slurm installation.

Used to validate ``exclude_nodes`` before any job exists: the expression must
parse, and what it names counts against the cluster's capacity; and to name the
nodes a training job is pinned to in Slurm's short form.
"""

from __future__ import annotations

import re

_ITEM = re.compile(r"(?P<prefix>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:\[(?P<ranges>[0-9,-]+)\])?(?P<suffix>[A-Za-z0-9_.-]*)")
MAX_HOSTS = 10_000
# A host name's last number: what a hostlist range varies.
_NUMBERED = re.compile(r"(?P<prefix>.*?)(?P<number>[0-9]+)(?P<suffix>[^0-9]*)")


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


def compress_hostlist(hosts: list[str]) -> str:
    """``["n1", "n2", "n3", "gpu-7"]`` -> ``"gpu-7,n[1-3]"``: the hosts as a hostlist expression that
    ``expand_hostlist`` (and Slurm) expands to the same hosts, ranges over each name's last number. A zero-padded
    number (``n01``) ranges only with numbers of its width, as Slurm pads a range by its first number."""
    groups: dict[tuple[str, str, int], list[int]] = {}
    plain: list[str] = []
    for host in sorted(set(hosts)):
        match = _NUMBERED.fullmatch(host)
        if not match:
            plain.append(host)
            continue
        number = match["number"]
        width = len(number) if number.startswith("0") and len(number) > 1 else 0
        groups.setdefault((match["prefix"], match["suffix"], width), []).append(int(number))
    items = plain
    for (prefix, suffix, width), numbers in groups.items():
        ranges: list[list[int]] = []  # [low, high], ascending
        for n in sorted(numbers):
            if ranges and n == ranges[-1][1] + 1:
                ranges[-1][1] = n
            else:
                ranges.append([n, n])
        text = ",".join(f"{low:0{width}d}" + (f"-{high:0{width}d}" if high > low else "") for low, high in ranges)
        items.append(f"{prefix}{text}{suffix}" if len(numbers) == 1 else f"{prefix}[{text}]{suffix}")
    return ",".join(sorted(items))
