"""The requests that make a Batch run's compute environment, job queue and multi-node job definition, and the
preflight's node overrides, as the platform renders them, checked offline against Batch's model (what ``check``
refuses: test_batch_checks.py; BatchJobOperator: test_batch_operator.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from batch_support import NETWORK, SETTINGS, requests, spec_for, use_settings

from dtp.form_params import ParamsError
from dtp.platforms import get_platform
from dtp.platforms.base import PlatformNotReady
from dtp.platforms.batch import BatchPlatform
from dtp.platforms.batch_requests import LAUNCH
from dtp.platforms.service_models import request_problems


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    return use_settings(monkeypatch)


@pytest.mark.parametrize(
    ("recipe", "instance_type", "num_nodes", "vcpus", "gpus", "efa"),
    [
        ("llama3_1_8b", "p5.48xlarge", 4, 192, "8", 32),
        ("llama3_1_70b", "p4de.24xlarge", 16, 96, "8", 4),
        ("llama3_2_1b", "g5.48xlarge", 2, 192, "8", 1),
        ("tiny", "m5.2xlarge", 2, 8, None, 0),
    ],
)
def test_shipped_recipes_render_requests_batch_accepts(
    settings, recipe, instance_type, num_nodes, vcpus, gpus, efa
) -> None:
    spec = spec_for(recipe=recipe, instance_type=instance_type, num_nodes=num_nodes)
    platform = get_platform("batch")
    documents = platform.render(spec, NETWORK)
    assert platform.check(documents) == []
    environment, queue, definition = requests(documents)
    run_key = spec["names"]["run_key"]

    assert (environment["computeEnvironmentName"], environment["type"]) == (f"{run_key}-ce", "MANAGED")
    compute = environment["computeResources"]
    assert (compute["type"], compute["minvCpus"], compute["maxvCpus"]) == ("EC2", 0, vcpus * num_nodes)
    assert compute["instanceTypes"] == [instance_type]
    assert compute["subnets"] == ["subnet-0123456789abcdef0"]
    # The launch template's EFA interfaces carry the security group: EC2 refuses instance-level ones with them.
    assert compute.get("securityGroupIds") == (None if efa else ["sg-0123456789abcdef0"])
    assert compute["launchTemplate"] == {"launchTemplateId": "lt-0123456789abcdef0", "version": "$Latest"}
    assert compute["instanceRole"] == SETTINGS["instance_role_arn"]
    assert "serviceRole" not in environment and "placementGroup" not in compute
    assert environment["tags"]["dtp:run"] == compute["tags"]["dtp:run"] == run_key

    assert queue["jobQueueName"] == f"{run_key}-queue"
    assert queue["computeEnvironmentOrder"] == [{"order": 1, "computeEnvironment": f"{run_key}-ce"}]

    assert (definition["jobDefinitionName"], definition["type"]) == (f"{run_key}-train", "multinode")
    assert definition["retryStrategy"] == {"attempts": 1} and definition["propagateTags"] is True
    nodes = definition["nodeProperties"]
    assert (nodes["numNodes"], nodes["mainNode"]) == (num_nodes, 0)
    (node_range,) = nodes["nodeRangeProperties"]
    container = node_range["container"]
    assert node_range["targetNodes"] == "0:" and container["instanceType"] == instance_type
    resources = {r["type"]: r["value"] for r in container["resourceRequirements"]}
    assert resources.get("GPU") == gpus and resources["VCPU"] == str(vcpus)
    procs = spec["instance"]["accelerators_per_node"]
    programs = f"/fsx/runs/{run_key}/programs"
    assert container["command"][:4] == ["sh", "-c", LAUNCH, "torchrun"]
    assert container["command"][4:7] == ["--nproc_per_node", str(procs), f"{programs}/train.py"]
    assert container["command"][7:] == ["--config", f"/fsx/runs/{run_key}/train.json"]
    assert container["mountPoints"] == [{"sourceVolume": "fsx", "containerPath": "/fsx", "readOnly": False}]
    assert container["volumes"] == [{"name": "fsx", "host": {"sourcePath": "/fsx"}}]
    assert container["linuxParameters"]["sharedMemorySize"] > 64
    devices = container["linuxParameters"].get("devices", [])
    assert [d["hostPath"] for d in devices] == [f"/dev/infiniband/uverbs{i}" for i in range(efa)]
    env = {e["name"]: e["value"] for e in container["environment"]}
    assert (env.get("FI_PROVIDER") == "efa") == bool(efa)
    limit = spec["training_time_limit_minutes"]
    assert limit > 0 and definition["timeout"] == {"attemptDurationSeconds": max(60, limit * 60)}


@pytest.mark.parametrize(
    ("node_env", "main"),
    [
        # Batch sets the main node's address on the other nodes only: node 0 takes its own first address.
        ({"AWS_BATCH_JOB_NODE_INDEX": "0"}, "10.0.0.5"),
        ({"AWS_BATCH_JOB_NODE_INDEX": "3", "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS": "10.0.0.9"}, "10.0.0.9"),
    ],
)
def test_the_launch_script_finds_the_main_node_on_every_node(
    tmp_path: Path, node_env: dict[str, str], main: str
) -> None:
    """The job definition's command, run by sh as on a node, with stand-ins for torchrun and hostname."""
    for name, body in {"torchrun": 'printf "%s\\n" "$@"', "hostname": 'echo "10.0.0.5 172.17.0.1 "'}.items():
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "AWS_BATCH_JOB_NUM_NODES": "4", **node_env}
    argv = ["sh", "-c", LAUNCH, "torchrun", "--nproc_per_node", "8", "train.py", "--config", "a b.json"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.splitlines() == [
        *("--nnodes", "4", "--node_rank", node_env["AWS_BATCH_JOB_NODE_INDEX"]),
        *("--master_addr", main, "--master_port", "29500"),
        *("--nproc_per_node", "8", "train.py", "--config", "a b.json"),
    ]


def test_a_single_node_without_efa_gets_the_runs_security_group_beside_the_launch_template(settings) -> None:
    """The launch template holds no network interfaces for an instance type without EFA ones: the instances take
    the compute environment's security groups."""
    platform = BatchPlatform()
    documents = platform.render(spec_for(recipe="tiny", instance_type="m5.2xlarge", num_nodes=1), NETWORK)
    assert platform.check(documents) == []
    compute = requests(documents)[0]["computeResources"]
    assert compute["securityGroupIds"] == ["sg-0123456789abcdef0"]
    assert compute["launchTemplate"] == {"launchTemplateId": "lt-0123456789abcdef0", "version": "$Latest"}


def test_the_network_stacks_placement_group_holds_the_nodes(settings) -> None:
    platform = BatchPlatform()
    documents = platform.render(spec_for(num_nodes=2), {**NETWORK, "PlacementGroup": "dtp-run-cluster"})
    assert platform.check(documents) == []
    assert requests(documents)[0]["computeResources"]["placementGroup"] == "dtp-run-cluster"


def test_hostile_extra_env_reaches_the_container_only_as_environment_values(settings) -> None:
    hostile = {
        "QUOTES": 'it\'s "quoted"',
        "SUBST": "$(rm -rf /)",
        "TICKS": "`reboot`; exit 1",
    }
    platform = BatchPlatform()
    spec = spec_for(num_nodes=2, extra_env=hostile)
    documents = platform.render(spec, NETWORK)
    assert platform.check(documents) == []
    container = requests(documents)[2]["nodeProperties"]["nodeRangeProperties"][0]["container"]
    env = {e["name"]: e["value"] for e in container["environment"]}
    assert {name: env[name] for name in hostile} == hostile
    command = "\n".join(container["command"])
    assert container["command"][2] == LAUNCH
    for value in hostile.values():
        assert value not in command


def test_values_with_newlines_never_become_params() -> None:
    with pytest.raises(ParamsError, match="extra_env"):
        spec_for(extra_env={"EVIL": "line\nrm -rf /"})


def test_recipes_of_other_frameworks_are_refused(settings) -> None:
    with pytest.raises(PlatformNotReady, match="uses megatron-lm; on batch DTP launches its own FSDP trainer"):
        BatchPlatform().render(spec_for(recipe="llama3_1_70b_megatron", num_nodes=2), NETWORK)


def test_the_preflight_runs_on_the_jobs_nodes_as_a_submit_batch_accepts(settings) -> None:
    spec = spec_for(recipe="llama3_1_8b", num_nodes=4)
    runtime = BatchPlatform().runtime("registry.example/dtp-training@sha256:" + "a" * 64, spec)
    overrides = BatchPlatform().preflight_overrides(spec, runtime)
    run_dir = f"/fsx/runs/{spec['names']['run_key']}"
    (node_range,) = overrides["nodePropertyOverrides"]
    assert node_range["targetNodes"] == "0:"
    assert node_range["containerOverrides"]["command"] == [
        *("sh", "-c", LAUNCH, "torchrun", "--nproc_per_node", "8", "/opt/dtp/training/preflight.py"),
        *("--results", f"{run_dir}/preflight.json", "--max-bytes", str(spec["instance"]["busbw_at_bytes"])),
    ]
    submit = {
        "jobName": f"{spec['names']['run_key']}-preflight",
        "jobQueue": f"{spec['names']['run_key']}-queue",
        "jobDefinition": "arn:aws:batch:us-east-1:111122223333:job-definition/x:2",
        "nodeOverrides": overrides,
        "timeout": {"attemptDurationSeconds": 900},
        "tags": spec["tags"],
    }
    assert request_problems("batch", "SubmitJob", submit) == []
