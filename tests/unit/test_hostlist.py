"""Slurm hostlist expressions, expanded without Slurm (what ``scontrol show hostnames`` gives is checked against the
real one in tests/integration/test_slurm.py)."""

from __future__ import annotations

import pytest

from dtp.hostlist import MAX_HOSTS, compress_hostlist, expand_hostlist


@pytest.mark.parametrize(
    ("expression", "hosts"),
    [
        ("", []),
        ("n1", ["n1"]),
        ("n[01-03]", ["n01", "n02", "n03"]),  # zero padding kept, as Slurm keeps it
        ("gpu-st-p5[7,9-10],login", ["gpu-st-p57", "gpu-st-p59", "gpu-st-p510", "login"]),
        ("a[1-2]b", ["a1b", "a2b"]),
    ],
)
def test_expressions_expand(expression: str, hosts: list[str]) -> None:
    assert expand_hostlist(expression) == hosts


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("n[1-[2]]", "brackets must not nest"),
        ("n[1-2", "unbalanced"),
        ("n1]", "unbalanced ']'"),
        ("n[a-b]", "not a host name"),
        ("n[3-1]", "'3-1' in 'n[3-1]' is empty"),
        ("n[1-2-3]", "must be N or N-M"),
        (f"n[0-{MAX_HOSTS}]", f"larger than {MAX_HOSTS} hosts"),
        ("n1,,n2", "'' is not a host name"),
        ("-n1", "not a host name"),
    ],
)
def test_malformed_expressions_say_what_is_wrong(expression: str, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
        expand_hostlist(expression)


@pytest.mark.parametrize(
    ("hosts", "expression"),
    [
        ([], ""),
        (["n3", "n2"], "n[2-3]"),
        (["n1", "n2", "n3", "gpu-7"], "gpu-7,n[1-3]"),
        (["n9", "n10", "n12"], "n[9-10,12]"),  # Slurm pads a range by its first number: n9 does not pad n10
        (["n01", "n02", "n10"], "n10,n[01-02]"),  # a padded number ranges with its width only
        (["ip-10-0-1-5", "ip-10-0-1-6"], "ip-10-0-1-[5-6]"),  # the last number varies
        (["n1-ib", "n2-ib", "login"], "login,n[1-2]-ib"),
        (["n2", "n2"], "n2"),
    ],
)
def test_hosts_compress_to_an_expression_that_expands_to_them(hosts: list[str], expression: str) -> None:
    assert compress_hostlist(hosts) == expression
    assert sorted(expand_hostlist(expression)) == sorted(set(hosts))
