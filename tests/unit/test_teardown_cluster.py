"""TeardownClusterOperator: on ParallelCluster and HyperPod every deletion (the run's cluster and its earlier
incarnations') is started before the task defers to one trigger that waits for them all; other platforms tear
down synchronously; keep_cluster stops the jobs and keeps the cluster."""

from __future__ import annotations

from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from dtp.form_params import parse_params
from dtp.naming import EXPIRES_TAG
from dtp.operators import cluster as cluster_operator
from dtp.operators.cluster import TeardownClusterOperator
from dtp.params import TrainParams
from dtp.pipeline.spec import run_spec
from dtp.platforms.base import DeferrableTeardownPlatform
from dtp.platforms.batch import BatchPlatform
from dtp.platforms.eks import EksPlatform
from dtp.platforms.hyperpod import HyperPodPlatform
from dtp.platforms.local import LocalSlurmPlatform
from dtp.platforms.parallelcluster import ParallelClusterPlatform
from dtp.triggers.hyperpod import HyperPodClusterDeleteTrigger


class SyncPlatform:
    """A platform whose teardown is done when it returns (local, EKS, Batch), recording what it was asked."""

    name = "sync"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def stop_jobs(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("stop_jobs", spec["names"]["run_key"]))
        return {"cancelled_jobs": ["1"]}

    def teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("teardown", spec["names"]["run_key"]))
        return {"cancelled_jobs": [], "deleted": spec["names"]["run_key"]}


class SlowDeletionPlatform(SyncPlatform):
    """A platform whose clusters take long to delete (ParallelCluster, HyperPod): it starts deletions, and a trigger
    waits for them."""

    name = "slow"

    def teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("the task waits in the triggerer, not in teardown")

    def start_teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("start_teardown", spec["names"]["run_key"]))
        return {"cancelled_jobs": [], "deleted": spec["names"]["run_key"]}

    def deleted_trigger(self, specs: list[dict[str, Any]]) -> HyperPodClusterDeleteTrigger:
        names = [spec["names"]["run_key"] for spec in specs]
        self.calls.append(("deleted_trigger", ",".join(names)))
        return HyperPodClusterDeleteTrigger(names)


def _spec(incarnation: int = 0, **conf: Any) -> dict[str, Any]:
    return run_spec(parse_params(TrainParams, conf), "train_e2e", "manual__1", incarnation=incarnation)


def _operator(monkeypatch: pytest.MonkeyPatch, platform: SyncPlatform, spec: dict[str, Any]) -> Any:
    monkeypatch.setattr(cluster_operator, "get_platform", lambda name: platform)
    return TeardownClusterOperator(task_id="teardown_cluster", spec=spec)


def test_only_parallelcluster_and_hyperpod_wait_in_the_triggerer() -> None:
    deferrable = {cls.__name__ for cls in (ParallelClusterPlatform, HyperPodPlatform, LocalSlurmPlatform, EksPlatform,
                                           BatchPlatform) if issubclass(cls, DeferrableTeardownPlatform)}  # fmt: skip
    assert deferrable == {"ParallelClusterPlatform", "HyperPodPlatform"}


def test_every_deletion_starts_before_the_task_defers_to_one_trigger(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(incarnation=3)
    run_key, earlier = spec["names"]["run_key"], [names["run_key"] for names in spec["earlier_names"]]
    assert earlier  # the run was cleared whole while it ran
    platform = SlowDeletionPlatform()
    operator = _operator(monkeypatch, platform, spec)
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context={})
    # All deletions started first (they proceed together), then one wait for every one of those clusters.
    every = [run_key, *earlier]
    assert platform.calls == [("start_teardown", key) for key in every] + [("deleted_trigger", ",".join(every))]
    assert deferred.value.trigger.cluster_names == every
    assert deferred.value.method_name == "execute_complete"
    done = {
        "cancelled_jobs": [],
        "deleted": run_key,
        "earlier_incarnations": {key: {"cancelled_jobs": [], "deleted": key} for key in earlier},
    }
    assert deferred.value.kwargs == {"done": done}
    # The XCom is what the synchronous teardown returned (e2e reads its deleted_cluster on HyperPod).
    event = {"status": "success", "message": "HyperPod clusters ... are deleted"}
    assert operator.execute_complete({}, event, done) == done


def test_a_cluster_that_is_not_deleted_fails_the_task_with_the_platforms_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    operator = _operator(monkeypatch, SlowDeletionPlatform(), _spec())
    message = "cluster dtp-x is DELETE_FAILED: FSx: the file system has a backup in progress"
    with pytest.raises(AirflowException, match=f"^{message}$"):
        operator.execute_complete({}, {"status": "failed", "message": message}, {"cancelled_jobs": []})


def test_a_platform_whose_teardown_is_quick_tears_down_without_deferring(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(incarnation=1)
    (earlier,) = [names["run_key"] for names in spec["earlier_names"]]
    platform = SyncPlatform()
    result = _operator(monkeypatch, platform, spec).execute(context={})
    assert platform.calls == [("teardown", spec["names"]["run_key"]), ("teardown", earlier)]
    assert result == {
        "cancelled_jobs": [],
        "deleted": spec["names"]["run_key"],
        "earlier_incarnations": {earlier: {"cancelled_jobs": [], "deleted": earlier}},
    }


def test_a_kept_cluster_has_its_jobs_stopped_and_no_wait(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec(keep_cluster=True)
    platform = SlowDeletionPlatform()
    result = _operator(monkeypatch, platform, spec).execute(context={})
    assert result == {"kept": True, "cancelled_jobs": ["1"]}
    assert platform.calls == [("stop_jobs", spec["names"]["run_key"])]
    logged = capsys.readouterr().out  # the task log
    assert f"keep_cluster=true: cluster kept, the run's jobs stopped ({result})" in logged
    assert f"its resources expire at {spec['tags'][EXPIRES_TAG]}" in logged


def test_a_kept_run_still_waits_for_its_earlier_incarnations_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(incarnation=1, keep_cluster=True)
    (earlier,) = [names["run_key"] for names in spec["earlier_names"]]
    platform = SlowDeletionPlatform()
    with pytest.raises(TaskDeferred) as deferred:
        _operator(monkeypatch, platform, spec).execute(context={})
    assert platform.calls == [
        ("stop_jobs", spec["names"]["run_key"]),
        ("start_teardown", earlier),
        ("deleted_trigger", earlier),
    ]
    done = {
        "kept": True,
        "cancelled_jobs": ["1"],
        "earlier_incarnations": {earlier: {"cancelled_jobs": [], "deleted": earlier}},
    }
    assert deferred.value.kwargs == {"done": done}
