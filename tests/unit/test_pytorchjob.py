"""EksPyTorchJobOperator, PyTorchJobTrigger and PyTorchJobHook: create once, wait in the triggerer while worker
0's log streams into the task log, fail with the job's condition and last lines, delete on hang and kill. The EKS
API is botocore's Stubber; the Kubernetes API is the local HTTP server of conftest.py, reached through the real
Kubernetes client with the amazon provider's EKS kubeconfig and token."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import yaml
from airflow.sdk.exceptions import TaskDeferred
from botocore.stub import Stubber
from kubernetes.client.exceptions import ApiException

from dtp.hooks.pytorchjob import SPEC_DIGEST_ANNOTATION, PyTorchJobExists, job_state
from dtp.operators.pytorchjob import EksPyTorchJobOperator, PyTorchJobFailed
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


def operator(**kwargs: Any) -> EksPyTorchJobOperator:
    return EksPyTorchJobOperator(
        task_id="run_job", manifest=yaml.safe_dump(MANIFEST), cluster_name=CLUSTER, poll_interval=0, **kwargs
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


def test_a_hung_job_is_deleted(kubernetes_api: Any) -> None:
    kubernetes_api.jobs = {NAME: {**MANIFEST, "status": {}}}
    op = operator()
    with stub_eks(op.hook, kubernetes_api), pytest.raises(PyTorchJobFailed, match=r"hung .*deleted it"):
        op.execute_complete({}, event("hung", "Running", "no new log line for 900 s", ["step 3"]))
    assert kubernetes_api.jobs == {}


@pytest.mark.parametrize("missing", ["name", "namespace"])
def test_a_manifest_without_its_name_or_namespace_is_refused_before_any_call(missing: str) -> None:
    manifest = {**MANIFEST, "metadata": {k: v for k, v in MANIFEST["metadata"].items() if k != missing}}
    op = EksPyTorchJobOperator(task_id="run_job", manifest=yaml.safe_dump(manifest), cluster_name=CLUSTER)
    with pytest.raises(ValueError, match=r"with metadata\.name and metadata\.namespace"):
        op.execute({})
