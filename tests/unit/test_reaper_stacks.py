"""The reaper and the CloudFormation stacks a ParallelCluster cluster leaves: its root stack (tagged with the cluster
config's Tags, dtp:run and dtp:expires-at among them, and with ``parallelcluster:version``) and the nested stacks
pcluster 3 builds under it (QueuesStack, ComputeFleetStack...), which inherit those tags.

CloudFormation is answered by botocore's Stubber (every request validated against the real service model, every
canned answer against its output shapes): the emulator (moto) reports no ``ParentId`` on nested stacks and deletes a
stack synchronously (no DELETE_IN_PROGRESS to wait out). The other services find_expired_in_aws asks (S3, EC2,
SageMaker, Batch, SSM) are moto's, in process, with nothing in them. A cluster stack and its run's network in the
emulator are in tests/integration/test_reaper.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from moto import mock_aws

from dtp.hooks.stacks import StackHook
from dtp.naming import RunNames, aws_tags, resource_tags
from dtp.reaper.aws import PCLUSTER_VERSION_TAG, find_expired_in_aws
from dtp.reaper.deletion import ReapIncomplete, reap
from dtp.reaper.expired import Expired

AWS = "aws_default"
NOW = datetime(2026, 12, 5, 12, tzinfo=UTC)
EXPIRED, ALIVE = "2026-12-05T11:00:00Z", "2026-12-06T12:00:00Z"
RUN_KEY = "dtp-train-e2e-0123456789"
CLUSTER = RUN_KEY  # pcluster names the cluster's root stack after the cluster, and DTP the cluster after the run
NETWORK = f"{RUN_KEY}-network"
ARN = "arn:aws:cloudformation:us-east-1:123456789012:stack/{}/11111111-2222-3333-4444-555555555555"
CLUSTER_ID, NETWORK_ID = ARN.format(CLUSTER), ARN.format(NETWORK)
CREATED = datetime(2026, 12, 5, tzinfo=UTC)
INSTALLATION, OTHER_INSTALLATION = "0a1b2c3d", "4e5f6a7b"


def no_run_active(dag_id: str, run_id: str) -> bool:
    return False


FSX_REASON = "Resource handler returned message: \"File system 'fs-0123456789abcdef0' is in use\""


def _tags(run_key: str, expires_at: str, cluster: bool = False) -> dict[str, str]:
    tags = {"dtp:owner": "dtp", "dtp:run": run_key, "dtp:expires-at": expires_at}
    if cluster:  # what pcluster adds to the config's Tags (pcluster/models/cluster.py, Cluster._add_tags)
        tags |= {"parallelcluster:cluster-name": run_key, "parallelcluster:version": "3.16.1"}
    return tags


def _stack(name: str, status: str, tags: dict[str, str] | None = None, parent: str | None = None) -> dict[str, Any]:
    stack: dict[str, Any] = {
        "StackId": ARN.format(name),
        "StackName": name,
        "CreationTime": CREATED,
        "StackStatus": status,
        "Tags": aws_tags(tags or {}),
    }
    if parent:
        stack |= {"ParentId": parent, "RootId": parent}
    return stack


@pytest.fixture
def aws_default(monkeypatch: pytest.MonkeyPatch, offline_aws: None) -> None:
    aws = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": {"region_name": "us-east-1"}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(aws))


@pytest.fixture
def cloudformation(aws_default: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stubber]:
    """Every StackHook's client, answered by the Stubber."""
    client = StackHook(aws_conn_id=AWS).get_client_type(region_name="us-east-1")
    monkeypatch.setattr(StackHook, "conn", client)
    with Stubber(client) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


def test_a_parallelcluster_cluster_is_its_root_stack_and_its_nested_stacks_are_not_reaped(cloudformation) -> None:
    cluster_tags = _tags(RUN_KEY, EXPIRED, cluster=True)
    stacks = [
        _stack(NETWORK, "CREATE_COMPLETE", _tags(RUN_KEY, EXPIRED)),
        _stack(CLUSTER, "CREATE_COMPLETE", cluster_tags),
        # pcluster 3's nested stacks, with the tags of their root: deleted with it, never on their own.
        _stack(f"{CLUSTER}-QueuesStack-1A2B3C4D5E6F", "CREATE_COMPLETE", cluster_tags, parent=CLUSTER_ID),
        _stack(f"{CLUSTER}-ComputeFleetStack-6F5E4D3C2B1A", "CREATE_COMPLETE", cluster_tags, parent=CLUSTER_ID),
        # Another run's cluster that has not expired.
        _stack("dtp-train-e2e-9876543210", "CREATE_COMPLETE", _tags("dtp-train-e2e-9876543210", ALIVE, cluster=True)),
        # A stack of no run.
        _stack("someone-elses", "CREATE_COMPLETE", {"parallelcluster:version": "3.16.1"}),
    ]
    cloudformation.add_response("describe_stacks", {"Stacks": stacks}, {})
    with mock_aws():
        found = find_expired_in_aws(AWS, NOW, active=no_run_active, installation=INSTALLATION).found
    assert found == [Expired("stack", NETWORK, RUN_KEY, EXPIRED), Expired("parallelcluster", CLUSTER, RUN_KEY, EXPIRED)]


