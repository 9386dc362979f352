"""Which ended or running jobs of its name the operator takes for its run's instead of submitting one: only those
submitted after the run's spec was made, so a run deleted and made again (the same run id, so the same job names)
gets a job of its own. The hook is a stand-in for a cluster (slurm_job_support.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from airflow.sdk.exceptions import TaskDeferred
from slurm_job_support import Cluster, operator, use_cluster

from dtp.hooks.slurm import SlurmJob


class XCom:
    """The task instance's XCom, keeping nothing: the operator pushes the job it submits or takes."""

    def xcom_push(self, key: str, value: str) -> None:
        pass


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> type[Cluster]:
    return use_cluster(monkeypatch)


def ended(job_id: str, state: str, submitted: str) -> SlurmJob:
    return SlurmJob(job_id, "run-train", state, elapsed_s=60, submitted_at=datetime.fromisoformat(submitted))


def test_a_completed_job_of_a_run_deleted_and_made_again_is_not_reused(cluster: type[Cluster]) -> None:
    # A scheduled run deleted and triggered again has the same run id, so its jobs have the same names.
    cluster.ended = [ended("5", "COMPLETED", "2025-03-01T10:00:00+00:00")]
    spec_made = "2025-03-02T08:00:00+00:00"
    with pytest.raises(TaskDeferred) as deferred:
        operator(submitted_after=spec_made, time_limit_minutes=2).execute({"ti": XCom()})
    assert deferred.value.trigger.job_id == "99"
    assert cluster.made[-1].submitted == ["run-train"]
    # Its own job, submitted after its spec was made, is.
    cluster.ended.append(ended("6", "COMPLETED", "2025-03-02T08:05:00+00:00"))
    reused = {"job_id": "6", "log_path": "/o-6", "state": "COMPLETED"}
    assert operator(submitted_after=spec_made).execute({"ti": XCom()}) == reused
    # A spec from before the operator knew when it was made: every job of the name is the run's, as before.
    assert operator().execute({"ti": XCom()}) == reused


def test_a_running_job_of_a_run_deleted_and_made_again_is_not_re_attached_to(cluster: type[Cluster]) -> None:
    spec_made = "2025-03-02T08:00:00+00:00"
    cluster.active = [SlurmJob("5", "run-train", "RUNNING", submitted_at=datetime(2025, 3, 1, 10, tzinfo=UTC))]
    with pytest.raises(TaskDeferred) as deferred:
        operator(submitted_after=spec_made).execute({"ti": XCom()})
    assert deferred.value.trigger.job_id == "99" and cluster.made[-1].submitted == ["run-train"]
    # Its own running job is.
    cluster.active = [SlurmJob("6", "run-train", "RUNNING", submitted_at=datetime(2025, 3, 2, 8, 5, tzinfo=UTC))]
    with pytest.raises(TaskDeferred) as deferred:
        operator(submitted_after=spec_made).execute({"ti": XCom()})
    assert deferred.value.trigger.job_id == "6" and cluster.made[-1].submitted == []


def test_a_spec_records_when_it_was_made(monkeypatch: pytest.MonkeyPatch) -> None:
    from dtp.params import validate_params
    from dtp.pipeline.spec import run_spec

    before = datetime.now(UTC).replace(microsecond=0)
    spec = run_spec(validate_params({"platform": "local", "recipe": "tiny"}), "train_e2e", "scheduled__x")
    assert before <= datetime.fromisoformat(spec["created_at"]) <= datetime.now(UTC)
