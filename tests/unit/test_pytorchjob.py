"""EksPyTorchJobOperator, PyTorchJobTrigger and PyTorchJobHook: create once, wait in the triggerer while worker
0's log streams into the task log, fail with the job's condition and last lines, suspend on hang, delete on kill.
The EKS API is botocore's Stubber; the Kubernetes API is the local HTTP server of conftest.py, reached through the
real Kubernetes client with the amazon provider's EKS kubeconfig and token."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from botocore.stub import Stubber
from kubernetes.client.exceptions import ApiException

from dtp.hooks.pytorchjob import (
    ACTIVE_SECONDS_ANNOTATION,
    SPEC_DIGEST_ANNOTATION,
    PyTorchJobExists,
    job_state,
    past_deadline,
    ran_seconds,
)
from dtp.operators.pytorchjob import EksPyTorchJobOperator, PyTorchJobFailed, PyTorchJobOverTime
from dtp.triggers.pytorchjob import PyTorchJobTrigger, _sortable

CLUSTER, NAMESPACE, NAME = "dtp-training", "kubeflow", "run-abc123"
MANIFEST: dict[str, Any] = {
    "apiVersion": "kubeflow.org/v1",
    "kind": "PyTorchJob",
    "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {"dtp.dev/run": NAME}},
    "spec": {"pytorchReplicaSpecs": {"Worker": {"replicas": 2, "template": {"spec": {"containers": []}}}}},
}


@pytest.fixture(autouse=True)
def account(offline_aws: None) -> None:
    """Every test here signs its EKS token with the offline credentials."""


def describe_cluster(endpoint: str) -> dict[str, Any]:
    certificate = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
    return {"cluster": {"name": CLUSTER, "status": "ACTIVE", "endpoint": endpoint,
                        "certificateAuthority": {"data": certificate}}}  # fmt: skip


def stub_eks(hook: Any, api: Any, calls: int = 1) -> Stubber:
    """Answer ``calls`` DescribeCluster requests (one per kubeconfig) with the local API server's endpoint."""
    stubber = Stubber(hook.eks_hook.conn)
    for _ in range(calls):
        stubber.add_response("describe_cluster", describe_cluster(api.endpoint), {"name": CLUSTER})
    stubber.activate()
    return stubber


def operator(manifest: dict[str, Any] = MANIFEST, **kwargs: Any) -> EksPyTorchJobOperator:
    return EksPyTorchJobOperator(
        task_id="run_job", manifest=yaml.safe_dump(manifest), cluster_name=CLUSTER, poll_interval=0, **kwargs
    )


def trigger(**kwargs: Any) -> PyTorchJobTrigger:
    return PyTorchJobTrigger(job_name=NAME, namespace=NAMESPACE, cluster_name=CLUSTER, poll_interval=0, **kwargs)


def wait_for_event(api: Any, trigger: PyTorchJobTrigger, first_event: Any, kubeconfigs: int = 1) -> dict[str, Any]:
    with stub_eks(trigger.hook, api, kubeconfigs) as eks:
        event = first_event(trigger)
        eks.assert_no_pending_responses()  # it wrote ``kubeconfigs`` kubeconfigs
    return event


def created(api: Any) -> list[dict[str, Any]]:
    return [json.loads(body) for method, _, _, body in api.requests if method == "POST"]


def stamp(second: int, fraction: str = "") -> str:
    return f"2026-12-03T10:01:{second:02d}{fraction}Z"


# --- job state ---------------------------------------------------------------------------------------------------
def condition(kind: str, at: str, status: str = "True", message: str = "") -> dict[str, str]:
    return {"type": kind, "status": status, "lastTransitionTime": at, "message": message}


def test_job_state_is_the_newest_true_condition() -> None:
    assert job_state({}) == ("Pending", "")
    running = condition("Running", "2026-12-03T10:00:05Z")
    assert job_state({"status": {"conditions": [condition("Created", "2026-12-03T10:00:00Z"), running]}}) == (
        "Running",
        "",
    )
    stopped = condition("Running", "2026-12-03T10:09:00Z", status="False")
    failed = condition("Failed", "2026-12-03T10:09:00Z", message="Worker 1 exited with code 1")
    assert job_state({"status": {"conditions": [running, stopped, failed]}}) == (
        "Failed",
        "Worker 1 exited with code 1",
    )
    # A terminal condition written in the same second as a Running one wins.
    tied = [condition("Succeeded", "2026-12-03T10:09:00Z"), condition("Running", "2026-12-03T10:09:00Z")]
    assert job_state({"status": {"conditions": tied}})[0] == "Succeeded"


