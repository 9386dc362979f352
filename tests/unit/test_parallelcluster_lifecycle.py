"""The ParallelCluster platform's pcluster CLI and cluster lifecycle: argv lists with the connection's region,
credentials and endpoint, what provision and the create trigger make of each cluster state, and the teardown's
deletion and its wait, synchronous or in the delete trigger (a stand-in ``pcluster`` answers at the boundary: the
ParallelCluster API cannot run here)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowNotFoundException
from botocore.stub import Stubber
from parallelcluster_support import NETWORK, make_spec, needs_pcluster, use_settings

from dtp.hooks.stacks import StackHook
from dtp.platforms import parallelcluster as pc
from dtp.platforms.base import PlatformNotReady
from dtp.platforms.pcluster_cli import PclusterCli
from dtp.triggers.parallelcluster import ParallelClusterCreateTrigger, ParallelClusterDeleteTrigger


def test_cli_commands_are_argv_lists_with_the_connection_s_region_credentials_and_endpoint(monkeypatch) -> None:
    use_settings(monkeypatch, endpoint="http://127.0.0.1:1", key_name="k")
    cli = PclusterCli("/opt/pcluster", "aws_default")
    assert cli.command("describe-cluster", "--cluster-name", "x; rm -rf /") == [
        "/opt/pcluster",
        "describe-cluster",
        "--cluster-name",
        "x; rm -rf /",
        "--region",
        "eu-west-1",
    ]
    env = cli.environment()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1" and env["AWS_REGION"] == "eu-west-1"
    assert env["AWS_ACCESS_KEY_ID"] == env["AWS_SECRET_ACCESS_KEY"] == "testing"


def test_cli_without_an_endpoint_talks_to_aws(monkeypatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    use_settings(monkeypatch, key_name="k")
    assert "AWS_ENDPOINT_URL" not in PclusterCli("/opt/pcluster").environment()


def stand_in_pcluster(
    tmp_path: Path, status: str, created: str = "2026-01-01T00:00:00.000Z", head_node: dict | None = None
) -> str:
    """A pcluster executable that describes every cluster as ``status``, created at ``created``, its head node
    ``head_node`` (default: at 10.0.0.7) (the ParallelCluster API cannot run here)."""
    head = {"privateIpAddress": "10.0.0.7"} if head_node is None else head_node
    answer = json.dumps({"clusterStatus": status, "creationTime": created, "headNode": head, "failures": []})
    executable = tmp_path / "pcluster"
    executable.write_text(f"#!/bin/sh\n[ \"$1\" = describe-cluster ] && echo '{answer}'\n")
    executable.chmod(0o755)
    return str(executable)


@needs_pcluster
def test_a_cluster_an_earlier_try_left_create_failed_fails_the_task_without_retries(monkeypatch, tmp_path) -> None:
    platform = use_settings(monkeypatch, key_name="k", pcluster=stand_in_pcluster(tmp_path, "CREATE_FAILED"))
    with pytest.raises(PlatformNotReady, match=r"exists and is CREATE_FAILED"):
        platform.provision(make_spec("llama3_1_8b", "p5.48xlarge", 2), NETWORK)


@needs_pcluster
def test_a_retry_waits_for_the_cluster_an_earlier_try_created_only_until_its_own_deadline(
    monkeypatch, tmp_path, first_event
) -> None:
    # The earlier try created the cluster 61 minutes ago and timed out waiting: the retry must not wait an hour more.
    created = (datetime.now(UTC) - timedelta(minutes=61)).isoformat()
    pcluster = stand_in_pcluster(tmp_path, "CREATE_IN_PROGRESS", created)
    platform = use_settings(monkeypatch, key_name="k", pcluster=pcluster)
    cluster = platform.provision(make_spec("llama3_1_8b", "p5.48xlarge", 2), NETWORK)
    assert cluster["created_at"] == datetime.fromisoformat(created).timestamp()
    assert "fsx_file_system_id" not in cluster  # its own file system: deleted with it, nothing for FSx to export to
    trigger = platform.ready_trigger(cluster)
    trigger.poll_interval = 0.1
    event = first_event(trigger)
    assert event["status"] == "failed" and "is still CREATE_IN_PROGRESS after 3600 s" in event["message"]


@needs_pcluster
def test_a_cluster_on_an_existing_file_system_names_it_for_the_checkpoint_export(monkeypatch, tmp_path) -> None:
    pcluster = stand_in_pcluster(tmp_path, "CREATE_COMPLETE")
    platform = use_settings(monkeypatch, key_name="k", pcluster=pcluster, fsx_file_system_id="fs-0123456789abcdef0")
    cluster = platform.provision(make_spec("llama3_1_8b", "p5.48xlarge", 2), NETWORK)
    assert cluster["fsx_file_system_id"] == "fs-0123456789abcdef0"


@pytest.mark.parametrize("status", ["CREATE_COMPLETE", "UPDATE_COMPLETE"])
def test_a_cluster_whose_head_node_runs_slurm_is_ready(monkeypatch, tmp_path, first_event, status) -> None:
    use_settings(monkeypatch, key_name="k", pcluster=stand_in_pcluster(tmp_path, status))
    event = first_event(ParallelClusterCreateTrigger("dtp-train-e2e-0123456789", poll_interval=0.1))
    assert (event["status"], event["cluster"]) == ("success", {"head_node": "10.0.0.7"})


def test_a_ready_cluster_whose_head_node_has_no_address_fails_the_wait(monkeypatch, tmp_path, first_event) -> None:
    # Its jobs could reach no head node: deploy_cluster fails, naming why, rather than using the connection's host.
    pcluster = stand_in_pcluster(tmp_path, "CREATE_COMPLETE", head_node={"privateIpAddress": None})
    use_settings(monkeypatch, key_name="k", pcluster=pcluster)
    event = first_event(ParallelClusterCreateTrigger("dtp-train-e2e-0123456789", poll_interval=0.1))
    assert event == {
        "status": "failed",
        "message": "cluster dtp-train-e2e-0123456789 is CREATE_COMPLETE, but has no head node address",
    }


def test_a_cluster_that_failed_to_create_fails_the_wait(monkeypatch, tmp_path, first_event) -> None:
    use_settings(monkeypatch, key_name="k", pcluster=stand_in_pcluster(tmp_path, "CREATE_FAILED"))
    event = first_event(ParallelClusterCreateTrigger("dtp-train-e2e-0123456789", poll_interval=0.1))
    assert event["status"] == "failed" and "is CREATE_FAILED" in event["message"]


def test_a_restarted_triggerer_keeps_the_deadline_set_when_the_task_deferred(
    monkeypatch, tmp_path, first_event
) -> None:
    # The triggerer rebuilds a trigger from what it serialized when the task deferred: the clock must not restart.
    use_settings(monkeypatch, key_name="k", pcluster=stand_in_pcluster(tmp_path, "CREATE_IN_PROGRESS"))
    deferred = ParallelClusterCreateTrigger("dtp-train-e2e-0123456789", poll_interval=0.1, timeout=3600)
    deferred.started_at -= 3601  # the task deferred an hour ago
    classpath, kwargs = deferred.serialize()
    assert classpath == "dtp.triggers.parallelcluster.ParallelClusterCreateTrigger"
    event = first_event(ParallelClusterCreateTrigger(**kwargs))
    assert event["status"] == "failed" and "is still CREATE_IN_PROGRESS after 3600 s" in event["message"]


@needs_pcluster
def test_a_kept_cluster_s_jobs_are_stopped_once_it_is_up_and_an_unreachable_head_node_fails(
    monkeypatch, tmp_path
) -> None:
    # keep_cluster: stop_jobs is all teardown_cluster does, so a head node it cannot reach fails the task (its retry
    # tries again) where teardown, about to delete the cluster and its jobs with it, only logs it.
    spec = make_spec("llama3_1_8b", "p5.48xlarge", 2)
    pcluster = stand_in_pcluster(tmp_path, "CREATE_IN_PROGRESS")
    platform = use_settings(monkeypatch, key_name="k", pcluster=pcluster, slurm_conn_id="no_such_head_node")
    assert platform.stop_jobs(spec) == {"cluster_name": platform.cluster_name(spec), "cancelled_jobs": []}
    pcluster = stand_in_pcluster(tmp_path, "CREATE_COMPLETE")
    platform = use_settings(monkeypatch, key_name="k", pcluster=pcluster, slurm_conn_id="no_such_head_node")
    with pytest.raises(AirflowNotFoundException, match="no_such_head_node"):
        platform.stop_jobs(spec)


# describe-cluster answers each cluster's next status from clusters.json beside it; every command goes to calls.
TIMELINE_PCLUSTER = """\
import json, pathlib, sys
here = pathlib.Path(sys.argv[0]).parent
action, name = sys.argv[1], sys.argv[sys.argv.index("--cluster-name") + 1]
with (here / "calls").open("a") as calls:
    calls.write(f"{action} {name}\\n")
