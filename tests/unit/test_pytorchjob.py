"""EksPyTorchJobOperator and PyTorchJobHook: create the job once, find it again on a retry, delete it on kill, and
fail with the job's condition and last lines (the trigger: test_pytorchjob_trigger.py; the deadline across retries:
test_pytorchjob_deadline.py). The EKS API is botocore's Stubber; the Kubernetes API is the local HTTP server of
conftest.py, reached through the real Kubernetes client with the amazon provider's EKS kubeconfig and token."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from airflow.providers.amazon.aws.hooks.eks import EksHook
from airflow.sdk import BaseHook
from airflow.sdk.exceptions import TaskDeferred
from pytorchjob_support import (
    CLUSTER,
    MANIFEST,
    NAME,
    NAMESPACE,
    condition,
    created,
    event,
    operator,
    stamp,
    stub_eks,
)

from dtp.hooks.pytorchjob import (
    SPEC_DIGEST_ANNOTATION,
    PyTorchJobExists,
    PyTorchJobHook,
    job_state,
)
from dtp.operators.pytorchjob import EksPyTorchJobOperator, PyTorchJobFailed
from dtp.triggers.pytorchjob import PyTorchJobTrigger, _sortable

# Every test here signs its EKS token with the offline credentials.
pytestmark = pytest.mark.usefixtures("offline_aws")


# --- job state ---------------------------------------------------------------------------------------------------
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


# --- hook --------------------------------------------------------------------------------------------------------
def test_the_hooks_connection_is_the_aws_connection_it_hands_to_eks() -> None:
    hook = PyTorchJobHook(CLUSTER, NAMESPACE, "aws_training", "eu-west-1")
    assert isinstance(hook, BaseHook)
    assert getattr(hook, hook.conn_name_attr) == hook.eks_hook.aws_conn_id == "aws_training"
    assert hook.eks_hook.region_name == "eu-west-1" and hook.conn_type == EksHook.conn_type
    default = PyTorchJobHook(CLUSTER, NAMESPACE)
    assert default.eks_hook.aws_conn_id == default.default_conn_name == EksHook.default_conn_name


# --- operator: create once ---------------------------------------------------------------------------------------
def test_execute_creates_the_job_and_defers_to_its_trigger(kubernetes_api: Any) -> None:
    op = operator(hang_timeout="900", pending_timeout="1800")  # the form's, rendered as text
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
    assert waiting.pending_timeout == 1800.0


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


def test_a_job_being_deleted_is_waited_out_and_created_anew(
    kubernetes_api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing_job(kubernetes_api, "Running")
    kubernetes_api.jobs[NAME]["metadata"]["deletionTimestamp"] = "2026-12-03T10:30:00Z"  # its pods are still going
    # The foreground delete ends while the hook waits.
    gone = SimpleNamespace(monotonic=time.monotonic, sleep=lambda _: kubernetes_api.jobs.pop(NAME))
    monkeypatch.setattr("dtp.hooks.pytorchjob.time", gone)
    op = operator()
    with stub_eks(op.hook, kubernetes_api), pytest.raises(TaskDeferred):
        op.execute({})
    assert len(created(kubernetes_api)) == 2  # refused (409) while it was there, then created anew
    assert "deletionTimestamp" not in kubernetes_api.jobs[NAME]["metadata"]
    assert kubernetes_api.jobs[NAME]["status"] == {}


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


# --- operator: resume from the trigger -----------------------------------------------------------------------------
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


def test_an_api_out_of_reach_fails_the_task_with_the_triggers_reason() -> None:
    message = "the Kubernetes API failed 11 polls in a row (503 Service Unavailable)"
    gone = event("error", "Running", message, ["step 4"])
    with pytest.raises(PyTorchJobFailed, match=r", last seen Running: the Kubernetes API failed 11 polls .*\nstep 4$"):
        operator().execute_complete({}, gone)


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
