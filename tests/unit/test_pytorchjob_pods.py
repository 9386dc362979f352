"""Why a PyTorchJob does not start or failed, from its pods: a job whose container cannot start fails at once, one
whose pods no node takes fails at its pending timeout with the scheduler's reason, and a failed job names each failed
pod's reason, exit code and node, and worker 0's last lines before its restart. The Kubernetes API is conftest.py's,
answering here also the pods' specs and statuses, FailedScheduling events and previous containers' logs."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pytorchjob_support import MANIFEST, NAME, NAMESPACE, condition, operator, stamp, stub_eks, trigger, wait_for_event

from dtp.operators.pytorchjob import PyTorchJobFailed
from dtp.triggers.pytorchjob import PyTorchJobTrigger

# Every test here signs its EKS token with the offline credentials.
pytestmark = pytest.mark.usefixtures("offline_aws")

WORKER = "training.kubeflow.org/replica-type"
INDEX = "training.kubeflow.org/replica-index"
UNSCHEDULABLE = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available"


@pytest.fixture
def pod_api(kubernetes_api: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """conftest.py's Kubernetes API, whose pods also have ``pod_objects`` (name -> spec and status), whose
    namespace has ``events``, and whose pods' previous containers logged ``previous_logs`` (name -> lines)."""
    for name, empty in (("pod_objects", {}), ("events", []), ("previous_logs", {})):
        monkeypatch.setattr(kubernetes_api, name, empty, raising=False)
    answer = kubernetes_api.do_GET
    pods_path = f"/api/v1/namespaces/{NAMESPACE}/pods"

    def do_get(handler: Any) -> None:
        url = urlsplit(handler.path)
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        if url.path == f"/api/v1/namespaces/{NAMESPACE}/events":
            handler.requests.append((handler.command, handler.path, "", b""))
            reasons = re.findall(r"reason=(\w+)", query.get("fieldSelector", ""))
            items = [event for event in handler.events if event["reason"] in reasons]
            handler._send(200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items})
        elif url.path == pods_path:
            handler.requests.append((handler.command, handler.path, "", b""))
            selector = dict(term.split("=", 1) for term in query.get("labelSelector", "").split(",") if term)
            items = [
                {"metadata": {"name": name, "namespace": NAMESPACE, "labels": labels}, **handler.pod_objects[name]}
                for name, labels in handler.pods.items()
                if selector.items() <= labels.items()
            ]
            handler._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
        elif query.get("previous", "").lower() == "true":
            handler.requests.append((handler.command, handler.path, "", b""))
            pod = url.path.removeprefix(f"{pods_path}/").removesuffix("/log")
            handler._send(200, "".join(f"{line}\n" for line in handler.previous_logs[pod]), "text/plain")
        else:
            answer(handler)

    monkeypatch.setattr(kubernetes_api, "do_GET", do_get)
    return kubernetes_api


def add_pod(api: Any, index: int, status: dict[str, Any], node: str | None = None) -> str:
    """Worker ``index`` of the job, with ``status``, on ``node`` (None: not scheduled)."""
    name = f"{NAME}-worker-{index}"
    api.pods[name] = {"training.kubeflow.org/job-name": NAME, WORKER: "worker", INDEX: str(index)}
    api.pod_objects[name] = {"spec": {"containers": [], **({"nodeName": node} if node else {})}, "status": status}
    return name


def waiting(reason: str, message: str = "") -> dict[str, Any]:
    """A pod status whose training container waits for ``reason``."""
    state = {"waiting": {"reason": reason, "message": message}}
    return {"phase": "Pending", "containerStatuses": [container(state)]}


def container(state: dict[str, Any], last_state: dict[str, Any] | None = None, restarts: int = 0) -> dict[str, Any]:
    return {"name": "pytorch", "image": "dtp/training", "imageID": "", "ready": False, "restartCount": restarts,
            "state": state, "lastState": last_state or {}}  # fmt: skip


