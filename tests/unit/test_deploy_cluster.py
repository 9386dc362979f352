"""DeployClusterOperator: a platform that is not set up fails the task at once, naming what to fix; the nodes boot
the AMI ``resolve_images`` found; the clusters of a run's earlier incarnations are deleted before its own is
provisioned, in the triggerer where their deletion takes long; a ParallelCluster capacity reservation without room
for the run's nodes refuses its cluster before it is created."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred
from botocore.stub import Stubber
from parallelcluster_support import NETWORK, make_spec, needs_pcluster, use_settings

from dtp.form_params import parse_params
from dtp.operators import cluster as cluster_operator
from dtp.operators.cluster import DeployClusterOperator
from dtp.params import TrainParams
from dtp.pipeline.spec import run_spec
from dtp.platforms import capacity_reservations
from dtp.platforms import parallelcluster as pc
from dtp.platforms.base import PlatformNotReady, ReservationUnavailable
from dtp.platforms.capacity_reservations import CLUSTER_NAME_TAG
from dtp.triggers.hyperpod import HyperPodClusterDeleteTrigger, HyperPodClusterTrigger


@pytest.mark.parametrize("incarnation", [0, 1])  # 1: the earlier incarnation's cluster is deleted first
def test_a_platform_without_its_connection_fails_without_retries(
    monkeypatch: pytest.MonkeyPatch, incarnation: int
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_DTP_HYPERPOD", raising=False)
    params = parse_params(TrainParams, {"platform": "hyperpod", "instance_type": "m5.2xlarge"})
    spec = run_spec(params, "train_e2e", "manual__1", incarnation=incarnation)
    operator = DeployClusterOperator(task_id="deploy_cluster", spec=spec, network={})
    # AirflowFailException: the task fails now, whatever its retries; the teardowns still run.
    with pytest.raises(AirflowFailException, match=r"^connection 'dtp_hyperpod' is not defined; it holds the account"):
        operator.execute(context={})


class RecordingPlatform:
    """A platform whose cluster is ready at once, recording what it was asked to provision."""

    name = "recording"

    def __init__(self) -> None:
        self.provisioned: list[tuple[str, str | None]] = []

    def provision(self, spec: dict[str, Any], network: dict[str, str], ami: str | None = None) -> dict[str, Any]:
        self.provisioned.append((spec["names"]["run_key"], ami))
        return {"platform": self.name}

    def ready_trigger(self, cluster: dict[str, Any]) -> None:
        return None


@pytest.mark.parametrize(
    ("images", "ami"),
    [
        ({"source": "image x", "ami": "ami-0123456789abcdef0"}, "ami-0123456789abcdef0"),
        ({"source": "project virtualenv"}, None),  # no AMI published for the family
        (None, None),
    ],
)
def test_the_nodes_boot_the_ami_resolve_images_found(
    monkeypatch: pytest.MonkeyPatch, images: dict[str, str] | None, ami: str | None
) -> None:
    platform = RecordingPlatform()
    monkeypatch.setattr(cluster_operator, "get_platform", lambda name: platform)
    spec = run_spec(parse_params(TrainParams, {}), "train_e2e", "manual__1")
    operator = DeployClusterOperator(task_id="deploy_cluster", spec=spec, network={}, images=images)
    assert operator.execute(context={}) == {"platform": "recording"}
    assert platform.provisioned == [(spec["names"]["run_key"], ami)]


class BusyReservationPlatform(RecordingPlatform):
    """A platform whose capacity reservation other runs hold for its first ``busy`` provisions."""

    def __init__(self, busy: int) -> None:
        super().__init__()
        self.busy = busy

    def provision(self, spec: dict[str, Any], network: dict[str, str], ami: str | None = None) -> dict[str, Any]:
        if self.busy:
            self.busy -= 1
            raise ReservationUnavailable("capacity reservation cr-1 has 0 of its 2 instances available")
        return super().provision(spec, network, ami)


def test_a_reservation_other_runs_hold_is_waited_for_in_the_triggerer(monkeypatch: pytest.MonkeyPatch) -> None:
    platform = BusyReservationPlatform(busy=1)
    monkeypatch.setattr(cluster_operator, "get_platform", lambda name: platform)
    operator = DeployClusterOperator(
        task_id="deploy_cluster", spec=run_spec(parse_params(TrainParams, {}), "train_e2e", "manual__1"), network={}
    )
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context={})
    assert isinstance(deferred.value.trigger, TimeDeltaTrigger)
    assert deferred.value.method_name == "provision_again"
    # The wait counts from the first try, across every look again.
    since = deferred.value.kwargs["waiting_since"]
    assert operator.provision_again({}, None, **deferred.value.kwargs) == {"platform": "recording"}
    assert len(platform.provisioned) == 1 and since > 0


def test_a_reservation_still_held_after_the_wait_fails_the_task(monkeypatch: pytest.MonkeyPatch) -> None:
    platform = BusyReservationPlatform(busy=2)
    monkeypatch.setattr(cluster_operator, "get_platform", lambda name: platform)
    operator = DeployClusterOperator(
        task_id="deploy_cluster", spec=run_spec(parse_params(TrainParams, {}), "train_e2e", "manual__1"), network={}
    )
    with pytest.raises(TaskDeferred):  # a look again within the wait defers once more
        operator.provision_again({}, None, waiting_since=time.time() - 60)
    with pytest.raises(AirflowFailException, match=r"0 of its 2 instances available; still so after 30 minutes$"):
        operator.provision_again({}, None, waiting_since=time.time() - cluster_operator.RESERVATION_WAIT_S)
    assert platform.provisioned == []


class SlowPlatform(RecordingPlatform):
    """A platform whose cluster takes a while to come up: the task waits for it in the triggerer."""

    def ready_trigger(self, cluster: dict[str, Any]) -> Any:
        return HyperPodClusterTrigger("dtp-train-e2e-0123456789", controller_group="controller-machine")


def test_a_cluster_that_takes_a_while_is_waited_for_without_a_worker_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_operator, "get_platform", lambda name: SlowPlatform())
    spec = run_spec(parse_params(TrainParams, {}), "train_e2e", "manual__1")
    operator = DeployClusterOperator(task_id="deploy_cluster", spec=spec, network={})
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context={})
    assert isinstance(deferred.value.trigger, HyperPodClusterTrigger)
    assert deferred.value.method_name == "execute_complete"
    cluster = (deferred.value.kwargs or {})["cluster"]
    # The event adds what only the cluster once up knows: where its head node is.
    ready = {"status": "success", "message": "up", "cluster": {"head_node": "sagemaker-cluster:abc_controller-i-1"}}
    assert operator.execute_complete({}, ready, cluster) == {
        **cluster,
        "head_node": "sagemaker-cluster:abc_controller-i-1",
    }
    with pytest.raises(AirflowException, match=r"^HyperPod cluster x is Failed: no capacity$"):
        operator.execute_complete(
            {}, {"status": "failed", "message": "HyperPod cluster x is Failed: no capacity"}, cluster
        )


class RetiringPlatform(RecordingPlatform):
    """A platform whose teardown is done when it returns (local, EKS, Batch), recording it with the provisions."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def provision(self, spec: dict[str, Any], network: dict[str, str], ami: str | None = None) -> dict[str, Any]:
        self.calls.append(("provision", spec["names"]["run_key"]))
        return super().provision(spec, network, ami)

    def teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("teardown", spec["names"]["run_key"]))
        return {"cancelled_jobs": ["7"]}


