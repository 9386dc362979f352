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


@pytest.mark.parametrize("family", ami.families_installing("aws_ofi_nccl"))
def test_aws_ofi_nccl_builds_where_hwloc_is_installed(family: str) -> None:
    # aws-ofi-nccl's configure stops with "Could not find the hwloc library" without hwloc's headers and library.
    roles = _playbook_roles(family)
    assert roles.index("base") < roles.index("aws_ofi_nccl")
    defaults, _ = _role("base")
    assert "hwloc-devel" in defaults["base_packages"]


def test_enroot_keeps_each_user_s_folders_on_the_compute_nodes_local_disk() -> None:
    # The families with enroot boot ParallelCluster's compute nodes, which mount their instance store at MountDir.
    assert ami.families_installing("enroot") and all(
        f.startswith("pcluster-") for f in ami.families_installing("enroot")
    )
    template = (REPO / "include" / "templates" / "parallelcluster" / "cluster-config.yaml.j2").read_text()
    (mount_dir,) = re.findall(r"EphemeralVolume:\s*\n\s*MountDir:\s*(\S+)", template)
    defaults, tasks = _role("enroot")
    local_dir = _resolved(defaults["enroot_local_dir"], defaults)
    assert local_dir == mount_dir
    (made,) = [t["ansible.builtin.file"] for t in tasks if "ansible.builtin.file" in t]
    assert _resolved(made["path"], defaults) == local_dir and made["mode"] == "1777" and made["state"] == "directory"
    conf = _task(tasks, "ansible.builtin.copy")["ansible.builtin.copy"]
    assert conf["dest"] == "/etc/enroot/enroot.conf"
    paths = dict(line.split(None, 1) for line in _resolved(conf["content"], defaults).splitlines())
    assert set(paths) == {"ENROOT_RUNTIME_PATH", "ENROOT_CACHE_PATH", "ENROOT_DATA_PATH"}
    for path in paths.values():
        # enroot makes its folders with `umask 077 && mkdir -p`: the one it makes in the world-writable folder is
        # its first user's alone, so that one must be per user.
        assert path.startswith(f"{local_dir}/")
        assert "$(id -u)" in path.removeprefix(f"{local_dir}/").split("/")[0], path
    assert len(set(paths.values())) == len(paths)


def _loader_path() -> list[str]:
    """The folders the aws_ofi_nccl role adds to the loader's path."""
    defaults, tasks = _role("aws_ofi_nccl")
    (conf,) = [t for t in tasks if str(t.get("ansible.builtin.copy", {}).get("dest", "")).startswith("/etc/ld.so")]
    assert conf["ansible.builtin.copy"]["dest"].startswith("/etc/ld.so.conf.d/")
    assert conf["ansible.builtin.copy"]["dest"].endswith(".conf")
    (handler,) = [h for h in _yaml(ROLES / "aws_ofi_nccl" / "handlers" / "main.yml") if h["name"] == conf["notify"]]
    assert handler["ansible.builtin.command"]["cmd"] == "ldconfig"
    return _resolved(conf["ansible.builtin.copy"]["content"], defaults).split()


def test_the_ami_puts_nccl_its_plugin_and_the_efa_installer_s_libraries_on_the_loader_s_path() -> None:
    nccl_defaults, _ = _role("nccl")
    ofi_defaults, _ = _role("aws_ofi_nccl")
    # The EFA installer's RPMs (Amazon Linux 2023, every family's source) install libfabric and Open MPI in lib64.
    assert _loader_path() == [
        f"{nccl_defaults['nccl_home']}/build/lib", f"{ofi_defaults['aws_ofi_nccl_prefix']}/lib",
        "/opt/amazon/efa/lib64", "/opt/amazon/openmpi/lib64",
    ]  # fmt: skip


def test_the_preflight_s_nccl_tests_load_the_libraries_the_ami_has() -> None:
    preflight = (REPO / "include" / "templates" / "slurm" / "preflight.sbatch.j2").read_text()
    (exported,) = re.findall(r'^export LD_LIBRARY_PATH="([^$"]*)\$', preflight, re.M)
    assert exported.split(":") == _loader_path()


