"""The HyperPod platform against the local emulator: lifecycle upload, one cluster per run, wait, verified teardown."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from dtp.hooks.hyperpod import HyperPodHook
from dtp.params import TrainParams, parse_params
from dtp.pipeline import network
from dtp.pipeline.spec import run_spec
from dtp.platforms.hyperpod import HyperPodPlatform

pytestmark = pytest.mark.stack
AWS = "aws_default"


@pytest.fixture
def spec(stack) -> dict:
    params = parse_params(TrainParams, {"platform": "hyperpod", "instance_type": "m5.2xlarge", "num_nodes": 2})
    return run_spec(params, "it_hyperpod", f"manual__{uuid.uuid4().hex}")


@pytest.fixture
def outputs(spec) -> dict:
    network.create_network_stack(spec, AWS)
    yield network.network_outputs(spec, AWS)
    network.teardown_network(spec, AWS)


def test_provision_twice_makes_one_cluster_and_teardown_leaves_nothing(spec, outputs, aws, first_event) -> None:
    platform = HyperPodPlatform()
    run_key = spec["names"]["run_key"]
    bucket = platform.settings.lifecycle_bucket

    cluster = platform.provision(spec, outputs)
    assert platform.provision(spec, outputs)["cluster_arn"] == cluster["cluster_arn"]
    clusters = aws("sagemaker").list_clusters()["ClusterSummaries"]
    assert [c["ClusterName"] for c in clusters].count(run_key) == 1
    assert (cluster["slurm_conn_id"], cluster["scheduler"]) == ("slurm_default", "slurm")

    described = HyperPodHook(aws_conn_id=AWS).describe_cluster(run_key)
    groups = {g["InstanceGroupName"]: g for g in described["InstanceGroups"]}
    assert groups["compute-nodes"]["TargetCount"] == 2 and groups["compute-nodes"]["InstanceType"] == "ml.m5.2xlarge"
    assert described["VpcConfig"]["Subnets"] == [outputs["PrivateSubnet"]]

    keys = sorted(o["Key"] for o in aws("s3").list_objects_v2(Bucket=bucket, Prefix=f"{run_key}/")["Contents"])
    assert keys == [f"{run_key}/lifecycle/on_create.sh", f"{run_key}/lifecycle/provisioning_parameters.json"]
    body = aws("s3").get_object(Bucket=bucket, Key=keys[1])["Body"].read()
    assert json.loads(body)["worker_groups"] == [
        {"instance_group_name": "compute-nodes", "partition_name": "m5.2xlarge"}
    ]

    trigger = platform.ready_trigger(cluster)
    assert first_event(trigger) == {"status": "success", "message": f"HyperPod cluster {run_key} is InService"}

    result = platform.teardown(spec)
    assert (result["deleted_cluster"], result["deleted_lifecycle_objects"]) == (True, 2)
    assert HyperPodHook(aws_conn_id=AWS).describe_cluster(run_key) is None
    assert "Contents" not in aws("s3").list_objects_v2(Bucket=bucket, Prefix=f"{run_key}/")
    # A retried teardown finds nothing left and still succeeds.
    assert platform.teardown(spec) == {"cancelled_jobs": [], "deleted_cluster": False, "deleted_lifecycle_objects": 0}
    # The trigger of a run whose cluster is gone fails instead of waiting forever.
    assert first_event(trigger)["status"] == "failed"


def test_base_config_scripts_are_copied_under_the_run(spec, outputs, aws, monkeypatch) -> None:
    s3 = aws("s3")
    s3.create_bucket(Bucket="dtp-base-config")
    for key in ("src/lifecycle_script.py", "src/utils/mount_fsx.sh", "src/on_create.sh"):
        s3.put_object(Bucket="dtp-base-config", Key=key, Body=b"# reference base-config")
    conn = json.loads(os.environ["AIRFLOW_CONN_DTP_HYPERPOD"])
    conn["extra"]["base_config_uri"] = "s3://dtp-base-config/src/"
    monkeypatch.setenv("AIRFLOW_CONN_DTP_HYPERPOD", json.dumps(conn))
    platform = HyperPodPlatform()
    run_key = spec["names"]["run_key"]
    try:
        platform.provision(spec, outputs)
        prefix = f"{run_key}/lifecycle/"
        listed = s3.list_objects_v2(Bucket=platform.settings.lifecycle_bucket, Prefix=prefix)["Contents"]
        keys = sorted(o["Key"].removeprefix(prefix) for o in listed)
        assert keys == ["lifecycle_script.py", "on_create.sh", "provisioning_parameters.json", "utils/mount_fsx.sh"]
        # DTP's on_create.sh replaces the base-config's: it runs lifecycle_script.py with the run's parameters.
        on_create = s3.get_object(Bucket=platform.settings.lifecycle_bucket, Key=prefix + "on_create.sh")["Body"].read()
        assert b"lifecycle_script.py -rc" in on_create
    finally:
        platform.teardown(spec)
        for key in ("src/lifecycle_script.py", "src/utils/mount_fsx.sh", "src/on_create.sh"):
            s3.delete_object(Bucket="dtp-base-config", Key=key)
        s3.delete_bucket(Bucket="dtp-base-config")


def test_no_capacity_falls_back_to_the_recipe_s_next_instance_type(stack, aws, set_rules, outputs) -> None:
    params = parse_params(
        TrainParams, {"platform": "hyperpod", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge"}
    )
    spec = run_spec(params, "it_hyperpod", f"manual__{uuid.uuid4().hex}")
    platform = HyperPodPlatform()
    # SageMaker's answer when the account or region has no p5 (then p5e) capacity for the cluster.
    set_rules(
        [
            {
                "service": "sagemaker",
                "action": "CreateCluster",
                "code": "ResourceLimitExceeded",
                "status": 400,
                "message": "The account-level service limit 'ml.p5.48xlarge for cluster usage' is 0",
                "times": 2,
            }
        ]
    )
    try:
        cluster = platform.provision(spec, outputs)
        assert (cluster["instance_type"], cluster["instance"]["accelerator"]) == ("p4de.24xlarge", "A100-80GB")
        described = HyperPodHook(aws_conn_id=AWS).describe_cluster(spec["names"]["run_key"])
        compute = next(g for g in described["InstanceGroups"] if g["InstanceGroupName"] == "compute-nodes")
        assert compute["InstanceType"] == "ml.p4de.24xlarge"
        # A retried task finds the cluster its fallback created and keeps its instance type.
        assert platform.provision(spec, outputs)["instance_type"] == "p4de.24xlarge"
    finally:
        platform.teardown(spec)


def test_no_capacity_anywhere_says_what_was_tried(stack, aws, set_rules, outputs) -> None:
    params = parse_params(
        TrainParams, {"platform": "hyperpod", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge"}
    )
    spec = run_spec(params, "it_hyperpod", f"manual__{uuid.uuid4().hex}")
    set_rules([{"service": "sagemaker", "action": "CreateCluster", "code": "InsufficientCapacity", "status": 400}])
    with pytest.raises(RuntimeError, match=r"^no capacity for 2 nodes of p5.48xlarge, p5e.48xlarge, p4de.24xlarge "):
        HyperPodPlatform().provision(spec, outputs)
    assert HyperPodHook(aws_conn_id=AWS).describe_cluster(spec["names"]["run_key"]) is None
    HyperPodPlatform().teardown(spec)