def failed_scheduling(pod: str, message: str, at: str) -> dict[str, Any]:
    return {"metadata": {"name": f"{pod}.{at}", "namespace": NAMESPACE, "creationTimestamp": at},
            "involvedObject": {"kind": "Pod", "name": pod, "namespace": NAMESPACE},
            "reason": "FailedScheduling", "message": message, "lastTimestamp": at, "type": "Warning"}  # fmt: skip


def pod_lines(output: str) -> list[str]:
    return [line.split("Pod ", 1)[1].split(" [dtp.")[0] for line in output.splitlines() if f"Pod {NAMESPACE}/" in line]


def test_a_job_no_node_takes_fails_at_its_pending_timeout_with_the_schedulers_reason(
    pod_api: Any, first_event: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    pod_api.jobs = {NAME: {**MANIFEST, "status": {}}}
    pod_api.timeline = [("Created", [])]
    ready = add_pod(pod_api, 0, {"phase": "Running"}, node="ip-10-0-0-1")
    stuck = add_pod(pod_api, 1, {"phase": "Pending"})
    pod_api.events = [
        failed_scheduling(stuck, "0/4 nodes are available: 4 node(s) had untolerated taint", "2026-12-03T10:00:01Z"),
        failed_scheduling(stuck, UNSCHEDULABLE, "2026-12-03T10:00:31Z"),  # the latest
        failed_scheduling("someone-elses-pod", "0/4 nodes are available", "2026-12-03T10:00:40Z"),
    ]
    event = wait_for_event(pod_api, trigger(pending_timeout=0.5), first_event)
    assert (event["status"], event["state"]) == ("not_started", "Created")
    assert event["message"] == "not Running within 0 s, still Created"  # 0.5 s, rounded
    assert event["pods"] == [f"{ready}: Running", f"{stuck}: Pending, not scheduled: {UNSCHEDULABLE}"]
    # Each pod's status is logged once, however many polls found it so, not every poll.
    assert pod_lines(capsys.readouterr().out) == [f"{NAMESPACE}/{pod}" for pod in event["pods"]]


def test_a_job_whose_image_cannot_be_pulled_fails_at_once(pod_api: Any, first_event: Any) -> None:
    pod_api.jobs = {NAME: {**MANIFEST, "status": {}}}
    pod_api.timeline = [("Created", [])]
    add_pod(pod_api, 0, waiting("ContainerCreating"), node="ip-10-0-0-1")
    pulling = add_pod(pod_api, 1, waiting("ImagePullBackOff", 'Back-off pulling image "dtp/trainig"'), "ip-10-0-0-2")
    event = wait_for_event(pod_api, trigger(pending_timeout=3600), first_event)
    assert (event["status"], event["message"]) == ("not_started", "a container cannot start (ImagePullBackOff)")
    assert event["pods"] == [f'{pulling}: Pending, pytorch ImagePullBackOff: Back-off pulling image "dtp/trainig"']


def test_a_failed_job_names_its_failed_pods_and_worker_0s_lines_before_its_restart(
    pod_api: Any, first_event: Any
) -> None:
    pod_api.jobs = {NAME: {**MANIFEST, "status": {}}}
    pod_api.timeline = [("Running", [f"{stamp(1)} step 1"]), ("Failed", [f"{stamp(9)} restarted at step 0"])]
    oom = {"terminated": {"reason": "OOMKilled", "exitCode": 137}}
    running = {"running": {"startedAt": "2026-12-03T10:01:05Z"}}
    leader = add_pod(pod_api, 0, {"phase": "Running", "containerStatuses": [container(running, oom, restarts=1)]},
                     node="ip-10-0-0-1")  # fmt: skip
    evicted = {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}
    add_pod(pod_api, 1, evicted, node="ip-10-0-0-2")
    add_pod(pod_api, 2, {"phase": "Running", "containerStatuses": [container(running)]}, node="ip-10-0-0-3")
    pod_api.previous_logs = {leader: [f"{stamp(4)} step 2", f"{stamp(5)} CUDA out of memory"]}
    event = wait_for_event(pod_api, trigger(), first_event)
    assert (event["status"], event["tail"]) == ("failed", ["step 1", "restarted at step 0"])
    assert event["pods"] == [
        f"{leader} OOMKilled (exit code 137) on ip-10-0-0-1",
        f"{NAME}-worker-1 Evicted on ip-10-0-0-2: The node was low on resource: memory.",
    ]
    assert event["previous_tail"] == ["step 2", "CUDA out of memory"]
    previous = [path for _, path, *_ in pod_api.requests if "previous=true" in path.lower()]
    assert len(previous) == 1 and "tailLines=30" in previous[0] and f"/pods/{leader}/log" in previous[0]


def test_a_job_that_did_not_start_is_suspended_and_fails_the_task_with_its_pods(pod_api: Any) -> None:
    pod_api.jobs = {NAME: {**MANIFEST, "status": {"conditions": [condition("Created", "2026-12-03T10:00:00Z")]}}}
    pods = [f"{NAME}-worker-1: Pending, not scheduled: {UNSCHEDULABLE}"]
    not_started = {"status": "not_started", "job_name": NAME, "namespace": NAMESPACE, "state": "Created",
                   "message": "not Running within 3600 s, still Created", "tail": [], "pods": pods}  # fmt: skip
    op = operator()
    expected = r"did not start \(not Running within 3600 s, still Created\); suspended it .*Its pods:\n  .*-worker-1: "
    with stub_eks(op.hook, pod_api), pytest.raises(PyTorchJobFailed, match=expected):
        op.execute_complete({}, not_started)
    assert pod_api.jobs[NAME]["spec"]["runPolicy"] == {"suspend": True}  # its pods go; a retry replaces it


def test_a_failure_names_the_failed_pods_and_worker_0s_lines_before_its_restart() -> None:
    failed = {"status": "failed", "job_name": NAME, "namespace": NAMESPACE, "state": "Failed",
              "message": "1 Worker replica(s) failed", "tail": ["step 0"],
              "pods": [f"{NAME}-worker-0 OOMKilled (exit code 137) on ip-10-0-0-1"],
              "previous_tail": ["step 2", "CUDA out of memory"]}  # fmt: skip
    with pytest.raises(PyTorchJobFailed) as failure:
        operator().execute_complete({}, failed)
    assert str(failure.value) == (
        f"PyTorchJob {NAMESPACE}/{NAME} ended Failed: 1 Worker replica(s) failed. Failed pods:\n"
        f"  {NAME}-worker-0 OOMKilled (exit code 137) on ip-10-0-0-1\nLast lines:\nstep 0\n"
        "Worker 0's container before its restart, last lines:\nstep 2\nCUDA out of memory"
    )


def test_the_trigger_serializes_its_pending_timeout() -> None:
    classpath, kwargs = trigger(pending_timeout=600).serialize()
    assert kwargs["pending_timeout"] == 600 and PyTorchJobTrigger(**kwargs).serialize() == (classpath, kwargs)


def test_credential_renewals_do_not_restart_the_pending_clock(
    kubernetes_api: Any, first_event: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubernetes_api.jobs = {NAME: {**MANIFEST, "status": {}}}  # Pending for ever
    clock = [1000.0]
    answer = kubernetes_api.do_GET

    def do_get(handler: Any) -> None:
        clock[0] += 10  # each request takes 10 s
        answer(handler)

    monkeypatch.setattr(kubernetes_api, "do_GET", do_get)
    monkeypatch.setattr("dtp.triggers.pytorchjob.time", SimpleNamespace(monotonic=lambda: clock[0]))
    # A poll reads the job, lists worker 0 (none yet) and lists the job's pods: 30 s. Every fifth request is refused,
    # the credentials having expired: a new kubeconfig every 50 s, sooner than the pending timeout.
    kubernetes_api.unauthorized = set(range(5, 500, 5))
    event = wait_for_event(kubernetes_api, trigger(pending_timeout=100), first_event, kubeconfigs=3)
    assert (event["status"], event["message"]) == ("not_started", "not Running within 100 s, still Pending")
    assert event["pods"] == ["(the job has no pods)"]
