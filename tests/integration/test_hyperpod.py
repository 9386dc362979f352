"""The HyperPod platform against the local emulator: lifecycle upload, one cluster per run, wait, verified teardown."""

from __future__ import annotations

import json
import os
import uuid

import pytest
from paramiko.ssh_exception import SSHException

from dtp.form_params import parse_params
from dtp.hooks.hyperpod import HyperPodHook
from dtp.hooks.slurm import SlurmHook
from dtp.params import TrainParams
from dtp.pipeline.spec import run_spec
from dtp.platforms.hyperpod import HyperPodPlatform

pytestmark = pytest.mark.stack
AWS = "aws_default"


@pytest.fixture
def spec(stack) -> dict:
    params = parse_params(TrainParams, {"platform": "hyperpod", "instance_type": "m5.2xlarge", "num_nodes": 2})
    return run_spec(params, "it_hyperpod", f"manual__{uuid.uuid4().hex}")


def test_provision_twice_makes_one_cluster_and_teardown_leaves_nothing(spec, outputs, aws, first_event, stack) -> None:
    platform = HyperPodPlatform()
    run_key = spec["names"]["run_key"]
    bucket = platform.settings.lifecycle_bucket

    cluster = platform.provision(spec, outputs)
    again = platform.provision(spec, outputs)
    assert (again["cluster_arn"], again["created_at"]) == (cluster["cluster_arn"], cluster["created_at"])
    clusters = aws("sagemaker").list_clusters()["ClusterSummaries"]
    assert [c["ClusterName"] for c in clusters].count(run_key) == 1
    assert (cluster["slurm_conn_id"], cluster["scheduler"]) == ("slurm_default", "slurm")
    assert "fsx_file_system_id" not in cluster  # no FSx in the connection: the worker uploads checkpoints

    described = HyperPodHook(aws_conn_id=AWS).describe_cluster(run_key)
    groups = {g["InstanceGroupName"]: g for g in described["InstanceGroups"]}
    assert groups["compute-nodes"]["TargetCount"] == 2 and groups["compute-nodes"]["InstanceType"] == "ml.m5.2xlarge"
    assert described["VpcConfig"]["Subnets"] == [outputs["PrivateSubnet"]]

    tags = {t["Key"]: t["Value"] for t in aws("s3").get_bucket_tagging(Bucket=bucket)["TagSet"]}
    assert tags == {"dtp:owner": "dtp", "dtp:role": "hyperpod-lifecycle"}  # every run's, DTP's: found, never expired
    keys = sorted(o["Key"] for o in aws("s3").list_objects_v2(Bucket=bucket, Prefix=f"{run_key}/")["Contents"])
    assert keys == [f"{run_key}/lifecycle/on_create.sh", f"{run_key}/lifecycle/provisioning_parameters.json"]
    body = aws("s3").get_object(Bucket=bucket, Key=keys[1])["Body"].read()
    assert json.loads(body)["worker_groups"] == [
        {"instance_group_name": "compute-nodes", "partition_name": "m5.2xlarge"}
    ]

    trigger = platform.ready_trigger(cluster)
    # The wait counts from the cluster's creation, also for a retry that finds the cluster an earlier try created.
    assert trigger.started_at == cluster["created_at"] == described["CreationTime"].timestamp()
    # The stack's Slurm connection is local (this host stands in for the controller): no head node to find.
    assert first_event(trigger) == {"status": "success", "message": f"HyperPod cluster {run_key} is InService"}

    # keep_cluster's end of the run: a job of the run on the controller's Slurm (the stack's) is cancelled.
    script = stack.shared_dir / "it" / f"{run_key}.sh"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("#!/bin/bash\nsleep 300\n")
    job_id = SlurmHook().submit(str(script), job_name=spec["names"]["slurm_job"], output=str(script) + ".out")
    assert platform.stop_jobs(spec) == {"cancelled_jobs": [job_id]}

    result = platform.teardown(spec)
    assert (result["deleted_cluster"], result["deleted_lifecycle_objects"]) == (True, 2)
    assert HyperPodHook(aws_conn_id=AWS).describe_cluster(run_key) is None
    assert "Contents" not in aws("s3").list_objects_v2(Bucket=bucket, Prefix=f"{run_key}/")
    # A retried teardown finds nothing left and still succeeds.
    assert platform.teardown(spec) == {"cancelled_jobs": [], "deleted_cluster": False, "deleted_lifecycle_objects": 0}
    assert platform.stop_jobs(spec) == {"cancelled_jobs": []}  # keep_cluster's teardown: no cluster, no job
    # The trigger of a run whose cluster is gone fails instead of waiting forever.
    assert first_event(trigger)["status"] == "failed"


