"""The AMI families' playbooks and roles (images/packer), read as data: what packer and Ansible would do with them
on a builder instance, which only a real bake runs."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from dtp.images import ami

REPO = Path(__file__).resolve().parents[2]
ROLES = ami.PACKER_DIR / "ansible" / "roles"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _role(name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A role's defaults and its tasks."""
    return _yaml(ROLES / name / "defaults" / "main.yml"), _yaml(ROLES / name / "tasks" / "main.yml")


def _task(tasks: list[dict[str, Any]], module: str) -> dict[str, Any]:
    (task,) = [task for task in tasks if module in task]
    return task


def _resolved(value: str, variables: dict[str, Any]) -> str:
    """``value`` with the role's variables substituted, as Ansible templates them (defaults refer to defaults)."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    while "{{" in value:
        value = environment.from_string(value).render(variables)
    return value


def _playbook_roles(family: str) -> list[str]:
    (play,) = _yaml(ami.PACKER_DIR / "ansible" / f"{family}.yml")
    return [role if isinstance(role, str) else role["role"] for role in play["roles"]]


def test_parallelcluster_families_bake_from_the_pinned_parallelcluster_version() -> None:
    # ParallelCluster refuses a custom AMI baked from another version's AMI than its own.
    (pin,) = re.findall(r"^aws-parallelcluster==(\S+)$", (REPO / "requirements-pcluster.txt").read_text(), re.M)
    sources = {family: ami.source_ami(family)["name"] for family in ami.ami_families()}
    pcluster = {family: name for family, name in sources.items() if name.startswith("aws-parallelcluster-")}
    assert sorted(pcluster) == [family for family in ami.ami_families() if family.startswith("pcluster-")]
    assert {family: name.split("-")[2] for family, name in pcluster.items()} == dict.fromkeys(pcluster, pin)


def test_pyxis_is_installed_registered_and_included_at_one_path() -> None:
    defaults, tasks = _role("pyxis")
    prefix = defaults["pyxis_slurm_prefix"]
    build = _task(tasks, "ansible.builtin.command")
    # pyxis's Makefile installs the plugin into <prefix>/lib/slurm, and takes CPPFLAGS from the environment only.
    make = _resolved(build["ansible.builtin.command"]["cmd"], defaults).split()
    assert make[:2] == ["make", "install"] and f"prefix={prefix}" in make
    assert not any(arg.startswith("CPPFLAGS=") for arg in make) and "CPPFLAGS" in build["environment"]
    plugin = f"{prefix}/lib/slurm/spank_pyxis.so"
    assert _resolved(build["ansible.builtin.command"]["creates"], defaults) == plugin
    conf = _task(tasks, "ansible.builtin.copy")["ansible.builtin.copy"]
    assert _resolved(conf["dest"], defaults) == f"{prefix}/etc/plugstack.conf.d/pyxis.conf"
    assert _resolved(conf["content"], defaults) == f"required {plugin}\n"
    include = _task(tasks, "ansible.builtin.lineinfile")["ansible.builtin.lineinfile"]
    assert _resolved(include["path"], defaults) == f"{prefix}/etc/plugstack.conf"
    line = _resolved(include["line"], defaults)
    assert line == f"include {prefix}/etc/plugstack.conf.d/*" and include["create"] is True
    # Idempotent: a second run (or an include the source AMI has) matches the same line instead of adding one.
    assert re.match(_resolved(include["regexp"], defaults), line)
    assert re.match(_resolved(include["regexp"], defaults), f"include {prefix}/etc/plugstack.conf.d/pyxis.conf")


@pytest.mark.parametrize("family", ami.ami_families())
def test_cuda_is_installed_before_what_builds_against_it(family: str) -> None:
    roles = _playbook_roles(family)
    for role in ("nccl", "aws_ofi_nccl", "nccl_tests"):
        if role in roles:
            assert "cuda" in roles and roles.index("cuda") < roles.index(role), (family, role)


def test_nvidia_s_repository_is_added_before_the_fabric_manager_is_installed() -> None:
    # The driver role runs before the cuda role, and the fabric manager is a package of NVIDIA's CUDA repository.
    _, tasks = _role("nvidia_driver")
    repo = next(i for i, t in enumerate(tasks) if t.get("ansible.builtin.include_role", {}).get("name") == "cuda")
    assert tasks[repo]["ansible.builtin.include_role"]["tasks_from"] == "repo"
    fabric_manager = next(i for i, t in enumerate(tasks) if "fabric-manager" in str(t.get("ansible.builtin.dnf")))
    assert repo < fabric_manager
    (added,) = _yaml(ROLES / "cuda" / "tasks" / "repo.yml")
    assert added["ansible.builtin.get_url"]["url"] == "{{ cuda_repo_url }}"


@pytest.mark.parametrize(
    ("installed", "runs"),
    [
        (None, True),  # a source AMI without EFA: slurp found no file
        ("# EFA installer version: 1.43.1\n# Debug packages installed: no\n", False),
        ("# EFA installer version: 1.38.0\n# Debug packages installed: no\n", True),
        ("# EFA installer version: 1.43.10\n", True),
    ],
)
def test_the_pinned_efa_installer_runs_unless_that_version_is_installed(installed: str | None, runs: bool) -> None:
    defaults, tasks = _role("efa")
    variables = {**defaults, "efa_installer_version": "1.43.1"}
    install = next(task for task in tasks if "efa_installer.sh" in str(task.get("ansible.builtin.command")))
    assert "creates" not in install["ansible.builtin.command"]
    read = next(task for task in tasks if "ansible.builtin.slurp" in task)
    assert _resolved(read["ansible.builtin.slurp"]["src"], defaults) == "/opt/amazon/efa_installed_packages"
    registered = {} if installed is None else {"content": base64.b64encode(installed.encode()).decode()}
    environment = jinja2.Environment()
    environment.filters["b64decode"] = lambda text: base64.b64decode(text).decode()
    condition = environment.compile_expression(install["when"])
    variables["efa_installed_line"] = _resolved(defaults["efa_installed_line"], variables)
    assert condition(**variables, **{read["register"]: registered}) is runs


def test_ansible_may_use_the_ssh_rsa_keys_of_packer_s_proxy() -> None:
    template = ami.TEMPLATE.read_text()
    provisioner = template[template.index('provisioner "ansible"') :]
    (ssh_args,) = re.findall(r'"ANSIBLE_SSH_ARGS=([^"]*)"', provisioner)
    assert {"HostKeyAlgorithms=+ssh-rsa", "PubkeyAcceptedKeyTypes=+ssh-rsa"} <= set(ssh_args.split())