def test_another_installations_stacks_are_left_to_it_for_a_day_past_their_expiry(cloudformation) -> None:
    # Its reaper asks its own Airflow whether their run still goes; this one's knows no such run.
    def network(run_key: str, expires_at: str, installation: str) -> dict[str, Any]:
        tags = _tags(run_key, expires_at) | {"dtp:installation": installation}
        return _stack(f"{run_key}-network", "CREATE_COMPLETE", tags)

    stacks = [
        network("dtp-recent", EXPIRED, OTHER_INSTALLATION),  # expired an hour ago: kept
        network("dtp-long-gone", "2026-12-04T11:00:00Z", OTHER_INSTALLATION),  # 25 hours ago: reaped
        network("dtp-own", EXPIRED, INSTALLATION),  # this installation's, expired an hour ago: reaped, as before
    ]
    cloudformation.add_response("describe_stacks", {"Stacks": stacks}, {})
    with mock_aws():
        found = find_expired_in_aws(AWS, NOW, active=no_run_active, installation=INSTALLATION).found
    assert [(f.name, f.installation) for f in found] == [
        ("dtp-long-gone-network", OTHER_INSTALLATION),
        ("dtp-own-network", INSTALLATION),
    ]


def test_a_pcluster_build_image_stack_is_no_cluster(cloudformation) -> None:
    """``pcluster build-image`` stacks carry ``parallelcluster:version`` too, with ``parallelcluster:image_id``."""
    tags = {**_tags(RUN_KEY, EXPIRED, cluster=True), "parallelcluster:image_id": "dtp-image"}
    cloudformation.add_response("describe_stacks", {"Stacks": [_stack("dtp-image", "CREATE_COMPLETE", tags)]}, {})
    with mock_aws():
        assert [
            f.kind for f in find_expired_in_aws(AWS, NOW, active=no_run_active, installation=INSTALLATION).found
        ] == ["stack"]


@pytest.fixture
def networks(monkeypatch: pytest.MonkeyPatch, cloudformation: Stubber) -> list[tuple[str, list[str]]]:
    """The runs whose network reap deleted (destroy_run_resources, recorded), each with its stacks; each asserts
    that by then every CloudFormation call answered (the cluster's stack is gone) and that no DeleteStack is left."""
    deleted: list[tuple[str, list[str]]] = []

    def destroy(aws_conn_id: str, run_key: str, stacks: list[str], buckets: tuple[str, ...]) -> dict[str, Any]:
        cloudformation.assert_no_pending_responses()
        deleted.append((run_key, stacks))
        return {}

    monkeypatch.setattr("dtp.reaper.deletion.destroy_run_resources", destroy)
    monkeypatch.setattr("dtp.reaper.deletion.PCLUSTER_DELETE_POLL", 0)
    return deleted


FOUND = [Expired("stack", NETWORK, RUN_KEY, EXPIRED), Expired("parallelcluster", CLUSTER, RUN_KEY, EXPIRED)]


def test_a_clusters_stack_is_deleted_and_gone_before_its_runs_network(cloudformation, networks) -> None:
    cloudformation.add_response(
        "describe_stacks", {"Stacks": [_stack(CLUSTER, "CREATE_COMPLETE")]}, {"StackName": CLUSTER}
    )
    cloudformation.add_response("delete_stack", {}, {"StackName": CLUSTER_ID})
    for status in ("DELETE_IN_PROGRESS", "DELETE_IN_PROGRESS", "DELETE_COMPLETE"):
        cloudformation.add_response("describe_stacks", {"Stacks": [_stack(CLUSTER, status)]}, {"StackName": CLUSTER_ID})
    result = reap(FOUND, AWS, None, dry_run=False)
    assert networks == [(RUN_KEY, [NETWORK])]
    assert [(d["kind"], d["name"]) for d in result["deleted"]] == [("parallelcluster", CLUSTER), ("stack", NETWORK)]


