"""One deadline across a task's retries: a PyTorchJob run again after a failure, a hang or a user's kill gets what its
earlier jobs left of runPolicy.activeDeadlineSeconds, a job stopped at its deadline is not run again, and a hung or
killed job is suspended with its active time recorded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from unittest.mock import AsyncMock

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from pytorchjob_support import (
    MANIFEST,
    NAME,
    condition,
    created,
    event,
    operator,
    stub_eks,
    trigger,
    wait_for_event,
)

import dtp.triggers.pytorchjob as pytorchjob_triggers
from dtp.hooks.pytorchjob import (
    ACTIVE_SECONDS_ANNOTATION,
    past_deadline,
    ran_seconds,
    suspended,
)
from dtp.operators.pytorchjob import PyTorchJobFailed, PyTorchJobOverTime

# Every test here signs its EKS token with the offline credentials.
pytestmark = pytest.mark.usefixtures("offline_aws")


# The run's training job carries the time budget_usd pays for as runPolicy.activeDeadlineSeconds.
TIMED: dict[str, Any] = {**MANIFEST, "spec": {**MANIFEST["spec"], "runPolicy": {"activeDeadlineSeconds": 3600}}}
# How training-operator v1.9 fails a job at its deadline, and at its backoff limit (pkg/controller.v1/common/job.go):
# the same reason for both, told apart by the message.
PAST_DEADLINE = f"Job {NAME} has failed because it was active longer than specified deadline"
BACKOFF = f"Job {NAME} has failed because it has reached the specified backoff limit"


def ended_after(api: Any, seconds: int, message: str, reason: str = "PyTorchJobFailed") -> None:
    """The job in the API failed ``seconds`` after the operator first synced it (its startTime)."""
    done = (datetime(2026, 12, 3, 10, tzinfo=UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
    api.jobs[NAME]["status"] = {
        "startTime": "2026-12-03T10:00:00Z",
        "completionTime": done,
        "conditions": [
            condition("Created", "2026-12-03T10:00:00Z"),
            condition("Running", done, status="False"),
            {**condition("Failed", done, message=message), "reason": reason},
        ],
    }


def retried(api: Any, manifest: dict[str, Any] = TIMED) -> dict[str, Any]:
    """Run a try's execute, which defers to the trigger; the job it created."""
    api.requests.clear()
    op = operator(manifest)
    with stub_eks(op.hook, api), pytest.raises(TaskDeferred):
        op.execute({})
    return created(api)[-1]


def test_the_active_time_counts_from_start_to_completion() -> None:
    job = {"status": {"startTime": "2026-12-03T10:00:00Z", "completionTime": "2026-12-03T10:16:40Z"}}
    assert ran_seconds(job) == 1000
    # Without a completionTime, the terminal condition's time ends it; before the operator synced it, nothing ran.
    failed = {"startTime": "2026-12-03T10:00:00Z", "conditions": [condition("Failed", "2026-12-03T10:01:00Z")]}
    assert ran_seconds({"status": failed}) == 60
    assert ran_seconds({"status": {"conditions": failed["conditions"]}}) == 0


@pytest.mark.parametrize(
    ("message", "reason", "ran"),
    [
        (PAST_DEADLINE, "PyTorchJobFailed", 3600),  # training-operator v1.9
        ("Job was active longer than specified deadline", "DeadlineExceeded", 3600),  # as Kubernetes Jobs say it
        (BACKOFF, "PyTorchJobFailed", 3601),  # it failed otherwise, but only once its deadline had passed
    ],
)
def test_a_job_stopped_at_its_deadline_is_not_created_again(
    kubernetes_api: Any, message: str, reason: str, ran: int
) -> None:
    retried(kubernetes_api)
    ended_after(kubernetes_api, ran, message, reason)
    assert past_deadline(kubernetes_api.jobs[NAME])
    op = operator(TIMED)
    with stub_eks(op.hook, kubernetes_api), pytest.raises(PyTorchJobOverTime, match="stopped at its deadline"):
        op.execute({})
    assert issubclass(PyTorchJobOverTime, AirflowFailException)  # the task fails without its retries
    assert "DELETE" not in [method for method, *_ in kubernetes_api.requests]  # the job stays, to be read
    assert len(created(kubernetes_api)) == 2  # the first try's, and the retry's refused one (409)


