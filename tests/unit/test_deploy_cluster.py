"""DeployClusterOperator: a platform that is not set up fails the task at once, naming what to fix; the nodes boot
the AMI ``resolve_images`` found."""

from __future__ import annotations

from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred

from dtp.operators import cluster as cluster_operator
from dtp.operators.cluster import DeployClusterOperator
from dtp.params import TrainParams, parse_params
from dtp.pipeline.spec import run_spec
from dtp.triggers.hyperpod import HyperPodClusterTrigger


def test_a_platform_without_its_connection_fails_without_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_DTP_HYPERPOD", raising=False)
    params = parse_params(TrainParams, {"platform": "hyperpod", "instance_type": "m5.2xlarge"})
    operator = DeployClusterOperator(
        task_id="deploy_cluster", spec=run_spec(params, "train_e2e", "manual__1"), network={}
    )
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
    cluster = deferred.value.kwargs["cluster"]
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