def test_log_timestamps_sort_in_time_order() -> None:
    # Kubernetes drops a fraction's trailing zeros: as text, ".1Z" would sort after ".12Z".
    assert _sortable("") < _sortable(stamp(0)) < _sortable(stamp(0, ".1")) < _sortable(stamp(0, ".12"))
    assert _sortable(stamp(0, ".999999999")) < _sortable(stamp(1))


# --- operator: create once ---------------------------------------------------------------------------------------
def test_execute_creates_the_job_and_defers_to_its_trigger(kubernetes_api: Any) -> None:
    op = operator(hang_timeout="900")
    with stub_eks(op.hook, kubernetes_api), pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    (job,) = created(kubernetes_api)
    assert job["spec"] == MANIFEST["spec"]
    assert job["metadata"]["labels"] == {"dtp.dev/run": NAME}
    assert len(job["metadata"]["annotations"][SPEC_DIGEST_ANNOTATION]) == 64
    _, authorization = kubernetes_api.requests[0][1:3]
    assert authorization.startswith("Bearer k8s-aws-v1.")  # the EKS token of aws_default's credentials
    waiting = deferred.value.trigger
    assert isinstance(waiting, PyTorchJobTrigger) and deferred.value.method_name == "execute_complete"
    assert (waiting.job_name, waiting.namespace, waiting.cluster_name, waiting.hang_timeout) == (
        NAME,
        NAMESPACE,
        CLUSTER,
        900.0,
    )


def test_a_retry_waits_on_the_first_tries_job(kubernetes_api: Any) -> None:
    first, retry = operator(), operator()
    for op in (first, retry):
        with stub_eks(op.hook, kubernetes_api), pytest.raises(TaskDeferred):
            op.execute({})
    assert len(created(kubernetes_api)) == 2  # the retry's create is refused (409) ...
    assert list(kubernetes_api.jobs) == [NAME]  # ... and it found the job instead


def test_a_job_of_that_name_from_another_manifest_is_refused(kubernetes_api: Any) -> None:
    kubernetes_api.jobs = {NAME: {**MANIFEST, "metadata": {**MANIFEST["metadata"], "annotations": {}}}}
    op = operator()
    with stub_eks(op.hook, kubernetes_api), pytest.raises(PyTorchJobExists, match=f"{NAMESPACE}/{NAME} exists"):
        op.execute({})


def existing_job(api: Any, state: str) -> None:
    """The job a first try created, in ``state``."""
    op = operator()
    with stub_eks(op.hook, api), pytest.raises(TaskDeferred):
        op.execute({})
    api.jobs[NAME]["status"] = {"conditions": [condition(state, "2026-12-03T10:30:00Z", message="it ended")]}
    api.requests.clear()


def test_a_retry_after_success_returns_without_running_again(kubernetes_api: Any) -> None:
    existing_job(kubernetes_api, "Succeeded")
    op = operator()
    with stub_eks(op.hook, kubernetes_api):
        assert op.execute({}) == {"job_name": NAME, "namespace": NAMESPACE, "state": "Succeeded"}
    assert [method for method, *_ in kubernetes_api.requests] == ["POST", "GET"]


def test_a_retry_after_failure_runs_a_fresh_job(kubernetes_api: Any) -> None:
    existing_job(kubernetes_api, "Failed")
    op = operator()
    with stub_eks(op.hook, kubernetes_api), pytest.raises(TaskDeferred):
        op.execute({})
    job_path = f"/apis/kubeflow.org/v1/namespaces/{NAMESPACE}/pytorchjobs/{NAME}"
    sent = [(method, path.split("?")[0]) for method, path, *_ in kubernetes_api.requests]
    deleted = [i for i, request in enumerate(sent) if request == ("DELETE", job_path)]
    creates = [i for i, (method, _) in enumerate(sent) if method == "POST"]
    assert deleted, sent  # the failed job was deleted ...
    assert creates and creates[-1] > deleted[0], sent  # ... before the fresh one was created
    assert created(kubernetes_api)[-1]["spec"] == MANIFEST["spec"]
    assert kubernetes_api.jobs[NAME]["status"] == {}  # the new job, not the failed one


