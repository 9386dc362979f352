"""Connections written before a rule of cluster creation (a passed role named dtp-*, ParallelCluster's
ssh_allowed_ips) still tear down the clusters made with them: in-flight runs, kept clusters and earlier incarnations
would otherwise bill until the reaper's expiry. Only a new cluster is refused, before anything exists."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from dtp.form_params import parse_params
from dtp.naming import RunNames
from dtp.params import TrainParams
from dtp.pipeline.spec import build_spec, run_spec
from dtp.platforms.base import PlatformNotReady
from dtp.platforms.batch import BatchPlatform
from dtp.platforms.hyperpod import HyperPodPlatform
from dtp.platforms.parallelcluster import ParallelClusterPlatform
from dtp.triggers.parallelcluster import ParallelClusterDeleteTrigger

# A run the three platforms all take.
CONF = {"recipe": "tiny", "instance_type": "m5.2xlarge", "num_nodes": 1}
NETWORK = {"SecurityGroup": "sg-0123456789abcdef0", "PrivateSubnet": "subnet-0123456789abcdef0"}
# Connections from before the rules: roles not named dtp-*, no ssh_allowed_ips.
OLD_EXECUTION_ROLE = "arn:aws:iam::111122223333:role/hyperpod-execution"
OLD_HYPERPOD = {"execution_role_arn": OLD_EXECUTION_ROLE, "lifecycle_bucket": "sagemaker-dtp-lifecycle"}
OLD_BATCH = {"instance_role_arn": "arn:aws:iam::111122223333:instance-profile/ecsInstanceRole"}
OLD_PARALLELCLUSTER = {"key_name": "k"}
# What each refusal says, after "connection 'dtp_<platform>' extra: ".
HYPERPOD_REFUSAL = (
    r"execution_role_arn: the role's name 'hyperpod-execution' must start with 'dtp-', with no path: the worker "
    r"policy \(docs/iam/dtp-worker-policy.json\) lets DTP pass only dtp-\* roles to SageMaker"
)
BATCH_REFUSAL = (
    r"instance_role_arn: the instance profile's name 'ecsInstanceRole' must start with 'dtp-', with no path, and so "
    r"must its role's: the worker policy \(docs/iam/dtp-worker-policy.json\) lets DTP pass only dtp-\* roles to Batch"
)
PARALLELCLUSTER_REFUSAL = (
    r"ssh_allowed_ips: required: the IPv4 CIDR of the Airflow workers' egress \(their NAT gateway's address/32, "
    r"say\), the only addresses that may reach the head node's ssh"
)
# A pcluster that lists each command in ``calls`` beside it and describes the clusters of ``clusters.json`` (a name
# absent from it: no such cluster).
RECORDING_PCLUSTER = """
import json, pathlib, sys
here = pathlib.Path(__file__).parent
with open(here / "calls", "a") as calls:
    calls.write(" ".join(sys.argv[1:4:2]) + "\\n")
clusters = json.loads((here / "clusters.json").read_text())
if sys.argv[1] == "describe-cluster":
    name = sys.argv[3]
    if name not in clusters:
        print(json.dumps({"message": f"Cluster '{name}' does not exist or belongs to an incompatible version."}))
        sys.exit(1)
    print(json.dumps({"clusterStatus": clusters[name], "creationTime": "2026-01-01T00:00:00.000Z", "failures": []}))