def test_a_clusters_stack_that_fails_to_delete_leaves_its_runs_network(cloudformation, networks) -> None:
    cloudformation.add_response(
        "describe_stacks", {"Stacks": [_stack(CLUSTER, "CREATE_COMPLETE")]}, {"StackName": CLUSTER}
    )
    cloudformation.add_response("delete_stack", {}, {"StackName": CLUSTER_ID})
    cloudformation.add_response(
        "describe_stacks", {"Stacks": [_stack(CLUSTER, "DELETE_FAILED")]}, {"StackName": CLUSTER_ID}
    )
    event = {
        "StackId": CLUSTER_ID,
        "EventId": "event-1",
        "StackName": CLUSTER,
        "LogicalResourceId": "FSx",
        "ResourceType": "AWS::FSx::FileSystem",
        "Timestamp": CREATED + timedelta(minutes=20),
        "ResourceStatus": "DELETE_FAILED",
        "ResourceStatusReason": FSX_REASON,
    }
    cloudformation.add_response("describe_stack_events", {"StackEvents": [event]}, {"StackName": CLUSTER})
    with pytest.raises(ReapIncomplete, match=rf"run {RUN_KEY}: parallelcluster {CLUSTER}: .*DELETE_FAILED: FSx: "):
        reap(FOUND, AWS, None, dry_run=False)
    assert networks == []  # the cluster's nodes may still be in the run's subnets: its network is left


def test_a_dry_run_deletes_no_cluster(cloudformation, networks) -> None:
    assert reap(FOUND, AWS, None, dry_run=True)["deleted"] == [] and networks == []


def test_the_stacks_of_a_run_still_running_are_kept_whatever_their_expiry(cloudformation) -> None:
    # A run cleared after its teardowns rebuilt its network and cluster with the expiry validate_params fixed.
    live = RunNames("train_e2e", "manual__2026-12-01T00:00:00+00:00")
    done = RunNames("train_e2e", "manual__2026-11-30T00:00:00+00:00")
    stacks = [
        _stack(live.network_stack, "CREATE_COMPLETE", resource_tags(live, "llama", EXPIRED)),
        _stack(
            live.run_key,
            "CREATE_COMPLETE",
            resource_tags(live, "llama", EXPIRED) | {PCLUSTER_VERSION_TAG: "3.16.1"},
        ),
        _stack(done.network_stack, "CREATE_COMPLETE", resource_tags(done, "llama", EXPIRED)),
    ]
    cloudformation.add_response("describe_stacks", {"Stacks": stacks}, {})
    asked: list[tuple[str, str]] = []

    def active(dag_id: str, run_id: str) -> bool:
        asked.append((dag_id, run_id))
        return run_id == live.run_id

    with mock_aws():
        findings = find_expired_in_aws(AWS, NOW, active=active, installation=INSTALLATION)
    assert [(f.kind, f.name, f.run_id) for f in findings.found] == [("stack", done.network_stack, done.run_id)]
    assert sorted(asked) == sorted([("train_e2e", live.run_id), ("train_e2e", done.run_id)])  # once per run
    assert findings.unsearched == {}


def test_a_kind_that_cannot_be_looked_for_stops_no_other_kind_and_fails_the_reap(
    cloudformation, networks, monkeypatch
) -> None:
    def no_images(*args: object) -> list[Expired]:
        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "GetParameters")

    monkeypatch.setattr("dtp.reaper.aws.expired_amis", no_images)
    cloudformation.add_response(
        "describe_stacks", {"Stacks": [_stack(NETWORK, "CREATE_COMPLETE", _tags(RUN_KEY, EXPIRED))]}, {}
    )
    with mock_aws():
        findings = find_expired_in_aws(AWS, NOW, active=no_run_active, installation=INSTALLATION)
    assert findings.found == [Expired("stack", NETWORK, RUN_KEY, EXPIRED)]
    assert list(findings.unsearched) == ["ami"]
    with pytest.raises(ReapIncomplete, match=r"deleted 1 of 1 .*\nami: ClientError: .*Rate exceeded"):
        reap(findings.found, AWS, None, dry_run=False, unsearched=findings.unsearched)
    assert networks == [(RUN_KEY, [NETWORK])]  # deleted all the same


@pytest.mark.parametrize("blind", ["hyperpod_cluster", "batch", "stack"])
def test_no_network_is_swept_while_a_kind_with_nodes_in_it_cannot_be_looked_for(networks, blind: str) -> None:
    # A cluster that could not be listed may have nodes in the network: deleting it would end DELETE_FAILED.
    network = [Expired("stack", NETWORK, RUN_KEY, EXPIRED)]
    with pytest.raises(ReapIncomplete, match=rf"deleted 0 of 1 .*\n{blind}: boom"):
        reap(network, AWS, None, dry_run=False, unsearched={blind: "boom"})
    assert networks == []


def test_a_dry_run_that_could_not_look_for_a_kind_fails_and_deletes_nothing(cloudformation, networks) -> None:
    with pytest.raises(ReapIncomplete, match="hyperpod_cluster: boom"):
        reap(FOUND, AWS, None, dry_run=True, unsearched={"hyperpod_cluster": "boom"})
    assert networks == []
