"""teardown_cluster on HyperPod against the emulator's SageMaker: the run's cluster and its earlier incarnation's are
both being deleted before the task defers, the trigger fires once both are gone, and a retry deletes nothing again.
deploy_cluster of a run cleared whole creates its cluster only once the trigger saw its earlier incarnation's gone."""

from __future__ import annotations

import uuid

import pytest
from airflow.sdk.exceptions import TaskDeferred

from dtp.form_params import parse_params
from dtp.hooks.hyperpod import HyperPodHook
from dtp.operators.cluster import DeployClusterOperator, TeardownClusterOperator
from dtp.params import TrainParams
from dtp.pipeline.spec import run_spec
from dtp.platforms.hyperpod import HyperPodPlatform

pytestmark = pytest.mark.stack
AWS = "aws_default"


@pytest.fixture
def spec(stack) -> dict:
    params = parse_params(TrainParams, {"platform": "hyperpod", "instance_type": "m5.2xlarge", "num_nodes": 2})
    return run_spec(params, "it_teardown", f"manual__{uuid.uuid4().hex}", incarnation=1)


def _teardown(operator: TeardownClusterOperator, first_event) -> dict:
    """The task as Airflow runs it: ``execute``, the trigger in the triggerer, then ``execute_complete``."""
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context={})
    event = first_event(deferred.value.trigger)
    assert event["status"] == "success", event
    return operator.execute_complete({}, event, **(deferred.value.kwargs or {}))


def test_a_runs_hyperpod_clusters_are_deleted_while_the_task_waits_in_the_triggerer(spec, outputs, first_event) -> None:
    platform, hook = HyperPodPlatform(), HyperPodHook(aws_conn_id=AWS)
    (earlier,) = spec["earlier_names"]
    run_key = spec["names"]["run_key"]
    platform.provision(spec, outputs)
    platform.provision({**spec, "names": earlier}, outputs)  # the run was cleared whole while it ran
    operator = TeardownClusterOperator(task_id="teardown_cluster", spec=spec)

    deleted = {"cancelled_jobs": [], "deleted_cluster": True, "deleted_lifecycle_objects": 2}
    assert _teardown(operator, first_event) == {**deleted, "earlier_incarnations": {earlier["run_key"]: deleted}}
    assert hook.describe_cluster(run_key) is None and hook.describe_cluster(earlier["run_key"]) is None
    # A retry finds nothing left to delete, and its wait ends at once.
    gone = {"cancelled_jobs": [], "deleted_cluster": False, "deleted_lifecycle_objects": 0}
    assert _teardown(operator, first_event) == {**gone, "earlier_incarnations": {earlier["run_key"]: gone}}


def test_deploy_cluster_creates_the_runs_cluster_once_its_earlier_incarnations_is_gone(
    spec, outputs, first_event
) -> None:
    platform, hook = HyperPodPlatform(), HyperPodHook(aws_conn_id=AWS)
    (earlier,) = spec["earlier_names"]
    run_key = spec["names"]["run_key"]
    platform.provision({**spec, "names": earlier}, outputs)  # the run was cleared whole while it ran
    operator = DeployClusterOperator(task_id="deploy_cluster", spec=spec, network=outputs)

    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context={})
    assert hook.describe_cluster(run_key) is None  # nothing created while the earlier cluster holds the capacity
    event = first_event(deferred.value.trigger)
    assert event["status"] == "success", event
    assert hook.describe_cluster(earlier["run_key"]) is None
    with pytest.raises(TaskDeferred) as created:
        operator.provision_once_retired({}, event)
    assert created.value.method_name == "execute_complete"
    assert hook.describe_cluster(run_key) is not None

    # The run's teardown deletes its cluster, and finds its earlier incarnation's gone.
    teardown = TeardownClusterOperator(task_id="teardown_cluster", spec=spec)
    gone = {"cancelled_jobs": [], "deleted_cluster": False, "deleted_lifecycle_objects": 0}
    assert _teardown(teardown, first_event)["earlier_incarnations"] == {earlier["run_key"]: gone}
    assert hook.describe_cluster(run_key) is None