def test_a_retry_after_another_failure_gets_what_is_left_of_the_deadline(kubernetes_api: Any) -> None:
    first = retried(kubernetes_api)
    assert first["spec"]["runPolicy"] == {"activeDeadlineSeconds": 3600}
    ended_after(kubernetes_api, 1000, BACKOFF)
    assert not past_deadline(kubernetes_api.jobs[NAME])
    second = retried(kubernetes_api)
    assert second["spec"]["runPolicy"] == {"activeDeadlineSeconds": 2600}
    # Made from the same manifest: a retry while it runs finds it as its own, deadline and all.
    assert second["metadata"]["annotations"] == first["metadata"]["annotations"]
    retried(kubernetes_api)  # its create is refused (409) and the job there is not refused as another's ...
    assert kubernetes_api.jobs[NAME]["spec"] == second["spec"]  # ... so it waits on it
    ended_after(kubernetes_api, 2000, BACKOFF)
    assert retried(kubernetes_api)["spec"]["runPolicy"] == {"activeDeadlineSeconds": 600}
    # The third job failed otherwise 50 s before its deadline: too little is left to start a fourth's pods.
    ended_after(kubernetes_api, 550, BACKOFF)
    kubernetes_api.requests.clear()
    op = operator(TIMED)
    with stub_eks(op.hook, kubernetes_api), pytest.raises(PyTorchJobOverTime, match="active 550 s of the 600 s"):
        op.execute({})
    assert "DELETE" not in [method for method, *_ in kubernetes_api.requests]


class AtTenSixteenForty(datetime):
    """``datetime`` whose ``now`` is 2026-12-03T10:16:40Z, 1000 s after the jobs' startTime here."""

    @classmethod
    def now(cls, tz: Any = None) -> AtTenSixteenForty:
        return cls(2026, 12, 3, 10, 16, 40, tzinfo=UTC)


@pytest.mark.parametrize("operator_has_acted", [True, False])
def test_a_hung_job_is_suspended_and_its_replacement_gets_what_is_left_of_the_deadline(
    kubernetes_api: Any, monkeypatch: pytest.MonkeyPatch, operator_has_acted: bool
) -> None:
    monkeypatch.setattr("dtp.hooks.pytorchjob.datetime", AtTenSixteenForty)
    retried(kubernetes_api)
    running = {"startTime": "2026-12-03T10:00:00Z", "conditions": [condition("Running", "2026-12-03T10:00:00Z")]}
    kubernetes_api.jobs[NAME]["status"] = running
    op = operator(TIMED)
    with stub_eks(op.hook, kubernetes_api), pytest.raises(PyTorchJobFailed, match=r"hung .*suspended it"):
        op.execute_complete({}, event("hung", "Running", "no new log line for 900 s", ["step 3"]))
    job = kubernetes_api.jobs[NAME]
    assert job["spec"]["runPolicy"] == {"activeDeadlineSeconds": 3600, "suspend": True}  # the operator deletes its pods
    assert job["metadata"]["annotations"][ACTIVE_SECONDS_ANNOTATION] == "1000"
    # The training operator marks it Suspended and resets its startTime, erasing how long it ran. A retry before it
    # got to that (the job still Running) replaces the job all the same.
    if operator_has_acted:
        job["status"] = {"conditions": [condition("Suspended", "2026-12-03T10:16:40Z")]}
    replacement = retried(kubernetes_api)
    assert replacement["spec"]["runPolicy"] == {"activeDeadlineSeconds": 2600}
    assert [method for method, *_ in kubernetes_api.requests].count("DELETE") == 1  # the suspended job, first


def test_a_user_kill_while_waiting_suspends_the_job_and_the_next_try_gets_what_is_left(
    kubernetes_api: Any, monkeypatch: pytest.MonkeyPatch, run_coroutine: Any
) -> None:
    monkeypatch.setattr("dtp.hooks.pytorchjob.datetime", AtTenSixteenForty)
    retried(kubernetes_api)
    kubernetes_api.jobs[NAME]["status"] = {"startTime": "2026-12-03T10:00:00Z",
                                           "conditions": [condition("Running", "2026-12-03T10:00:00Z")]}  # fmt: skip
    kubernetes_api.requests.clear()
    waiting = trigger()
    with stub_eks(waiting.hook, kubernetes_api):
        run_coroutine(waiting.on_kill())  # the task was cleared
    job = kubernetes_api.jobs[NAME]
    assert job["spec"]["runPolicy"] == {"activeDeadlineSeconds": 3600, "suspend": True}
    assert job["metadata"]["annotations"][ACTIVE_SECONDS_ANNOTATION] == "1000"
    assert [method for method, *_ in kubernetes_api.requests] == ["GET", "PATCH"]  # no delete, nothing waited on
    assert retried(kubernetes_api)["spec"]["runPolicy"] == {"activeDeadlineSeconds": 2600}