if action == "delete-cluster":
    print("{}")
    sys.exit(0)
clusters = json.loads((here / "clusters.json").read_text())
timeline = clusters.get(name) or [None]
status = timeline.pop(0) if len(timeline) > 1 else timeline[0]
(here / "clusters.json").write_text(json.dumps(clusters))
if status is None:
    print(json.dumps({"message": f"Cluster {name} does not exist or belongs to another major version."}))
    sys.exit(1)
print(json.dumps({"clusterName": name, "clusterStatus": status, "headNode": {}, "failures": []}))
"""


def timeline_pcluster(tmp_path: Path, clusters: dict[str, list[str | None]]) -> str:
    """A pcluster executable whose describe-cluster of each cluster of ``clusters`` answers its next status (the
    last one repeats; None: the cluster does not exist), and which lists every command in ``tmp_path/calls``."""
    (tmp_path / "clusters.json").write_text(json.dumps(clusters))
    executable = tmp_path / "pcluster"
    executable.write_text(f"#!{sys.executable}\n{TIMELINE_PCLUSTER}")
    executable.chmod(0o755)
    return str(executable)


def calls(tmp_path: Path) -> list[str]:
    """The commands a ``timeline_pcluster`` was given."""
    return (tmp_path / "calls").read_text().splitlines()


def test_start_teardown_deletes_the_cluster_without_waiting_for_it(monkeypatch, tmp_path) -> None:
    spec = make_spec("llama3_1_8b", "p5.48xlarge", 2)
    name = spec["names"]["run_key"]
    pcluster = timeline_pcluster(tmp_path, {name: ["CREATE_FAILED", "DELETE_IN_PROGRESS"]})
    platform = use_settings(monkeypatch, key_name="k", pcluster=pcluster)
    assert platform.start_teardown(spec) == {"cluster_name": name, "cancelled_jobs": [], "deleted": True}
    assert calls(tmp_path) == [f"describe-cluster {name}", f"delete-cluster {name}"]


def test_a_retried_teardown_does_not_delete_a_cluster_being_deleted_again(monkeypatch, tmp_path) -> None:
    spec = make_spec("llama3_1_8b", "p5.48xlarge", 2)
    name = spec["names"]["run_key"]
    platform = use_settings(
        monkeypatch, key_name="k", pcluster=timeline_pcluster(tmp_path, {name: ["DELETE_IN_PROGRESS"]})
    )
    assert platform.start_teardown(spec) == {"cluster_name": name, "cancelled_jobs": [], "deleted": True}
    assert calls(tmp_path) == [f"describe-cluster {name}"]


def test_teardown_starts_the_deletion_and_waits_until_the_cluster_is_gone(monkeypatch, tmp_path) -> None:
    spec = make_spec("llama3_1_8b", "p5.48xlarge", 2)
    name = spec["names"]["run_key"]
    pcluster = timeline_pcluster(tmp_path, {name: ["CREATE_FAILED", "DELETE_IN_PROGRESS", None]})
    platform = use_settings(monkeypatch, key_name="k", pcluster=pcluster)
    assert platform.teardown(spec, poll=0) == {"cluster_name": name, "cancelled_jobs": [], "deleted": True}
    assert calls(tmp_path) == [f"describe-cluster {name}", f"delete-cluster {name}"] + [f"describe-cluster {name}"] * 2


def test_the_deleted_trigger_waits_an_hour_for_the_clusters_of_every_spec(monkeypatch) -> None:
    platform = use_settings(monkeypatch, key_name="k")
    specs = [make_spec("llama3_1_8b", "p5.48xlarge", 2, dag_id=dag_id) for dag_id in ("train_e2e", "train_nightly")]
    trigger = platform.deleted_trigger(specs)
    assert trigger.cluster_names == [spec["names"]["run_key"] for spec in specs]
    assert trigger.timeout == 3600


def test_deleted_clusters_are_waited_for_until_every_one_is_gone(monkeypatch, tmp_path, first_event, capsys) -> None:
    timelines = {"dtp-a": ["DELETE_IN_PROGRESS", "DELETE_IN_PROGRESS", None], "dtp-b": ["DELETE_IN_PROGRESS", None]}
    use_settings(monkeypatch, key_name="k", pcluster=timeline_pcluster(tmp_path, timelines))
    event = first_event(ParallelClusterDeleteTrigger(["dtp-a", "dtp-b", "dtp-c"], poll_interval=0.1))
    assert event == {"status": "success", "message": "ParallelCluster clusters dtp-a, dtp-b, dtp-c are deleted"}
    # The triggerer's log says which clusters are still there; a cluster found gone is not asked about again.
    logged = capsys.readouterr().out.splitlines()
    waits = [line.split("deleted: ", 1)[1].split(" [", 1)[0] for line in logged if "clusters are deleted: " in line]
    assert waits == ["dtp-a (DELETE_IN_PROGRESS), dtp-b (DELETE_IN_PROGRESS)", "dtp-a (DELETE_IN_PROGRESS)"]
    assert calls(tmp_path) == [
        *("describe-cluster dtp-a", "describe-cluster dtp-b", "describe-cluster dtp-c"),
        *("describe-cluster dtp-a", "describe-cluster dtp-b", "describe-cluster dtp-a"),
    ]


def test_a_cluster_whose_deletion_failed_fails_the_wait_with_cloudformations_reason(
    monkeypatch, tmp_path, first_event
) -> None:
    # pcluster reports no failures for DELETE_FAILED: the cluster's root stack has them.
    use_settings(monkeypatch, key_name="k", pcluster=timeline_pcluster(tmp_path, {"dtp-a": ["DELETE_FAILED"]}))
    stacks = StackHook(aws_conn_id="aws_default")
    client = stacks.get_client_type(region_name="eu-west-1")
    stacks.conn = client
    monkeypatch.setattr(pc, "StackHook", lambda aws_conn_id: stacks)
    event = {
        "StackId": "arn:aws:cloudformation:eu-west-1:111122223333:stack/dtp-a/1",
        "StackName": "dtp-a",
        "Timestamp": datetime(2026, 12, 7, tzinfo=UTC),
    }
    events = [
        {**event, "EventId": "2", "LogicalResourceId": "dtp-a", "ResourceStatus": "DELETE_FAILED",
         "ResourceStatusReason": "The following resource(s) failed to delete: [FSx]."},
        {**event, "EventId": "1", "LogicalResourceId": "FSx", "ResourceStatus": "DELETE_FAILED",
         "ResourceStatusReason": "file system has a data repository task in progress"},
    ]  # fmt: skip
    with Stubber(client) as stub:
        stub.add_response("describe_stack_events", {"StackEvents": events}, {"StackName": "dtp-a"})
        assert first_event(ParallelClusterDeleteTrigger(["dtp-a", "dtp-b"], poll_interval=0.1)) == {
            "status": "failed",
            "message": "cluster dtp-a is DELETE_FAILED: FSx: file system has a data repository task in progress; "
            "dtp-a: The following resource(s) failed to delete: [FSx].",
        }


def test_clusters_still_there_at_the_deadline_fail_the_wait_after_a_triggerer_restart(
    monkeypatch, tmp_path, first_event
) -> None:
    timelines: dict[str, list[str | None]] = {"dtp-a": ["DELETE_IN_PROGRESS"], "dtp-b": [None]}
    use_settings(monkeypatch, key_name="k", pcluster=timeline_pcluster(tmp_path, timelines))
    deferred = ParallelClusterDeleteTrigger(["dtp-a", "dtp-b"], poll_interval=0.1, timeout=3600)
    deferred.started_at -= 3601  # the task deferred an hour ago
    classpath, kwargs = deferred.serialize()
    assert classpath == "dtp.triggers.parallelcluster.ParallelClusterDeleteTrigger"
    assert kwargs["started_at"] == deferred.started_at
    assert first_event(ParallelClusterDeleteTrigger(**kwargs)) == {
        "status": "failed",
        "message": "clusters still there 3600 s after delete-cluster: dtp-a (DELETE_IN_PROGRESS)",
    }
