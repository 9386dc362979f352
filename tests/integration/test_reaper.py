"""The reaper finds resources past their expiry by tag, leaves the rest, and deletes in order."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.hooks.slurm import SlurmHook
from dtp.hooks.sweeper import RunResourceSweeper
from dtp.images.ami import BUILDER_TAG
from dtp.naming import RunNames, expiry, resource_tags, slurm_comment
from dtp.pipeline import network
from dtp.pipeline.run_dirs import RUN_MARKER, claim_run_dir
from dtp.reaper.aws import find_expired_in_aws
from dtp.reaper.cluster import expired_run_dirs, find_expired_on_cluster
from dtp.reaper.deletion import ReapIncomplete, reap
from dtp.reaper.expired import Expired

pytestmark = pytest.mark.stack
AWS, SLURM = "aws_default", "slurm_default"


def no_run_active(dag_id: str, run_id: str) -> bool:
    return False


def in_aws(active: Callable[[str, str], bool] = no_run_active) -> list[Expired]:
    """What ``find_expired_in_aws`` finds, every kind looked for."""
    findings = find_expired_in_aws(AWS, active=active, installation="")
    assert findings.unsearched == {}
    return findings.found


def _spec(hours: float) -> dict:
    names = RunNames("it_reaper", f"manual__{uuid.uuid4().hex}")
    return {
        "dag_id": names.dag_id,
        "run_id": names.run_id,
        "params": {"keep_cluster": True, "platform": "batch", "instance_type": "m5.2xlarge"},
        "names": names.as_dict(),
        "tags": resource_tags(names, "tiny", expiry(hours)),
    }


def _submit(stack, spec: dict) -> str:
    """A job of ``spec``'s run, named and commented as its jobs are; its id."""
    workdir = stack.shared_dir / "it" / uuid.uuid4().hex[:8]
    workdir.mkdir(parents=True)
    (workdir / "job.sh").write_text("#!/bin/bash\nsleep 300\n")
    return SlurmHook().submit(
        str(workdir / "job.sh"),
        job_name=spec["names"]["slurm_job"],
        output=str(workdir / "o-%j"),
        comment=slurm_comment(spec["tags"]["dtp:expires-at"], spec["dag_id"], spec["run_id"]),
    )


def test_reaper_deletes_only_what_expired(stack, aws) -> None:
    # running: a run cleared after its expiry, still running, which rebuilt its network and resubmitted its job.
    expired, alive, running = _spec(-1), _spec(24), _spec(-1)
    for spec in (expired, alive, running):
        network.create_network_stack(spec, AWS)
        network.network_outputs(spec, AWS)
    job_id, running_job = _submit(stack, expired), _submit(stack, running)

    def active(dag_id: str, run_id: str) -> bool:
        return (dag_id, run_id) == (running["dag_id"], running["run_id"])

    try:
        found = in_aws(active) + find_expired_on_cluster(SLURM, active=active, installation="")
        mine = {
            (f.kind, f.run_key)
            for f in found
            if f.run_key in (expired["names"]["run_key"], expired["names"]["slurm_job"])
        }
        assert mine == {
            ("stack", expired["names"]["run_key"]),
            ("bucket", expired["names"]["run_key"]),
            ("vpc", expired["names"]["run_key"]),
            ("slurm_job", expired["names"]["slurm_job"]),
        }
        assert not any(f.run_key in (alive["names"]["run_key"], running["names"]["run_key"]) for f in found)

        dry = reap(found, AWS, SLURM, dry_run=True)
        assert dry["deleted"] == [] and RunResourceSweeper(aws_conn_id=AWS).find(expired["names"]["run_key"])["vpcs"]

        result = reap(found, AWS, SLURM, dry_run=False)
        assert {d["kind"] for d in result["deleted"]} >= {"stack", "bucket", "vpc", "slurm_job"}
        left = RunResourceSweeper(aws_conn_id=AWS).find(expired["names"]["run_key"], (expired["names"]["data_bucket"],))
        assert all(ids == [] for ids in left.values()), left
        assert SlurmHook().get_job(job_id).state in ("CANCELLED", "COMPLETING")
        for spec in (alive, running):
            kept = RunResourceSweeper(aws_conn_id=AWS).find(spec["names"]["run_key"], (spec["names"]["data_bucket"],))
            assert kept["vpcs"] and kept["buckets"]
        assert SlurmHook().get_job(running_job).state in ("PENDING", "RUNNING")
    finally:
        SlurmHook().cancel_and_wait(running["names"]["slurm_job"])
    for spec in (alive, running):
        network.teardown_network({**spec, "params": {"keep_cluster": False}}, AWS)