class SlowRetiringPlatform(RetiringPlatform):
    """A platform whose clusters take long to delete and to create (ParallelCluster, HyperPod)."""

    def teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("the task waits in the triggerer, not in teardown")

    def start_teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("start_teardown", spec["names"]["run_key"]))
        return {"cancelled_jobs": [], "deleted": True}

    def deleted_trigger(self, specs: list[dict[str, Any]]) -> HyperPodClusterDeleteTrigger:
        names = [spec["names"]["run_key"] for spec in specs]
        self.calls.append(("deleted_trigger", ",".join(names)))
        return HyperPodClusterDeleteTrigger(names)

    def ready_trigger(self, cluster: dict[str, Any]) -> Any:
        return HyperPodClusterTrigger("dtp-train-e2e-0123456789", controller_group="controller-machine")


@pytest.mark.parametrize("keep_cluster", [False, True])  # an earlier incarnation is deleted, kept or not
def test_the_earlier_incarnations_clusters_are_deleted_before_the_runs_own_is_provisioned(
    monkeypatch: pytest.MonkeyPatch, keep_cluster: bool
) -> None:
    platform = RetiringPlatform()
    monkeypatch.setattr(cluster_operator, "get_platform", lambda name: platform)
    spec = run_spec(parse_params(TrainParams, {"keep_cluster": keep_cluster}), "train_e2e", "manual__1", incarnation=2)
    earlier = [names["run_key"] for names in spec["earlier_names"]]
    assert len(earlier) == 2  # the run was cleared whole twice while it ran
    operator = DeployClusterOperator(task_id="deploy_cluster", spec=spec, network={})
    assert operator.execute(context={}) == {"platform": "recording"}
    # Their nodes bill, and hold the capacity the new cluster needs, until they are deleted.
    assert platform.calls == [("teardown", key) for key in earlier] + [("provision", spec["names"]["run_key"])]


