"""HyperPod's CreateCluster request and provisioning parameters, checked offline against SageMaker's model, and the
cluster's teardown (a cluster whose nodes join an EKS cluster: test_platform_hyperpod_eks.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowNotFoundException
from botocore.stub import Stubber
from hyperpod_support import NAMES, SETTINGS, spec_for, stub_teardown

from dtp.form_params import ParamsError, parse_params
from dtp.hooks.hyperpod import HyperPodHook
from dtp.params import TrainParams
from dtp.pipeline.spec import build_spec, run_spec
from dtp.platforms import get_platform
from dtp.platforms import hyperpod as hyperpod_platform
from dtp.platforms.base import PlatformNotReady, stop_before_delete
from dtp.platforms.capacity import Placement, candidates, placements
from dtp.platforms.hyperpod import HyperPodPlatform, options_after_failure, placement_of
from dtp.platforms.service_models import request_problems

NETWORK = {
    "SecurityGroup": "sg-0123456789abcdef0",
    "PrivateSubnet": "subnet-0123456789abcdef0",
    "FallbackPrivateSubnet": "subnet-0fedcba9876543210",
}
PLAN = "arn:aws:sagemaker:us-east-1:111122223333:training-plan/p5-december"


@pytest.mark.parametrize(
    ("recipe", "instance_type", "num_nodes"),
    [
        ("llama3_1_8b", "p5.48xlarge", 4),
        ("llama3_1_70b", "p5.48xlarge", 16),
        ("llama3_1_8b_trn1", "trn1n.32xlarge", 4),
        ("tiny", "m5.2xlarge", 2),
    ],
)
def test_shipped_recipes_render_a_request_sagemaker_accepts(settings, recipe, instance_type, num_nodes) -> None:
    spec = spec_for(recipe=recipe, instance_type=instance_type, num_nodes=num_nodes)
    platform = get_platform("hyperpod")
    documents = platform.render(spec, NETWORK)
    assert platform.check(documents) == []
    request = json.loads(documents["cluster-config.json"])
    controller, compute = request["InstanceGroups"]
    assert request["ClusterName"] == spec["names"]["run_key"]
    assert (controller["InstanceCount"], compute["InstanceCount"]) == (1, num_nodes)
    assert compute["InstanceType"] == f"ml.{instance_type}"
    assert (
        compute["LifeCycleConfig"]["SourceS3Uri"]
        == f"s3://sagemaker-dtp-lifecycle/{spec['names']['run_key']}/lifecycle/"
    )
    assert {"Key": "dtp:run", "Value": spec["names"]["run_key"]} in request["Tags"]
    assert request["VpcConfig"] == {
        "SecurityGroupIds": ["sg-0123456789abcdef0"],
        "Subnets": ["subnet-0123456789abcdef0"],
    }
    provisioning = json.loads(documents["provisioning_parameters.json"])
    assert provisioning["worker_groups"] == [{"instance_group_name": "compute-nodes", "partition_name": instance_type}]
    assert (provisioning["fsx_dns_name"], provisioning["fsx_mountname"]) == (SETTINGS["fsx_dns_name"], "abcdefgh")


def test_check_names_what_sagemaker_would_refuse(settings) -> None:
    platform = HyperPodPlatform()
    documents = platform.render(spec_for(num_nodes=2), NETWORK)
    request = json.loads(documents["cluster-config.json"])
    request["ClusterName"] = "-starts-with-a-hyphen"
    request["InstanceGroups"][1]["InstanceType"] = "ml.p5.huge"
    request["InstanceGroups"][1]["ThreadsPerCore"] = 3
    request["InstanceGroups"][0]["Bogus"] = True
    del request["InstanceGroups"][0]["ExecutionRole"]
    provisioning = json.loads(documents["provisioning_parameters.json"])
    provisioning["worker_groups"][0]["instance_group_name"] = "workers"
    del provisioning["fsx_mountname"]
    problems = "\n".join(
        platform.check(
            {"cluster-config.json": json.dumps(request), "provisioning_parameters.json": json.dumps(provisioning)}
        )
    )
    assert 'Missing required parameter in InstanceGroups[0]: "ExecutionRole"' in problems
    assert 'Unknown parameter in InstanceGroups[0]: "Bogus"' in problems
    assert "CreateCluster.ClusterName: '-starts-with-a-hyphen' does not match the pattern" in problems
    assert "CreateCluster.InstanceGroups[1].InstanceType: 'ml.p5.huge' is not one of the allowed values" in problems
    assert "CreateCluster.InstanceGroups[1].ThreadsPerCore: 3 is more than the maximum 2" in problems
    assert "instance group 'workers' is not in the cluster's groups" in problems
    assert "fsx_dns_name and fsx_mountname go together" in problems


def test_request_problems_checks_lengths_and_list_sizes_botocore_leaves_to_the_server() -> None:
    arn = "arn:aws:sagemaker:us-east-1:111122223333:cluster/abc123"
    tags = [{"Key": f"k{i}", "Value": "v" * 300} for i in range(51)]
    problems = request_problems("sagemaker", "AddTags", {"ResourceArn": arn, "Tags": tags})
    assert "AddTags.Tags: 51 items is more than the maximum 50" in problems
    assert "AddTags.Tags[0].Value: 300 characters is more than the maximum 256" in problems
    assert request_problems("sagemaker", "AddTags", {"ResourceArn": arn, "Tags": tags[:1]}) == [
        "AddTags.Tags[0].Value: 300 characters is more than the maximum 256"
    ]
    (problem,) = request_problems("sagemaker", "AddTags", {"ResourceArn": "not-an-arn", "Tags": []})
    assert problem.startswith("AddTags.ResourceArn: 'not-an-arn' does not match the pattern arn:aws")


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"lifecycle_bucket": "my-bucket"}, "lifecycle_bucket"),
        ({"execution_role_arn": "role/hyperpod"}, "execution_role_arn"),
        ({"base_config_uri": "s3://bucket/prefix; rm -rf /"}, "base_config_uri"),
        ({"max_nodes": 0}, "max_nodes"),
        ({"controler_instance_type": "ml.m5.xlarge"}, "controler_instance_type"),
    ],
)
def test_bad_settings_name_the_connection_and_field(settings, extra, field) -> None:
    settings(**extra)
    with pytest.raises(PlatformNotReady, match=rf"^connection 'dtp_hyperpod' extra: {field}: "):
        HyperPodPlatform().max_nodes()


@pytest.mark.parametrize("role", ["hyperpod-execution", "service-role/dtp-hyperpod", "dtp-ops/Admin"])
def test_an_execution_role_the_worker_policy_cannot_pass_is_refused(settings, role) -> None:
    settings(execution_role_arn=f"arn:aws:iam::111122223333:role/{role}")
    with pytest.raises(
        PlatformNotReady,
        match=rf"^connection 'dtp_hyperpod' extra: execution_role_arn: the role's name '{role}' must start with "
        r"'dtp-', with no path: the worker policy .* lets DTP pass only dtp-\* roles to SageMaker",
    ):
        HyperPodPlatform().render(spec_for(), NETWORK)


def test_a_missing_connection_says_what_it_should_hold(monkeypatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_DTP_HYPERPOD", raising=False)
    with pytest.raises(PlatformNotReady, match=r"^connection 'dtp_hyperpod' is not defined; it holds the account's"):
        HyperPodPlatform().max_nodes()


def test_a_published_image_runs_with_pyxis_and_the_default_on_the_nodes_python(settings) -> None:
    image = "111122223333.dkr.ecr.us-east-1.amazonaws.com/dtp/training@sha256:" + "0" * 64
    runtime = HyperPodPlatform().runtime(image, spec_for())
    assert runtime["image"] == "111122223333.dkr.ecr.us-east-1.amazonaws.com#dtp/training:sha256:" + "0" * 64
    assert (runtime["container_runtime"], runtime["training_dir"]) == ("pyxis", "/opt/dtp/training")
    assert HyperPodPlatform().default_image() == {"source": "the nodes' python", "python": "/usr/bin/python3"}


def test_capacity_candidates_keep_the_node_shape_and_the_platform() -> None:
    spec = spec_for(recipe="llama3_1_8b", num_nodes=4)
    assert candidates(spec, "hyperpod") == ["p5.48xlarge", "p5e.48xlarge", "p4de.24xlarge"]
    # Asking for a fallback starts there and goes on with the others; a CPU type has no 8-GPU fallback.
    assert candidates(spec_for(recipe="llama3_1_8b", instance_type="p4de.24xlarge"), "hyperpod") == [
        "p4de.24xlarge",
        "p5e.48xlarge",
    ]
    assert candidates(spec_for(recipe="tiny", instance_type="m5.2xlarge"), "hyperpod") == ["m5.2xlarge"]


def test_placements_try_reserved_capacity_then_each_zone_then_the_next_instance_type() -> None:
    primary, fallback = NETWORK["PrivateSubnet"], NETWORK["FallbackPrivateSubnet"]
    order = placements(spec_for(recipe="llama3_1_8b", num_nodes=4), "hyperpod", NETWORK, {"p5e.48xlarge": PLAN})
    assert order == [
        Placement("p5.48xlarge", primary),
        Placement("p5.48xlarge", fallback),
        Placement("p5e.48xlarge", primary, PLAN),
        Placement("p5e.48xlarge", fallback, PLAN),
        Placement("p5e.48xlarge", primary),
        Placement("p5e.48xlarge", fallback),
        Placement("p4de.24xlarge", primary),
        Placement("p4de.24xlarge", fallback),
    ]
    assert str(order[2]) == f"p5e.48xlarge in {primary} (reservation {PLAN})"


def test_a_fallback_placement_renders_a_request_sagemaker_accepts(settings) -> None:
    settings(training_plans={"p5e.48xlarge": PLAN})
    spec = spec_for(recipe="llama3_1_8b", num_nodes=4)
    platform = HyperPodPlatform()
    placement = Placement("p5e.48xlarge", NETWORK["FallbackPrivateSubnet"], PLAN)
    documents = platform.render(spec, NETWORK, placement)
    assert platform.check(documents) == []
    request = json.loads(documents["cluster-config.json"])
    controller, compute = request["InstanceGroups"]
    # The controller stays in the stack's first subnet; only the compute group moves.
    assert request["VpcConfig"]["Subnets"] == [NETWORK["PrivateSubnet"]] and "OverrideVpcConfig" not in controller
    assert compute["OverrideVpcConfig"] == {
        "SecurityGroupIds": [NETWORK["SecurityGroup"]],
        "Subnets": [placement.subnet],
    }
    assert compute["TrainingPlanArn"] == PLAN
    described = {**request, "ClusterStatus": "Failed"}
    assert placement_of(described) == placement


def test_a_training_plan_that_is_not_an_arn_is_refused(settings) -> None:
    settings(training_plans={"p5.48xlarge": "p5-december"})
    with pytest.raises(PlatformNotReady, match=r"dtp_hyperpod.*training_plans\.p5\.48xlarge"):
        HyperPodPlatform().max_nodes()


def _failed(placement: Placement, message: str) -> dict[str, Any]:
    compute: dict[str, Any] = {"InstanceGroupName": "compute-nodes", "InstanceType": f"ml.{placement.instance_type}"}
    if placement.subnet != NETWORK["PrivateSubnet"]:
        compute["OverrideVpcConfig"] = {"SecurityGroupIds": [NETWORK["SecurityGroup"]], "Subnets": [placement.subnet]}
    groups = [{"InstanceGroupName": "controller-machine", "InstanceType": "ml.m5.12xlarge"}, compute]
    return {
        "ClusterName": "dtp-run",
        "ClusterStatus": "Failed",
        "FailureMessage": message,
        "InstanceGroups": groups,
        "VpcConfig": {"SecurityGroupIds": [NETWORK["SecurityGroup"]], "Subnets": [NETWORK["PrivateSubnet"]]},
    }


def test_a_cluster_that_failed_for_capacity_moves_on_to_the_next_placement() -> None:
    options = placements(spec_for(recipe="llama3_1_8b", num_nodes=4), "hyperpod", NETWORK, {})
    p5e_fallback_zone = Placement("p5e.48xlarge", NETWORK["FallbackPrivateSubnet"])
    no_capacity = "We currently do not have sufficient capacity for ml.p5e.48xlarge in us-east-1b"
    assert options_after_failure(_failed(p5e_fallback_zone, no_capacity), options) == options[-2:]
    assert options_after_failure(_failed(options[0], "InsufficientInstanceCapacity"), options) == options[1:]
    assert options_after_failure(_failed(options[-1], "InsufficientInstanceCapacity"), options) == []
    with pytest.raises(RuntimeError, match=r"^HyperPod cluster dtp-run failed: lifecycle script exited 1$"):
        options_after_failure(_failed(options[0], "lifecycle script exited 1"), options)


def test_a_cluster_request_the_service_would_refuse_is_refused_before_anything_exists(settings) -> None:
    # A controller instance type SageMaker does not have: the settings' model lets it through, CreateCluster's own
    # model does not, and validate_params says so before the network stack (NAT gateway, address) is created.
    settings(controller_instance_type="ml.m5.huge", fsx_dns_name="", fsx_mount_name="")
    conf = {"platform": "hyperpod", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "budget_usd": 2000.0}
    with pytest.raises(ParamsError, match=r"'hyperpod' would be refused its cluster:\n.*ml\.m5\.huge"):
        build_spec({}, conf, NAMES)
    settings(fsx_dns_name="", fsx_mount_name="")
    assert build_spec({}, conf, NAMES)["params"]["platform"] == "hyperpod"


def test_a_framework_that_reads_the_models_files_needs_a_file_system_that_outlives_runs(settings) -> None:
    # torchtitan reads the tokenizer from <shared>/assets/<model>/: nothing can place it on an FSx made with the run.
    settings(fsx_dns_name="", fsx_mount_name="")
    conf = {"platform": "hyperpod", "instance_type": "p5.48xlarge", "budget_usd": 2000.0}
    with pytest.raises(ParamsError, match=r"trains with torchtitan from the model's files in <shared>/assets/"):
        build_spec({}, {**conf, "recipe": "llama3_1_8b_torchtitan", "dataset_uri": "s3://dtp-data/c4/"}, NAMES)
    assert build_spec({}, {**conf, "recipe": "llama3_1_8b_nemo"}, NAMES)  # synthetic tokens


def test_a_controller_without_its_connection_does_not_keep_the_runs_cluster(settings, monkeypatch, caplog) -> None:
    # The Slurm connection is missing (AirflowNotFoundException, neither OSError nor a cluster command's error):
    # teardown still goes on to delete the cluster, whose deletion stops the jobs on its nodes; keep_cluster's
    # stop_jobs, which deletes nothing after it, fails instead.
    monkeypatch.delenv("AIRFLOW_CONN_DTP_HYPERPOD_SLURM", raising=False)
    spec = spec_for(recipe="llama3_1_8b", num_nodes=4)
    described = {"ClusterName": spec["names"]["run_key"], "ClusterStatus": "InService"}
    assert stop_before_delete(lambda: HyperPodPlatform()._stop_jobs(spec, described)) == []
    assert "Could not stop the run's jobs before deleting the cluster" in caplog.text
    assert "dtp_hyperpod_slurm" in caplog.text
    with pytest.raises(AirflowNotFoundException, match="dtp_hyperpod_slurm"):
        HyperPodPlatform()._stop_jobs(spec, described)


@pytest.mark.parametrize(("shared_dir", "exports"), [("/fsx", True), ("/fsx/ubuntu", False)])
def test_the_cluster_names_its_file_system_only_where_it_is_mounted_at_the_shared_dir(
    settings, monkeypatch, shared_dir, exports
) -> None:
    # The lifecycle scripts mount fsx_dns_name's file system at /fsx: export paths are relative to that root.
    controller = {"conn_type": "generic", "extra": {"transport": "local", "shared_dir": shared_dir}}
    monkeypatch.setenv("AIRFLOW_CONN_HYPERPOD_CONTROLLER", json.dumps(controller))
    settings(slurm_conn_id="hyperpod_controller")
    described = {"ClusterName": "c", "ClusterArn": "arn:aws:sagemaker:us-east-1:111122223333:cluster/c",
                 "CreationTime": datetime(2026, 12, 6, tzinfo=UTC)}  # fmt: skip
    cluster = HyperPodPlatform()._record(spec_for(), described, Placement("p5.48xlarge", NETWORK["PrivateSubnet"]))
    assert cluster.get("fsx_file_system_id") == ("fs-0123456789abcdef0" if exports else None)
    assert cluster["created_at"] == datetime(2026, 12, 6, tzinfo=UTC).timestamp()


@pytest.fixture
def hook(moto_aws: Any, monkeypatch: pytest.MonkeyPatch) -> HyperPodHook:
    """The hook the platform makes, whose SageMaker client the ``stub`` fixture answers (S3 is moto's)."""
    hook = HyperPodHook(aws_conn_id="aws_default")
    monkeypatch.setattr(hyperpod_platform, "HyperPodHook", lambda **_: hook)
    return hook


@pytest.mark.parametrize("status", ["InService", "Deleting"])
def test_start_teardown_deletes_the_cluster_and_its_lifecycle_objects_without_waiting(
    settings, moto_aws, stub: Stubber, status: str
) -> None:
    spec = spec_for()
    name = spec["names"]["run_key"]
    s3 = moto_aws("s3")
    s3.create_bucket(Bucket=SETTINGS["lifecycle_bucket"])
    for key in (f"{name}/lifecycle/on_create.sh", f"{name}/lifecycle/provisioning_parameters.json", "other/x"):
        s3.put_object(Bucket=SETTINGS["lifecycle_bucket"], Key=key, Body=b"#")
    stub_teardown(stub, name, status)
    done = HyperPodPlatform().start_teardown(spec)
    assert done == {"cancelled_jobs": [], "deleted_cluster": True, "deleted_lifecycle_objects": 2}
    # The nodes read the lifecycle objects only when they are created: they go when the deletion starts.
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=SETTINGS["lifecycle_bucket"])["Contents"]] == ["other/x"]


def test_the_deleted_trigger_waits_half_an_hour_for_the_clusters_of_every_spec(settings) -> None:
    specs = [spec_for(), run_spec(parse_params(TrainParams, {"platform": "hyperpod"}), "train_e2e", "manual__2")]
    trigger = HyperPodPlatform().deleted_trigger(specs)
    assert trigger.cluster_names == [spec["names"]["run_key"] for spec in specs]
    assert (trigger.aws_conn_id, trigger.timeout) == ("aws_default", 1800)