def _parallelcluster_stack(aws, spec: dict, vpc: str) -> str:
    """What ``pcluster create-cluster`` leaves of a run's cluster in CloudFormation, as far as the emulator can hold
    it: a root stack named after the cluster (the run key), tagged with the config's Tags (the run's) and what pcluster
    adds to them, holding a head node security group in the run's VPC; its name."""
    template = {
        "Resources": {
            "HeadNodeSecurityGroup": {
                "Type": "AWS::EC2::SecurityGroup",
                "Properties": {"GroupDescription": "head node", "VpcId": vpc},
            }
        }
    }
    name = spec["names"]["run_key"]
    tags = {**spec["tags"], "parallelcluster:cluster-name": name, "parallelcluster:version": "3.16.1"}
    aws("cloudformation").create_stack(
        StackName=name, TemplateBody=json.dumps(template), Tags=[{"Key": k, "Value": v} for k, v in tags.items()]
    )
    return str(name)


def test_reaper_deletes_an_expired_parallelcluster_clusters_stack_then_its_runs_network(stack, aws) -> None:
    spec = _spec(-1)
    run_key = spec["names"]["run_key"]
    network.create_network_stack(spec, AWS)
    outputs = network.network_outputs(spec, AWS)
    cluster = _parallelcluster_stack(aws, spec, outputs["VPC"])

    found = [f for f in in_aws() if f.run_key == run_key]
    assert sorted((f.kind, f.name) for f in found) == [
        ("bucket", spec["names"]["data_bucket"]),
        ("parallelcluster", cluster),
        ("stack", spec["names"]["network_stack"]),
        ("vpc", outputs["VPC"]),
    ]
    deleted = [(d["kind"], d["name"]) for d in reap(found, AWS, None, dry_run=False)["deleted"]]
    assert deleted[0] == ("parallelcluster", cluster)  # gone before the network is touched
    live = {s["StackName"] for s in aws("cloudformation").describe_stacks()["Stacks"]}
    assert cluster not in live and spec["names"]["network_stack"] not in live
    left = RunResourceSweeper(aws_conn_id=AWS).find(run_key, (spec["names"]["data_bucket"],))
    assert all(ids == [] for ids in left.values()), left