def test_a_slow_platform_provisions_once_the_trigger_saw_the_earlier_clusters_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    platform = SlowRetiringPlatform()
    monkeypatch.setattr(cluster_operator, "get_platform", lambda name: platform)
    spec = run_spec(parse_params(TrainParams, {}), "train_e2e", "manual__1", incarnation=1)
    (earlier,) = [names["run_key"] for names in spec["earlier_names"]]
    operator = DeployClusterOperator(task_id="deploy_cluster", spec=spec, network={})
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context={})
    assert platform.calls == [("start_teardown", earlier), ("deleted_trigger", earlier)]  # nothing provisioned yet
    assert isinstance(deferred.value.trigger, HyperPodClusterDeleteTrigger)
    assert deferred.value.trigger.cluster_names == [earlier]
    assert deferred.value.method_name == "provision_once_retired"

    with pytest.raises(AirflowException, match=r"^cluster x is DELETE_FAILED$"):
        operator.provision_once_retired({}, {"status": "failed", "message": "cluster x is DELETE_FAILED"})
    assert ("provision", spec["names"]["run_key"]) not in platform.calls

    # Resumed once they are gone: the run's cluster is created, and waited for in the triggerer in turn.
    with pytest.raises(TaskDeferred) as ready:
        operator.provision_once_retired({}, {"status": "success", "message": "HyperPod clusters ... are deleted"})
    assert platform.calls[-1] == ("provision", spec["names"]["run_key"])
    assert isinstance(ready.value.trigger, HyperPodClusterTrigger)
    assert (ready.value.method_name, ready.value.kwargs) == ("execute_complete", {"cluster": {"platform": "recording"}})


# --- ParallelCluster: the capacity reservation must have room for the run's nodes before its cluster is created ---
RESERVATION_ID = "cr-0123456789abcdef0"


def _reservation(state: str = "active", available: int = 4, total: int = 4, **dates: datetime) -> dict[str, Any]:
    return {
        "CapacityReservationId": RESERVATION_ID,
        "InstanceType": "p5.48xlarge",
        "AvailabilityZone": "eu-west-1b",
        "State": state,
        "TotalInstanceCount": total,
        "AvailableInstanceCount": available,
        "ReservationType": "capacity-block",
        **dates,
    }


def _instance(instance_id: str, tags: dict[str, str]) -> dict[str, Any]:
    return {"InstanceId": instance_id, "Tags": [{"Key": key, "Value": value} for key, value in tags.items()]}


@pytest.fixture
def ec2_stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stubber]:
    """The EC2 client of dtp.platforms.parallelcluster, answered by a Stubber (moto has no capacity reservations)."""
    hook = EC2Hook(aws_conn_id=None, region_name="eu-west-1", api_type="client_type")
    hook.conn = hook.get_client_type(region_name="eu-west-1")
    monkeypatch.setattr(pc, "EC2Hook", lambda **kwargs: hook)
    with Stubber(hook.conn) as stub:
        yield stub
        stub.assert_no_pending_responses()


def _answer_reservation(stub: Stubber, reservation: dict[str, Any]) -> None:
    ids = {"CapacityReservationIds": [RESERVATION_ID]}
    stub.add_response("describe_capacity_reservations", {"CapacityReservations": [reservation]}, ids)


def _capacity_block(monkeypatch: pytest.MonkeyPatch, pcluster: str = "") -> pc.ParallelClusterPlatform:
    settings = {"capacity_reservation_id": RESERVATION_ID, "capacity_type": "CAPACITY_BLOCK"}
    return use_settings(monkeypatch, key_name="k", **settings, **({"pcluster": pcluster} if pcluster else {}))


def _recording_pcluster(tmp_path: Path) -> str:
    """A pcluster that knows no cluster and records a create-cluster in ``created`` (the API cannot run here)."""
    executable = tmp_path / "pcluster"
    executable.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  describe-cluster) echo \'{"message": "Cluster does not exist"}\'; exit 1;;\n'
        f"  create-cluster) touch {tmp_path / 'created'}; echo '{{}}';;\n"
        "esac\n"
    )
    executable.chmod(0o755)
    return str(executable)