def test_over_ssh_the_runs_controller_is_where_its_jobs_go(spec, outputs, aws, first_event, monkeypatch) -> None:
    conn = json.loads(os.environ["AIRFLOW_CONN_DTP_HYPERPOD"])
    conn["extra"]["slurm_conn_id"] = "slurm_ssh"  # the stack's Slurm cluster, over ssh as on AWS
    monkeypatch.setenv("AIRFLOW_CONN_DTP_HYPERPOD", json.dumps(conn))
    platform = HyperPodPlatform()
    run_key = spec["names"]["run_key"]
    try:
        cluster = platform.provision(spec, outputs)
        event = first_event(platform.ready_trigger(cluster))
        (controller,) = [
            node["InstanceId"]
            for node in aws("sagemaker").list_cluster_nodes(ClusterName=run_key)["ClusterNodeSummaries"]
            if node["InstanceGroupName"] == "controller-machine"
        ]
        cluster_id = cluster["cluster_arn"].rsplit("/", 1)[1]
        target = f"sagemaker-cluster:{cluster_id}_controller-machine-{controller}"
        assert event == {
            "status": "success",
            "message": f"HyperPod cluster {run_key} is InService",
            "cluster": {"head_node": target},
        }
        # keep_cluster's stop goes there too, not to the SSH connection's own host (which would answer): only SSM
        # reaches such a name, and no ProxyCommand for it is configured here (the resolver refuses it outright).
        with pytest.raises((OSError, SSHException, UnicodeError)) as refused:
            platform.stop_jobs(spec)
        # The error names no host (the resolver's): the host ssh tried is read off paramiko's connect.
        tried = [entry.locals["hostname"] for entry in refused.traceback if entry.name == "connect"]
        assert tried == [target]
    finally:
        platform.teardown(spec)  # it logs that it could not stop the jobs there, and deletes the cluster
    assert HyperPodHook(aws_conn_id=AWS).describe_cluster(run_key) is None


def test_base_config_scripts_are_copied_under_the_run(spec, outputs, aws, monkeypatch) -> None:
    s3 = aws("s3")
    s3.create_bucket(Bucket="dtp-base-config")
    for key in ("src/lifecycle_script.py", "src/utils/mount_fsx.sh", "src/on_create.sh"):
        s3.put_object(Bucket="dtp-base-config", Key=key, Body=b"# reference base-config")
    conn = json.loads(os.environ["AIRFLOW_CONN_DTP_HYPERPOD"])
    conn["extra"]["base_config_uri"] = "s3://dtp-base-config/src/"
    conn["extra"] |= {"fsx_dns_name": "fs-0123456789abcdef0.fsx.us-east-1.amazonaws.com", "fsx_mount_name": "abcd"}
    monkeypatch.setenv("AIRFLOW_CONN_DTP_HYPERPOD", json.dumps(conn))
    platform = HyperPodPlatform()
    run_key = spec["names"]["run_key"]
    try:
        cluster = platform.provision(spec, outputs)
        # The nodes would mount it at /fsx, but the stack's Slurm cluster shares another directory: no export.
        assert "fsx_file_system_id" not in cluster
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


def test_on_eks_the_cluster_comes_and_goes_even_when_its_eks_cluster_is_out_of_reach(
    spec, outputs, aws, monkeypatch, first_event, caplog
) -> None:
    s3 = aws("s3")
    s3.create_bucket(Bucket="dtp-eks-base-config")
    s3.put_object(Bucket="dtp-eks-base-config", Key="eks/on_create.sh", Body=b"# the reference's EKS on_create.sh")
    conn = json.loads(os.environ["AIRFLOW_CONN_DTP_HYPERPOD"])
    eks_arn = "arn:aws:eks:us-east-1:123456789012:cluster/dtp-training"
    conn["extra"] |= {"base_config_uri": "s3://dtp-eks-base-config/eks/", "eks": {"cluster_arn": eks_arn}}
    monkeypatch.setenv("AIRFLOW_CONN_DTP_HYPERPOD", json.dumps(conn))
    # HyperPod on EKS goes into the EKS cluster's VPC, which dtp_network names (the stack's network stands in).
    spec = {**spec, "existing_network": {k: outputs[k] for k in ("VPC", "PrivateSubnet", "SecurityGroup")}}
    platform = HyperPodPlatform()
    run_key, bucket = spec["names"]["run_key"], platform.settings.lifecycle_bucket
    try:
        cluster = platform.provision(spec, outputs)
        assert (cluster["scheduler"], cluster["eks_cluster_name"], cluster["shared_dir"]) == (
            "kubernetes",
            "dtp-training",
            "/fsx",
        )
        assert "slurm_conn_id" not in cluster
        (group,) = HyperPodHook(aws_conn_id=AWS).describe_cluster(run_key)["InstanceGroups"]  # no controller
        assert group["InstanceGroupName"] == "compute-nodes"
        # The base-config's own on_create.sh, no Slurm parameters.
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{run_key}/")["Contents"]
        assert [o["Key"] for o in listed] == [f"{run_key}/lifecycle/on_create.sh"]
        event = first_event(platform.ready_trigger(cluster))
        assert event["status"] == "success" and "cluster" not in event  # no controller, no head node
    finally:
        # The emulator has no such EKS cluster: the run's jobs cannot be deleted, the cluster still is.
        result = platform.teardown(spec)
        s3.delete_object(Bucket="dtp-eks-base-config", Key="eks/on_create.sh")
        s3.delete_bucket(Bucket="dtp-eks-base-config")
    assert result == {"cancelled_jobs": [], "deleted_cluster": True, "deleted_lifecycle_objects": 1}
    assert "Could not stop the run's jobs before deleting the cluster" in caplog.text
    assert HyperPodHook(aws_conn_id=AWS).describe_cluster(run_key) is None