@pytest.mark.parametrize(
    ("installed", "runs"),
    [
        ({"rc": 1, "stdout": ""}, True),  # no NVIDIA module for this kernel
        ({"rc": 0, "stdout": "570.172.08"}, False),
        ({"rc": 0, "stdout": "535.247.01"}, True),
        ({"rc": 0, "stdout": "570.172.081"}, True),
    ],
)
def test_the_pinned_nvidia_driver_replaces_any_other_installed(installed: dict[str, Any], runs: bool) -> None:
    defaults, tasks = _role("nvidia_driver")
    read = next(t for t in tasks if "modinfo" in str(t.get("ansible.builtin.command")))
    assert read["ansible.builtin.command"]["cmd"].split() == ["modinfo", "-F", "version", "nvidia"]
    (replace,) = [t for t in tasks if "block" in t]
    condition = jinja2.Environment().compile_expression(replace["when"])
    assert condition(nvidia_driver_version="570.172.08", **{read["register"]: installed}) is runs
    # The daemons holding the kernel modules stop and the modules unload before the installer runs.
    names = [t["name"] for t in replace["block"]]
    stop = next(t for t in replace["block"] if t.get("ansible.builtin.systemd_service", {}).get("state") == "stopped")
    assert _resolved(stop["loop"], defaults) == str(["nvidia-persistenced", "nvidia-fabricmanager"])
    unload = next(t for t in replace["block"] if "/proc/modules" in str(t.get("ansible.builtin.shell")))
    install = next(t for t in replace["block"] if ".run --silent" in str(t.get("ansible.builtin.command")))
    assert names.index(stop["name"]) < names.index(unload["name"]) < names.index(install["name"])
    assert "creates" not in install["ansible.builtin.command"]
    # nvidia itself last: the other modules use it.
    (modules,) = re.findall(r"for module in ([\w ]+); do", unload["ansible.builtin.shell"]["cmd"])
    assert modules.split()[-1] == "nvidia" and {"nvidia_uvm", "nvidia_drm", "nvidia_modeset"} <= set(modules.split())
    assert 'rmmod "$module"' in unload["ansible.builtin.shell"]["cmd"]


def test_the_persistence_daemon_has_a_unit_to_enable() -> None:
    # The driver's runfile installs the daemon but no unit for it.
    defaults, tasks = _role("nvidia_driver")
    unit = next(t["ansible.builtin.copy"] for t in tasks if "ansible.builtin.copy" in t)
    assert unit["dest"] == "/etc/systemd/system/nvidia-persistenced.service"
    text = (ROLES / "nvidia_driver" / "files" / unit["src"]).read_text()
    assert re.search(r"^ExecStart=/usr/bin/nvidia-persistenced .*--persistence-mode", text, re.M)
    assert "WantedBy=multi-user.target" in text
    enable = next(t for t in tasks if t.get("ansible.builtin.systemd_service", {}).get("enabled"))
    assert enable["ansible.builtin.systemd_service"]["daemon_reload"] is True
    assert "nvidia-persistenced" in _resolved(enable["loop"], defaults)
    assert tasks.index(next(t for t in tasks if "ansible.builtin.copy" in t)) < tasks.index(enable)


def test_the_neuron_role_installs_the_packages_its_release_pins() -> None:
    defaults, tasks = _role("neuron")
    releases = defaults["neuron_releases"]
    assert ami.default_versions()["neuron_version"] in releases
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    (check,) = [task["ansible.builtin.assert"] for task in tasks if "ansible.builtin.assert" in task]
    install = _task(tasks, "ansible.builtin.dnf")["ansible.builtin.dnf"]
    packages = environment.compile_expression(install["name"].strip("{} "))
    for version, pinned in releases.items():
        assert environment.compile_expression(check["that"])(neuron_version=version, neuron_releases=releases)
        assert packages(neuron_version=version, neuron_releases=releases) == pinned
        # One version each of the driver, runtime, collectives and tools, as dnf reads name-version.
        names = [re.fullmatch(r"(aws-neuronx-[a-z-]+)-([0-9.]+)", package) for package in pinned]
        assert all(names) and sorted(m.group(1) for m in names if m) == sorted(
            ["aws-neuronx-dkms", "aws-neuronx-runtime-lib", "aws-neuronx-collectives", "aws-neuronx-tools"]
        )
    assert not environment.compile_expression(check["that"])(neuron_version="2.24.0", neuron_releases=releases)


def test_the_neuron_ami_and_training_image_are_of_one_sdk_release() -> None:
    # The AMI's driver serves the runtime inside the image: both come from the same Neuron SDK release.
    dockerfile = (REPO / "images" / "containers" / "neuron" / "Dockerfile").read_text()
    (tag,) = re.findall(r"^ARG NEURON_TAG=\S*-sdk([0-9.]+)-", dockerfile, re.M)
    assert tag == ami.default_versions()["neuron_version"]