def test_a_user_kill_while_creating_deletes_the_job(kubernetes_api: Any) -> None:
    existing_job(kubernetes_api, "Running")
    op = operator()
    with stub_eks(op.hook, kubernetes_api):
        op.on_kill()
    assert kubernetes_api.jobs == {}


# --- trigger: wait and stream --------------------------------------------------------------------------------------
def test_trigger_streams_worker_0s_log_once_and_fires_on_success(
    kubernetes_api: Any, first_event: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    kubernetes_api.jobs = {NAME: {**MANIFEST, "status": {}}}
    kubernetes_api.timeline = [
        ("Created", []),
        ("Running", [f"{stamp(1)} step 1 loss 5.1", f"{stamp(1, '.5')} step 2 loss 4.8"]),
        (None, [f"{stamp(2)} step 3 loss 4.2"]),
        ("Succeeded", [f"{stamp(3)} training complete"]),
    ]
    event = wait_for_event(kubernetes_api, trigger(), first_event)
    assert event["status"] == "success" and event["state"] == "Succeeded"
    assert event["tail"] == ["step 1 loss 5.1", "step 2 loss 4.8", "step 3 loss 4.2", "training complete"]
    # The triggerer's log lines go to the task's log; here they reach stdout.
    prefix = f"[{NAME}-worker-0] "
    streamed = [
        line.split(prefix)[1].split(" [dtp.")[0] for line in capsys.readouterr().out.splitlines() if prefix in line
    ]
    assert streamed == event["tail"]  # each line once, in order
    selector = "labelSelector=training.kubeflow.org%2Fjob-name%3Drun-abc123%2Ctraining.kubeflow.org%2Freplica-type"
    assert any(selector in path for _, path, *_ in kubernetes_api.requests)


def test_trigger_reports_a_failed_job_with_its_message(kubernetes_api: Any, first_event: Any) -> None:
    kubernetes_api.jobs = {NAME: {**MANIFEST, "status": {}}}
    kubernetes_api.timeline = [("Running", [f"{stamp(1)} NCCL error"]), ("Failed", [])]
    event = wait_for_event(kubernetes_api, trigger(), first_event)
    assert (event["status"], event["state"], event["tail"]) == ("failed", "Failed", ["NCCL error"])
    assert event["message"] == f"PyTorchJob {NAME} is failed."
    assert event["over_time"] is False


def test_trigger_reports_a_hang(kubernetes_api: Any, first_event: Any) -> None:
    kubernetes_api.jobs = {NAME: {**MANIFEST, "status": {}}}
    kubernetes_api.timeline = [("Running", [f"{stamp(1)} step 1"])]  # then nothing new, for ever
    event = wait_for_event(kubernetes_api, trigger(hang_timeout=0.5), first_event)
    assert (event["status"], event["tail"]) == ("hung", ["step 1"])
    assert event["message"] == "no new log line for 0 s"  # 0.5 s, rounded


def test_trigger_reports_a_job_deleted_under_it(kubernetes_api: Any, first_event: Any) -> None:
    event = wait_for_event(kubernetes_api, trigger(), first_event)
    assert (event["status"], event["state"]) == ("failed", "Deleted")


def test_a_resumed_trigger_forwards_no_line_twice(kubernetes_api: Any, first_event: Any) -> None:
    kubernetes_api.jobs = {NAME: {**MANIFEST, "status": {}}}
    kubernetes_api.timeline = [("Running", [f"{stamp(1)} old line"]), ("Succeeded", [f"{stamp(2)} new line"])]
    event = wait_for_event(kubernetes_api, trigger(last_log_time=stamp(1)), first_event)
    assert event["tail"] == ["new line"]


def test_trigger_renews_credentials_the_api_refuses_during_the_wait(kubernetes_api: Any, first_event: Any) -> None:
    kubernetes_api.jobs = {NAME: {**MANIFEST, "status": {}}}
    kubernetes_api.timeline = [("Running", [f"{stamp(1)} step 1"]), ("Succeeded", [f"{stamp(2)} step 2"])]
    # The first poll reads the job, lists worker 0 and reads its log; the second poll's first request is refused.
    kubernetes_api.unauthorized = {4}
    # A second kubeconfig, with fresh credentials:
    event = wait_for_event(kubernetes_api, trigger(), first_event, kubeconfigs=2)
    assert (event["status"], event["tail"]) == ("success", ["step 1", "step 2"])


def test_trigger_fails_when_fresh_credentials_are_refused(kubernetes_api: Any, first_event: Any) -> None:
    kubernetes_api.jobs = {NAME: {**MANIFEST, "status": {}}}
    kubernetes_api.unauthorized = {1}
    with pytest.raises(ApiException, match="Unauthorized"):
        wait_for_event(kubernetes_api, trigger(), first_event)


def test_trigger_serializes_every_argument() -> None:
    original = trigger(hang_timeout=600, last_log_time=stamp(1), region_name="us-west-2")
    classpath, kwargs = original.serialize()
    assert classpath == "dtp.triggers.pytorchjob.PyTorchJobTrigger"
    assert PyTorchJobTrigger(**kwargs).serialize() == (classpath, kwargs)
    assert kwargs["last_log_time"] == stamp(1) and kwargs["region_name"] == "us-west-2"


def test_trigger_on_kill_deletes_the_job(kubernetes_api: Any, run_coroutine: Any) -> None:
    kubernetes_api.jobs = {NAME: {**MANIFEST, "status": {}}}
    waiting = trigger()
    with stub_eks(waiting.hook, kubernetes_api):
        run_coroutine(waiting.on_kill())
    assert kubernetes_api.jobs == {}


# --- operator: resume from the trigger -----------------------------------------------------------------------------
def event(status: str, state: str, message: str = "", tail: list[str] | None = None) -> dict[str, Any]:
    return {"status": status, "job_name": NAME, "namespace": NAMESPACE, "state": state, "message": message,
            "tail": tail or []}  # fmt: skip


def test_success_returns_the_job() -> None:
    assert operator().execute_complete({}, event("success", "Succeeded")) == {
        "job_name": NAME,
        "namespace": NAMESPACE,
        "state": "Succeeded",
    }


def test_failure_names_the_condition_and_the_last_lines() -> None:
    failed = event("failed", "Failed", "Worker 1 exited with code 137", ["step 9", "Killed"])
    with pytest.raises(PyTorchJobFailed, match=r"ended Failed: Worker 1 exited with code 137.*\nstep 9\nKilled"):
        operator().execute_complete({}, failed)


def test_a_hung_job_that_is_gone_fails_the_task_saying_so(kubernetes_api: Any) -> None:
    op = operator()
    with stub_eks(op.hook, kubernetes_api), pytest.raises(PyTorchJobFailed, match=r"hung .*it is gone.*\nstep 3"):
        op.execute_complete({}, event("hung", "Running", "no new log line for 900 s", ["step 3"]))


@pytest.mark.parametrize("missing", ["name", "namespace"])
def test_a_manifest_without_its_name_or_namespace_is_refused_before_any_call(missing: str) -> None:
    manifest = {**MANIFEST, "metadata": {k: v for k, v in MANIFEST["metadata"].items() if k != missing}}
    op = EksPyTorchJobOperator(task_id="run_job", manifest=yaml.safe_dump(manifest), cluster_name=CLUSTER)
    with pytest.raises(ValueError, match=r"with metadata\.name and metadata\.namespace"):
        op.execute({})


# --- one deadline across the task's retries ----------------------------------------------------------------------
# The run's training job carries the time budget_usd pays for as runPolicy.activeDeadlineSeconds.
TIMED: dict[str, Any] = {**MANIFEST, "spec": {**MANIFEST["spec"], "runPolicy": {"activeDeadlineSeconds": 3600}}}
# How training-operator v1.9 fails a job at its deadline, and at its backoff limit (pkg/controller.v1/common/job.go):
# the same reason for both, told apart by the message.
PAST_DEADLINE = f"Job {NAME} has failed because it was active longer than specified deadline"
BACKOFF = f"Job {NAME} has failed because it has reached the specified backoff limit"


def ended_after(api: Any, seconds: int, message: str, reason: str = "PyTorchJobFailed") -> None:
    """The job in the API failed ``seconds`` after the operator first synced it (its startTime)."""
    done = f"2026-12-03T{10 + seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}Z"
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
    monkeypatch.setattr("dtp.operators.pytorchjob.datetime", AtTenSixteenForty)
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
        assert op.execute({})["state"] == "Succeeded"
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