def _no_capacity(times: int) -> list[dict]:
    # SageMaker's answer when the account or zone has no p5 (then p5e) capacity for the cluster.
    message = "The account-level service limit 'ml.p5.48xlarge for cluster usage' is 0"
    return [
        {
            "service": "sagemaker",
            "action": "CreateCluster",
            "code": "ResourceLimitExceeded",
            "status": 400,
            "message": message,
            "times": times,
        }
    ]


def _compute_group(run_key: str) -> dict:
    described = HyperPodHook(aws_conn_id=AWS).describe_cluster(run_key)
    return next(g for g in described["InstanceGroups"] if g["InstanceGroupName"] == "compute-nodes")


@pytest.fixture
def p5_spec() -> dict:
    params = parse_params(
        TrainParams, {"platform": "hyperpod", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge"}
    )
    return run_spec(params, "it_hyperpod", f"manual__{uuid.uuid4().hex}")


def test_no_capacity_in_the_first_zone_falls_back_to_the_second(stack, aws, set_rules, outputs, p5_spec) -> None:
    platform = HyperPodPlatform()
    set_rules(_no_capacity(times=1))
    try:
        cluster = platform.provision(p5_spec, outputs)
        assert cluster["instance_type"] == "p5.48xlarge"
        assert cluster["placement"] == f"p5.48xlarge in {outputs['FallbackPrivateSubnet']} (on demand)"
        compute = _compute_group(p5_spec["names"]["run_key"])
        assert compute["OverrideVpcConfig"]["Subnets"] == [outputs["FallbackPrivateSubnet"]]
        subnets = aws("ec2").describe_subnets(SubnetIds=[outputs["PrivateSubnet"], outputs["FallbackPrivateSubnet"]])
        assert len({s["AvailabilityZone"] for s in subnets["Subnets"]}) == 2
    finally:
        platform.teardown(p5_spec)


def test_no_capacity_in_either_zone_falls_back_to_the_next_instance_type(
    stack, aws, set_rules, outputs, p5_spec
) -> None:
    platform = HyperPodPlatform()
    set_rules(_no_capacity(times=4))  # p5 and p5e, each in both zones
    try:
        cluster = platform.provision(p5_spec, outputs)
        assert (cluster["instance_type"], cluster["instance"]["accelerator"]) == ("p4de.24xlarge", "A100-80GB")
        compute = _compute_group(p5_spec["names"]["run_key"])
        assert compute["InstanceType"] == "ml.p4de.24xlarge" and "OverrideVpcConfig" not in compute
        # A retried task finds the cluster its fallback created and keeps its placement.
        assert platform.provision(p5_spec, outputs)["placement"] == cluster["placement"]
    finally:
        platform.teardown(p5_spec)


def test_a_training_plan_is_tried_before_on_demand(stack, aws, set_rules, outputs, p5_spec, monkeypatch) -> None:
    plan = f"arn:aws:sagemaker:us-east-1:{aws('sts').get_caller_identity()['Account']}:training-plan/p5-reserved"
    conn = json.loads(os.environ["AIRFLOW_CONN_DTP_HYPERPOD"])
    conn["extra"]["training_plans"] = {"p5.48xlarge": plan}
    monkeypatch.setenv("AIRFLOW_CONN_DTP_HYPERPOD", json.dumps(conn))
    platform = HyperPodPlatform()
    try:
        cluster = platform.provision(p5_spec, outputs)
        assert cluster["placement"] == f"p5.48xlarge in {outputs['PrivateSubnet']} (reservation {plan})"
        assert _compute_group(p5_spec["names"]["run_key"])["TrainingPlanArn"] == plan
    finally:
        platform.teardown(p5_spec)


def test_no_capacity_anywhere_says_what_was_tried(stack, aws, set_rules, outputs, p5_spec) -> None:
    set_rules([{"service": "sagemaker", "action": "CreateCluster", "code": "InsufficientCapacity", "status": 400}])
    with pytest.raises(RuntimeError, match=r"^no capacity for 2 nodes in any placement: p5.48xlarge in subnet-"):
        HyperPodPlatform().provision(p5_spec, outputs)
    assert HyperPodHook(aws_conn_id=AWS).describe_cluster(p5_spec["names"]["run_key"]) is None
    HyperPodPlatform().teardown(p5_spec)