@needs_pcluster
def test_a_reservation_other_runs_hold_is_waited_for_before_any_cluster_is_created(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ec2_stub: Stubber
) -> None:
    _capacity_block(monkeypatch, _recording_pcluster(tmp_path))
    spec = make_spec("llama3_1_8b", "p5.48xlarge", 4)
    _answer_reservation(ec2_stub, _reservation(available=2))
    in_use = [
        _instance("i-0123456789abcdef0", {CLUSTER_NAME_TAG: "dtp-train-e2e-other", "Name": "Compute"}),
        _instance("i-0123456789abcdef1", {CLUSTER_NAME_TAG: "dtp-train-e2e-other"}),
        _instance("i-0fedcba9876543210", {}),
    ]
    filters = [
        {"Name": "capacity-reservation-id", "Values": [RESERVATION_ID]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]},
    ]
    ec2_stub.add_response("describe_instances", {"Reservations": [{"Instances": in_use}]}, {"Filters": filters})
    operator = DeployClusterOperator(task_id="deploy_cluster", spec=spec, network=NETWORK)
    # Not a failure: the instances may be freed (another run's teardown), and the task looks again in a while.
    with pytest.raises(ReservationUnavailable) as refused:
        pc.ParallelClusterPlatform().provision(spec, NETWORK)
    assert str(refused.value) == (
        f"capacity reservation {RESERVATION_ID} (p5.48xlarge in eu-west-1b) has 2 of its 4 instances available and "
        "the run needs 4; the clusters (or instances) using it: dtp-train-e2e-other, i-0fedcba9876543210"
    )
    _answer_reservation(ec2_stub, _reservation(available=2))
    ec2_stub.add_response("describe_instances", {"Reservations": [{"Instances": in_use}]}, {"Filters": filters})
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context={})
    assert isinstance(deferred.value.trigger, TimeDeltaTrigger)
    assert not (tmp_path / "created").exists()


@needs_pcluster
def test_a_reservation_with_room_for_the_runs_nodes_gets_its_cluster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ec2_stub: Stubber
) -> None:
    platform = _capacity_block(monkeypatch, _recording_pcluster(tmp_path))
    _answer_reservation(ec2_stub, _reservation(available=4))
    platform.provision(make_spec("llama3_1_8b", "p5.48xlarge", 4), NETWORK)
    assert (tmp_path / "created").exists()


def test_a_capacity_block_before_its_start_is_waited_for(monkeypatch: pytest.MonkeyPatch, ec2_stub: Stubber) -> None:
    start = datetime(2027, 1, 4, 11, 30, tzinfo=UTC)
    _answer_reservation(ec2_stub, _reservation("scheduled", available=0, StartDate=start))
    with pytest.raises(ReservationUnavailable, match=r"is scheduled, active from 2027-01-04T11:30:00\+00:00$"):
        _capacity_block(monkeypatch).check_reservation(make_spec("llama3_1_8b", "p5.48xlarge", 4))


@pytest.mark.parametrize(
    ("reservation", "problem"),
    [
        (_reservation("expired", available=0), "is expired; name an active one"),
        (_reservation(available=2, total=2), "holds 2 instances; the run needs 4"),
    ],
)
def test_a_reservation_that_can_never_take_the_run_fails_it_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, ec2_stub: Stubber, reservation: dict[str, Any], problem: str
) -> None:
    _answer_reservation(ec2_stub, reservation)
    expected = (
        f"connection 'dtp_parallelcluster' extra: capacity_reservation_id: capacity reservation {RESERVATION_ID} "
        f"(p5.48xlarge in eu-west-1b) {problem}"
    )
    with pytest.raises(PlatformNotReady) as refused:
        _capacity_block(monkeypatch).check_reservation(make_spec("llama3_1_8b", "p5.48xlarge", 4))
    assert str(refused.value) == expected


def test_a_reservation_that_does_not_exist_fails_the_run_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, ec2_stub: Stubber
) -> None:
    ec2_stub.add_client_error(
        "describe_capacity_reservations",
        "InvalidCapacityReservationId.NotFound",
        f"The capacity reservation ID '{RESERVATION_ID}' does not exist",
    )
    with pytest.raises(PlatformNotReady, match=r"^connection 'dtp_parallelcluster' extra: capacity_reservation_id: "):
        _capacity_block(monkeypatch).check_reservation(make_spec("llama3_1_8b", "p5.48xlarge", 4))


def test_a_capacity_block_ending_before_the_training_time_limit_is_logged(
    monkeypatch: pytest.MonkeyPatch, ec2_stub: Stubber, caplog: pytest.LogCaptureFixture
) -> None:
    spec = make_spec("llama3_1_8b", "p5.48xlarge", 4)
    end = datetime.now(UTC) + timedelta(minutes=spec["training_time_limit_minutes"] - 30)
    _answer_reservation(ec2_stub, _reservation(EndDate=end))
    with caplog.at_level(logging.WARNING, logger=capacity_reservations.__name__):
        _capacity_block(monkeypatch).check_reservation(spec)
    assert f"(p5.48xlarge in eu-west-1b) ends at {end}, before the run's training time limit" in caplog.text