def test_a_user_kill_leaves_a_job_that_ended_as_it_is(kubernetes_api: Any, run_coroutine: Any) -> None:
    retried(kubernetes_api)
    ended_after(kubernetes_api, 1000, BACKOFF)
    kubernetes_api.requests.clear()
    waiting = trigger()
    with stub_eks(waiting.hook, kubernetes_api):
        run_coroutine(waiting.on_kill())  # the task was marked failed as the job failed
    assert [method for method, *_ in kubernetes_api.requests] == ["GET"]


@pytest.mark.parametrize(
    ("still_deferred", "requests"),
    [(True, []), (False, ["GET", "PATCH"])],
    ids=["moved_to_another_triggerer", "killed"],  # how the task's state tells them apart: test_trigger_kill.py
)
def test_on_kill_suspends_the_job_unless_the_task_still_waits_on_its_trigger(
    kubernetes_api: Any, monkeypatch: pytest.MonkeyPatch, run_coroutine: Any, still_deferred: bool, requests: list
) -> None:
    monkeypatch.setattr(pytorchjob_triggers, "task_still_deferred", AsyncMock(return_value=still_deferred))
    retried(kubernetes_api)
    kubernetes_api.jobs[NAME]["status"] = {"startTime": "2026-12-03T10:00:00Z",
                                           "conditions": [condition("Running", "2026-12-03T10:00:00Z")]}  # fmt: skip
    kubernetes_api.requests.clear()
    waiting = trigger()
    with stub_eks(waiting.hook, kubernetes_api, calls=1 if requests else 0) as eks:  # no kubeconfig to leave it
        run_coroutine(waiting.on_kill())
        eks.assert_no_pending_responses()
    assert [method for method, *_ in kubernetes_api.requests] == requests
    assert suspended(kubernetes_api.jobs[NAME]) == bool(requests)


def test_a_hung_job_that_succeeded_meanwhile_is_neither_suspended_nor_run_again(kubernetes_api: Any) -> None:
    retried(kubernetes_api)
    kubernetes_api.jobs[NAME]["status"] = {"conditions": [condition("Succeeded", "2026-12-03T10:16:40Z")]}
    op = operator(TIMED)
    with stub_eks(op.hook, kubernetes_api), pytest.raises(PyTorchJobFailed, match=r"hung .*it has succeeded since"):
        op.execute_complete({}, event("hung", "Running", "no new log line for 900 s"))
    assert "suspend" not in kubernetes_api.jobs[NAME]["spec"]["runPolicy"]
    kubernetes_api.jobs[NAME]["spec"]["runPolicy"]["suspend"] = True  # suspended by someone after it succeeded
    kubernetes_api.requests.clear()
    op = operator(TIMED)
    with stub_eks(op.hook, kubernetes_api):
        result = op.execute({})
    assert result is not None and result["state"] == "Succeeded"
    assert "DELETE" not in [method for method, *_ in kubernetes_api.requests]


def test_a_job_without_a_deadline_is_created_again_without_one(kubernetes_api: Any) -> None:
    retried(kubernetes_api, MANIFEST)
    ended_after(kubernetes_api, 99_999, BACKOFF)
    assert retried(kubernetes_api, MANIFEST)["spec"] == MANIFEST["spec"]


def test_trigger_says_when_the_job_failed_at_its_deadline(kubernetes_api: Any, first_event: Any) -> None:
    kubernetes_api.jobs = {NAME: {**TIMED, "status": {}}}
    ended_after(kubernetes_api, 3600, PAST_DEADLINE)
    event = wait_for_event(kubernetes_api, trigger(), first_event)
    assert (event["status"], event["state"], event["over_time"]) == ("failed", "Failed", True)
    assert event["message"] == PAST_DEADLINE


def test_a_job_that_ran_past_its_deadline_fails_the_task_without_retries() -> None:
    over = {**event("failed", "Failed", PAST_DEADLINE, ["step 90"]), "over_time": True}
    with pytest.raises(PyTorchJobOverTime, match=r"ran past its deadline .*not retried. Last lines:\nstep 90"):
        operator(TIMED).execute_complete({}, over)