def _ami(aws, tags: dict[str, str]) -> tuple[str, str]:
    ec2 = aws("ec2")
    source = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=source, MinCount=1, MaxCount=1, InstanceType="t3.micro")["Instances"][0]
    image_id = ec2.create_image(InstanceId=instance["InstanceId"], Name=f"dtp-it-{uuid.uuid4().hex[:8]}")["ImageId"]
    ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
    snapshot = ec2.describe_images(ImageIds=[image_id])["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    ec2.create_tags(Resources=[image_id, snapshot], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
    return image_id, snapshot


def test_reaper_deletes_expired_amis_but_never_a_published_one(stack, aws) -> None:
    tags = resource_tags(RunNames("ami_bake", f"manual__{uuid.uuid4().hex}"), "ami-bake", expiry(-1))
    expired, snapshot = _ami(aws, tags)
    published, _ = _ami(aws, tags)
    family = f"it-{uuid.uuid4().hex[:6]}"
    aws("ssm").put_parameter(Name=f"/dtp/amis/{family}", Value=published, Type="String")
    try:
        found = [f for f in in_aws() if f.kind == "ami"]
        assert expired in {f.name for f in found} and published not in {f.name for f in found}
        reap([f for f in found if f.name == expired], AWS, None, dry_run=False)
        ec2 = aws("ec2")
        assert ec2.describe_images(Filters=[{"Name": "image-id", "Values": [expired]}])["Images"] == []
        assert snapshot not in {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
        assert ec2.describe_images(ImageIds=[published])["Images"]
    finally:
        aws("ssm").delete_parameter(Name=f"/dtp/amis/{family}")


def _cluster(aws, spec: dict) -> str:
    """A HyperPod cluster in the emulator, tagged as ``spec``'s run tags it; its name."""
    group = {
        "InstanceGroupName": "compute-nodes",
        "InstanceType": "ml.m5.2xlarge",
        "InstanceCount": 1,
        "LifeCycleConfig": {"SourceS3Uri": "s3://sagemaker-dtp-it/lifecycle/", "OnCreate": "on_create.sh"},
        "ExecutionRole": "arn:aws:iam::123456789012:role/dtp-hyperpod-execution",
        "ThreadsPerCore": 1,
    }
    tags = [{"Key": k, "Value": v} for k, v in spec["tags"].items()]
    aws("sagemaker").create_cluster(ClusterName=spec["names"]["run_key"], InstanceGroups=[group], Tags=tags)
    return str(spec["names"]["run_key"])


def test_reaper_deletes_an_expired_hyperpod_cluster_and_leaves_a_live_one(stack, aws) -> None:
    sagemaker = aws("sagemaker")
    clusters = {label: _cluster(aws, _spec(hours)) for label, hours in (("expired", -1), ("alive", 24))}

    found = [f for f in in_aws() if f.kind == "hyperpod_cluster"]
    assert [f.name for f in found if f.name in clusters.values()] == [clusters["expired"]]
    assert clusters["expired"] in [d["name"] for d in reap(found, AWS, None, dry_run=False)["deleted"]]
    names = {c["ClusterName"] for c in sagemaker.list_clusters()["ClusterSummaries"]}
    assert clusters["expired"] not in names and clusters["alive"] in names
    sagemaker.delete_cluster(ClusterName=clusters["alive"])


def test_reaper_deletes_an_expired_runs_batch_queue_and_compute_environment(stack, aws) -> None:
    batch, spec = aws("batch"), _spec(-1)
    run_key = spec["names"]["run_key"]
    role = aws("iam").create_role(RoleName=f"{run_key}-batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    environment = batch.create_compute_environment(
        computeEnvironmentName=f"{run_key}-ce", type="UNMANAGED", state="ENABLED", serviceRole=role, tags=spec["tags"]
    )
    order = [{"order": 1, "computeEnvironment": environment["computeEnvironmentArn"]}]
    batch.create_job_queue(
        jobQueueName=f"{run_key}-queue", state="ENABLED", priority=1, computeEnvironmentOrder=order, tags=spec["tags"]
    )
    found = [f for f in in_aws() if f.run_key == run_key]
    assert [(f.kind, f.name) for f in found] == [("batch", f"{run_key}-ce")]
    assert [d["name"] for d in reap(found, AWS, None, dry_run=False)["deleted"]] == [f"{run_key}-ce"]
    assert batch.describe_job_queues(jobQueues=[f"{run_key}-queue"])["jobQueues"] == []
    assert batch.describe_compute_environments(computeEnvironments=[f"{run_key}-ce"])["computeEnvironments"] == []
    aws("iam").delete_role(RoleName=f"{run_key}-batch")


def test_a_resource_that_cannot_be_deleted_stops_neither_the_other_runs_nor_the_report(stack, aws, set_rules) -> None:
    stuck, other = _spec(-1), _spec(-1)
    for spec in (stuck, other):
        network.create_network_stack(spec, AWS)
        network.network_outputs(spec, AWS)
    _cluster(aws, stuck)
    runs = {stuck["names"]["run_key"], other["names"]["run_key"]}
    found = [f for f in in_aws() if f.run_key in runs]
    set_rules([{"service": "sagemaker", "action": "DeleteCluster", "code": "AccessDeniedException", "status": 400}])
    with pytest.raises(ReapIncomplete, match=rf"run {stuck['names']['run_key']}: hyperpod_cluster .*AccessDenied"):
        reap(found, AWS, None, dry_run=False)
    sweeper = RunResourceSweeper(aws_conn_id=AWS)
    assert sweeper.find(other["names"]["run_key"], (other["names"]["data_bucket"],))["vpcs"] == []
    # The cluster's nodes would still be in the stuck run's subnets: its network is left for the next sweep.
    assert sweeper.find(stuck["names"]["run_key"])["vpcs"]
    set_rules([])
    reap([f for f in in_aws() if f.run_key in runs], AWS, None, dry_run=False)
    assert sweeper.find(stuck["names"]["run_key"], (stuck["names"]["data_bucket"],))["vpcs"] == []


def test_reaper_terminates_an_expired_packer_builder_and_leaves_a_live_one(stack, aws) -> None:
    # What a bake whose worker died with it leaves: packer's instance, tagged by ami_bake as its builder.
    ec2 = aws("ec2")
    source = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    builders = {}
    for label, hours in (("expired", -1), ("alive", 12)):
        tags = {**_spec(hours)["tags"], BUILDER_TAG: "true"}
        tagging = [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
        launched = ec2.run_instances(ImageId=source, MinCount=1, MaxCount=1, TagSpecifications=tagging)
        builders[label] = launched["Instances"][0]["InstanceId"]

    found = [f for f in in_aws() if f.kind == "builder_instance"]
    assert [f.name for f in found if f.name in builders.values()] == [builders["expired"]]
    reap([f for f in found if f.name == builders["expired"]], AWS, None, dry_run=False)
    states = {
        i["InstanceId"]: i["State"]["Name"]
        for r in ec2.describe_instances(InstanceIds=list(builders.values()))["Reservations"]
        for i in r["Instances"]
    }
    assert states == {builders["expired"]: "terminated", builders["alive"]: "running"}
    ec2.terminate_instances(InstanceIds=[builders["alive"]])


def test_reaper_removes_expired_run_directories_from_the_shared_filesystem(stack) -> None:
    cluster = {"shared_dir": str(stack.shared_dir), "slurm_conn_id": SLURM}
    expired, alive, moved, listed = _spec(-1), _spec(24), _spec(-1), _spec(-1)
    directories = {}
    for label, spec in (("expired", expired), ("alive", alive), ("moved", moved), ("listed", listed)):
        directories[label] = claim_run_dir(spec, cluster)
        (directories[label] / "checkpoints" / "step_10").mkdir(parents=True)
        (directories[label] / "checkpoints" / "step_10" / "__0_0.distcp").write_bytes(b"x")
    # A marker copied into another run's directory names a run that is not that directory's: nothing is deleted.
    marker = json.loads((directories["moved"] / RUN_MARKER).read_text())
    (directories["moved"] / RUN_MARKER).write_text(json.dumps({**marker, "run_key": expired["names"]["run_key"]}))
    # A marker that is JSON but no object is skipped, and the other directories are still searched.
    (directories["listed"] / RUN_MARKER).write_text(json.dumps([marker]))

    found = [f for f in find_expired_on_cluster(SLURM, active=no_run_active, installation="") if f.kind == "run_dir"]
    mine = [f for f in found if f.name in {str(d) for d in directories.values()}]
    assert [(f.name, f.run_key) for f in mine] == [(str(directories["expired"]), expired["names"]["run_key"])]
    assert reap(mine, AWS, SLURM, dry_run=True)["deleted"] == [] and directories["expired"].exists()
    assert [d["name"] for d in reap(mine, AWS, SLURM, dry_run=False)["deleted"]] == [str(directories["expired"])]
    assert not directories["expired"].exists()
    assert (directories["alive"] / "checkpoints" / "step_10" / "__0_0.distcp").exists()
    assert directories["moved"].exists() and directories["listed"].exists()
    for label in ("alive", "moved", "listed"):
        shutil.rmtree(directories[label])


def test_a_shared_filesystem_with_no_runs_yet_has_no_expired_run_directories(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_FRESH_FS", json.dumps({"conn_type": "generic", "extra": {"shared_dir": str(tmp_path)}})
    )
    # The search fails when the runs directory cannot be listed; one not there yet is nothing to reap.
    assert expired_run_dirs(SharedFilesystemHook("fresh_fs"), datetime.now(UTC)) == []