"""


def use_connection(monkeypatch: pytest.MonkeyPatch, platform: str, extra: dict[str, Any]) -> None:
    conn = {"conn_type": "generic", "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_DTP_{platform.upper()}", json.dumps(conn))


def spec_for(platform: str) -> dict[str, Any]:
    return run_spec(parse_params(TrainParams, {"platform": platform, **CONF}), "train_e2e", "manual__1")


def recording_pcluster(tmp_path: Path, clusters: dict[str, str]) -> str:
    """A pcluster executable describing ``clusters`` (name -> status) and listing its commands in ``calls``."""
    (tmp_path / "clusters.json").write_text(json.dumps(clusters))
    executable = tmp_path / "pcluster"
    executable.write_text(f"#!{sys.executable}\n{RECORDING_PCLUSTER}")
    executable.chmod(0o755)
    return str(executable)


def test_an_old_hyperpod_connection_deletes_the_runs_cluster(monkeypatch, moto_aws) -> None:
    use_connection(monkeypatch, "hyperpod", OLD_HYPERPOD)
    spec = spec_for("hyperpod")
    name = spec["names"]["run_key"]
    sagemaker = moto_aws("sagemaker")
    lifecycle = {"SourceS3Uri": f"s3://sagemaker-dtp-lifecycle/{name}/lifecycle/", "OnCreate": "on_create.sh"}
    group = {"InstanceGroupName": "controller-machine", "InstanceType": "ml.m5.12xlarge", "InstanceCount": 1,
             "LifeCycleConfig": lifecycle, "ExecutionRole": OLD_EXECUTION_ROLE, "ThreadsPerCore": 2}  # fmt: skip
    sagemaker.create_cluster(ClusterName=name, InstanceGroups=[group])
    # The controller's Slurm connection is not defined: logged, and the deletion goes on.
    done = HyperPodPlatform().start_teardown(spec)
    assert done == {"cancelled_jobs": [], "deleted_cluster": True, "deleted_lifecycle_objects": 0}
    assert sagemaker.list_clusters()["ClusterSummaries"] == []


def test_an_old_parallelcluster_connection_deletes_the_runs_cluster(monkeypatch, tmp_path, first_event) -> None:
    spec = spec_for("parallelcluster")
    name = spec["names"]["run_key"]
    pcluster = recording_pcluster(tmp_path, {name: "CREATE_FAILED"})
    use_connection(monkeypatch, "parallelcluster", {**OLD_PARALLELCLUSTER, "pcluster": pcluster})
    aws = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": {"region_name": "eu-west-1"}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(aws))
    done = ParallelClusterPlatform().start_teardown(spec)
    assert done == {"cluster_name": name, "cancelled_jobs": [], "deleted": True}
    assert (tmp_path / "calls").read_text().splitlines() == [f"describe-cluster {name}", f"delete-cluster {name}"]
    # The wait for the deletion, in the triggerer, reads the connection too.
    (tmp_path / "clusters.json").write_text("{}")
    event = first_event(ParallelClusterDeleteTrigger([name], poll_interval=0.1))
    assert event == {"status": "success", "message": f"ParallelCluster clusters {name} are deleted"}


def test_an_old_batch_connection_deletes_the_runs_queue_and_compute_environment(monkeypatch, moto_aws) -> None:
    use_connection(monkeypatch, "batch", OLD_BATCH)
    run_key = spec_for("batch")["names"]["run_key"]
    role = moto_aws("iam").create_role(RoleName="batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    batch = moto_aws("batch")
    batch.create_compute_environment(
        computeEnvironmentName=f"{run_key}-ce", type="UNMANAGED", state="ENABLED", serviceRole=role
    )
    order = [{"order": 1, "computeEnvironment": f"{run_key}-ce"}]
    batch.create_job_queue(jobQueueName=f"{run_key}-queue", state="ENABLED", priority=1, computeEnvironmentOrder=order)
    # Each is disabled, then deleted, waiting on it for the connection's wait_timeout_minutes.
    done = BatchPlatform(poll_seconds=0).teardown(spec_for("batch"))
    assert (done["deleted_job_queue"], done["deleted_compute_environment"]) == (True, True)
    assert batch.describe_job_queues(jobQueues=[f"{run_key}-queue"])["jobQueues"] == []


@pytest.mark.parametrize(
    ("platform", "extra", "refusal"),
    [
        ("hyperpod", OLD_HYPERPOD, HYPERPOD_REFUSAL),
        ("batch", OLD_BATCH, BATCH_REFUSAL),
        ("parallelcluster", OLD_PARALLELCLUSTER, PARALLELCLUSTER_REFUSAL),
    ],
)
def test_an_old_connection_is_refused_a_new_cluster_at_validate_params(monkeypatch, platform, extra, refusal) -> None:
    use_connection(monkeypatch, platform, extra)
    with pytest.raises(PlatformNotReady, match=rf"^connection 'dtp_{platform}' extra: {refusal}"):
        build_spec({}, {"platform": platform, **CONF}, RunNames("train_e2e", "manual__1"))


def test_a_run_validated_before_the_upgrade_creates_nothing_with_an_old_connection(
    monkeypatch, moto_aws, tmp_path
) -> None:
    """A run whose spec was fixed before the upgrade, its deploy_cluster retried after it."""
    use_connection(monkeypatch, "hyperpod", OLD_HYPERPOD)
    with pytest.raises(PlatformNotReady, match=rf"^connection 'dtp_hyperpod' extra: {HYPERPOD_REFUSAL}"):
        HyperPodPlatform().provision(spec_for("hyperpod"), NETWORK)
    assert moto_aws("sagemaker").list_clusters()["ClusterSummaries"] == []
    assert moto_aws("s3").list_buckets()["Buckets"] == []  # nor the lifecycle bucket

    use_connection(monkeypatch, "batch", OLD_BATCH)
    monkeypatch.setattr(BatchPlatform, "client", property(lambda _: pytest.fail("provision called Batch")))
    with pytest.raises(PlatformNotReady, match=rf"^connection 'dtp_batch' extra: {BATCH_REFUSAL}"):
        BatchPlatform().provision(spec_for("batch"), NETWORK)

    pcluster = recording_pcluster(tmp_path, {})
    use_connection(monkeypatch, "parallelcluster", {**OLD_PARALLELCLUSTER, "pcluster": pcluster})
    with pytest.raises(PlatformNotReady, match=rf"^connection 'dtp_parallelcluster' extra: {PARALLELCLUSTER_REFUSAL}"):
        ParallelClusterPlatform().provision(spec_for("parallelcluster"), NETWORK)
    assert not (tmp_path / "calls").exists()
