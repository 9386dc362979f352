"""scripts/setup installs what the tests run, and keeps off the system-wide services of what it installs (the stack
and the tests run their own copies on loopback). Read from the script: running it would install packages."""

from __future__ import annotations

import re
from pathlib import Path

from dtp.local.config import PROJECT_ROOT

SETUP = (PROJECT_ROOT / "scripts" / "setup").read_text()
UNIT_DIRS = (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system"))


def apt_packages() -> list[str]:
    match = re.search(r"^APT_PACKAGES=\(([^)]*)\)$", SETUP, re.MULTILINE)
    assert match, "scripts/setup has no APT_PACKAGES=(...) line"
    return match.group(1).split()


def system_units() -> dict[str, list[str]]:
    """SYSTEM_UNITS: the systemd units setup disables, by the package whose installation starts them."""
    block = re.search(r"^declare -A SYSTEM_UNITS=\((.*?)^\)$", SETUP, re.MULTILINE | re.DOTALL)
    assert block, "scripts/setup has no SYSTEM_UNITS"
    return {pkg: units.split() for pkg, units in re.findall(r'\[([^]]+)\]="([^"]*)"', block.group(1))}


def test_the_programs_tests_call_are_installed() -> None:
    # pcluster checks for Node.js before any command (--dryrun too); tests/integration/test_stack.py runs ss.
    assert {"nodejs", "iproute2"} <= set(apt_packages())


def test_every_daemon_the_stack_or_tests_run_a_copy_of_has_its_system_service_kept_off() -> None:
    units = system_units()
    daemons = {"openssh-server", "munge", "slurm-wlm", "postgresql", "redis-server", "docker-registry"}
    assert set(units) == {*daemons, "prometheus-pushgateway"}  # the stack's daemons; the tests' Pushgateway
    assert set(units) <= set(apt_packages())
    assert units["slurm-wlm"] == ["slurmctld.service", "slurmd.service"]


def test_each_unit_kept_off_is_one_the_packages_install() -> None:
    # A misspelt unit would fail quietly (setup ignores a unit this release lacks): each one is on this machine.
    missing = [
        unit
        for names in system_units().values()
        for unit in names
        if not any((directory / unit).exists() for directory in UNIT_DIRS)
    ]
    assert missing == []
