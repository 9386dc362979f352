"""Batch's compute environment, job queue and multi-node job definition, checked offline against Batch's model
(BatchJobOperator: test_batch_operator.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dtp.form_params import ParamsError, parse_params
from dtp.naming import RunNames
from dtp.params import TrainParams
from dtp.pipeline.spec import build_spec, run_spec
from dtp.platforms import get_platform
from dtp.platforms.base import PlatformNotReady
from dtp.platforms.batch import LAUNCH, BatchPlatform
from dtp.platforms.service_models import request_problems

# What a real account's connection holds: multi-node and EFA jobs need the launch template.
SETTINGS = {
    "instance_role_arn": "arn:aws:iam::111122223333:instance-profile/dtp-ecs-instance",
    "launch_template_id": "lt-0123456789abcdef0",
}
NETWORK = {"SecurityGroup": "sg-0123456789abcdef0", "PrivateSubnet": "subnet-0123456789abcdef0"}


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    def use(**extra: Any) -> None:
        conn = {"conn_type": "generic", "extra": {**SETTINGS, **extra}}
        monkeypatch.setenv("AIRFLOW_CONN_DTP_BATCH", json.dumps(conn))

    use()
    return use


def spec_for(**conf: Any) -> dict[str, Any]:
    params = parse_params(TrainParams, {"platform": "batch", "instance_type": "p5.48xlarge", **conf})
    return run_spec(params, "train_e2e", "manual__2026-12-02T10:00:00+00:00")


def requests(documents: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    names = ("compute-environment.json", "job-queue.json", "job-definition.json")
    environment, queue, definition = (json.loads(documents[name]) for name in names)
    return environment, queue, definition


def documents_of(environment: Any, queue: Any, definition: Any) -> dict[str, str]:
    return {
        "compute-environment.json": json.dumps(environment),
        "job-queue.json": json.dumps(queue),
        "job-definition.json": json.dumps(definition),
    }


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


def test_a_published_image_carries_the_programs(settings) -> None:
    spec = spec_for(recipe="tiny", instance_type="m5.2xlarge", num_nodes=2)
    platform = BatchPlatform()
    image = "111122223333.dkr.ecr.us-east-1.amazonaws.com/dtp/training@sha256:" + "0" * 64
    runtime = platform.runtime(image, spec)
    assert runtime == {"source": f"image {image}", "image": image, "training_dir": "/opt/dtp/training"}
    _, _, definition = requests(platform.render(spec, NETWORK, runtime))
    container = definition["nodeProperties"]["nodeRangeProperties"][0]["container"]
    assert container["image"] == image and "/opt/dtp/training/train.py" in container["command"]
    assert platform.default_image()["image"].startswith("nvcr.io/nvidia/pytorch:")
    assert "training_dir" not in platform.default_image()


def test_optional_settings_reach_the_compute_environment(settings) -> None:
    settings(
        service_role_arn="arn:aws:iam::111122223333:role/dtp-batch-service",
        launch_template_id="lt-0123456789abcdef0",
        image_uri="public.ecr.aws/example/pytorch:2.6",
        max_nodes=4,
    )
    platform = BatchPlatform()
    documents = platform.render(spec_for(num_nodes=2), NETWORK)
    assert platform.check(documents) == []
    environment, _, definition = requests(documents)
    assert environment["serviceRole"] == "arn:aws:iam::111122223333:role/dtp-batch-service"
    assert environment["computeResources"]["launchTemplate"] == {
        "launchTemplateId": "lt-0123456789abcdef0",
        "version": "$Latest",
    }
    assert definition["nodeProperties"]["nodeRangeProperties"][0]["container"]["image"] == (
        "public.ecr.aws/example/pytorch:2.6"
    )
    assert platform.max_nodes() == 4


@pytest.mark.parametrize(
    ("conf", "needs"),
    [
        (
            {"num_nodes": 1},
            "the job maps 32 EFA devices (/dev/infiniband/uverbs*) and runs on 1 node, which shares the run's files",
        ),
        ({"recipe": "tiny", "instance_type": "m5.2xlarge", "num_nodes": 2}, "the job runs on 2 nodes, which share"),
        ({"num_nodes": 2}, "the job maps 32 EFA devices (/dev/infiniband/uverbs*) and runs on 2 nodes, which share"),
        # Its /fsx would be an empty folder of the host's disk: no config to read, its results and checkpoints lost.
        ({"recipe": "tiny", "instance_type": "m5.2xlarge", "num_nodes": 1}, "the job runs on 1 node, which shares"),
    ],
)
def test_without_a_launch_template_every_job_is_refused_before_anything_exists(
    settings, monkeypatch, conf, needs
) -> None:
    """Without the launch template the hosts get no /fsx, through which the Airflow workers and the job's nodes
    share the run's files, and no EFA interfaces (the container's devices do not exist): the run is refused at
    validate_params and provision creates nothing."""
    settings(launch_template_id="")
    platform = BatchPlatform()
    problems = platform.check(platform.render(spec_for(**conf), NETWORK))
    assert len(problems) == 1 and problems[0].startswith(
        "compute-environment.json: no launchTemplate (connection 'dtp_batch' gives no launch_template_id), but "
    )
    assert needs in problems[0]
    assert (
        "the run's files (config, programs, results, checkpoints) with the Airflow workers through /fsx"
        in (problems[0])
    )
    assert problems[0].endswith("user data that mounts the FSx for Lustre file system at /fsx")
    efa = "one network interface of InterfaceType efa on each network card 0..31, whose Groups hold the run's EFA"
    assert (efa in problems[0]) == ("EFA devices" in needs)

    monkeypatch.setattr(BatchPlatform, "client", property(lambda _: pytest.fail("provision called Batch")))
    with pytest.raises(PlatformNotReady, match=r"the Batch requests are invalid:\ncompute-environment.json: no"):
        platform.provision(spec_for(**conf), NETWORK)


@pytest.mark.parametrize("num_nodes", [1, 2])
def test_validate_params_refuses_a_run_without_a_launch_template(settings, num_nodes) -> None:
    settings(launch_template_id="")
    conf = {"platform": "batch", "recipe": "tiny", "instance_type": "m5.2xlarge", "num_nodes": num_nodes}
    with pytest.raises(ParamsError) as info:
        build_spec({}, conf, RunNames("train_e2e", "manual__1"))
    assert "platform: 'batch' would be refused its cluster:" in str(info.value)
    assert "no launchTemplate (connection 'dtp_batch' gives no launch_template_id)" in str(info.value)


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


def test_check_names_what_batch_would_refuse(settings) -> None:
    platform = BatchPlatform()
    environment, queue, definition = requests(platform.render(spec_for(num_nodes=2), NETWORK))
    environment["computeEnvironmentName"] = "my compute environment"
    environment["computeResources"]["type"] = "EC3"
    environment["computeResources"]["Bogus"] = True
    queue["computeEnvironmentOrder"][0]["computeEnvironment"] = "someone-elses-ce"
    definition["type"] = "parallel"
    definition["nodeProperties"]["numNodes"] = 0
    problems = "\n".join(platform.check(documents_of(environment, queue, definition)))
    assert "CreateComputeEnvironment.computeEnvironmentName: 'my compute environment' is not a Batch name" in problems
    assert "CreateComputeEnvironment.computeResources.type: 'EC3' is not one of the allowed values" in problems
    assert 'Unknown parameter in computeResources: "Bogus"' in problems
    assert "computeEnvironmentOrder names 'someone-elses-ce', not the run's compute environment" in problems
    assert "RegisterJobDefinition.type: 'parallel' is not one of the allowed values" in problems
    assert "nodeProperties.numNodes: 0; a job needs at least 1 node" in problems


@pytest.mark.parametrize(
    ("nodes", "problem"),
    [
        ({"mainNode": 2}, "nodeProperties.mainNode: 2 is not one of the job's nodes 0..1"),
        ({"nodeRangeProperties": [{"targetNodes": "0:0"}]}, "the ranges cover nodes [0], not 0..1"),
        ({"nodeRangeProperties": [{"targetNodes": "0:"}, {"targetNodes": "1"}]}, "cover nodes [0, 1, 1], not 0..1"),
        ({"nodeRangeProperties": [{"targetNodes": "a:b"}]}, "targetNodes: not a range like '0:' or '1:3'"),
    ],
)
def test_check_refuses_node_ranges_that_do_not_cover_the_job(settings, nodes, problem) -> None:
    platform = BatchPlatform()
    environment, queue, definition = requests(platform.render(spec_for(num_nodes=2), NETWORK))
    container = definition["nodeProperties"]["nodeRangeProperties"][0]["container"]
    ranges = [{**r, "container": container} for r in nodes.pop("nodeRangeProperties", [])]
    definition["nodeProperties"] |= nodes | ({"nodeRangeProperties": ranges} if ranges else {})
    assert any(problem in p for p in platform.check(documents_of(environment, queue, definition)))


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


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"instance_role_arn": "arn:aws:iam::111122223333:role/ecsInstanceRole"}, "instance_role_arn"),
        ({"service_role_arn": "AWSBatchServiceRole"}, "service_role_arn"),
        ({"launch_template_id": "lt-1; rm -rf /"}, "launch_template_id"),
        ({"max_nodes": 0}, "max_nodes"),
        ({"instance_role": "ecsInstanceRole"}, "instance_role"),
    ],
)
def test_bad_settings_name_the_connection_and_field(settings, extra, field) -> None:
    settings(**extra)
    with pytest.raises(PlatformNotReady, match=rf"^connection 'dtp_batch' extra: {field}: "):
        BatchPlatform().max_nodes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"instance_role_arn": "arn:aws:iam::111122223333:instance-profile/ecsInstanceRole"},
            r"instance_role_arn: the instance profile's name 'ecsInstanceRole' must start with 'dtp-', with no path, "
            r"and so must its role's: the worker policy .* lets DTP pass only dtp-\* roles to Batch and EC2",
        ),
        (
            {"service_role_arn": "arn:aws:iam::111122223333:role/service-role/dtp-batch"},
            r"service_role_arn: the role's name 'service-role/dtp-batch' must start with 'dtp-', with no path",
        ),
    ],
)
def test_roles_the_worker_policy_cannot_pass_are_refused(settings, extra, message) -> None:
    settings(**extra)
    with pytest.raises(PlatformNotReady, match="^connection 'dtp_batch' extra: " + message):
        BatchPlatform().render(spec_for(), NETWORK)


def test_a_missing_instance_role_and_connection_say_what_to_set(settings, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_DTP_BATCH", json.dumps({"conn_type": "generic", "extra": {}}))
    with pytest.raises(PlatformNotReady, match=r"^connection 'dtp_batch' extra: instance_role_arn: Field required"):
        BatchPlatform().max_nodes()
    monkeypatch.delenv("AIRFLOW_CONN_DTP_BATCH")
    with pytest.raises(PlatformNotReady, match=r"^connection 'dtp_batch' is not defined; it holds the account's"):
        BatchPlatform().max_nodes()


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
