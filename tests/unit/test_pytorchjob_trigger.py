"""PyTorchJobTrigger: wait in the triggerer while worker 0's log streams into the task log, and report success,
failure, a hang or a job deleted or suspended under it; credentials renewed, and API errors a later poll may not meet
waited through, during a long wait (suspending the job on kill: test_pytorchjob_deadline.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes.client.exceptions import ApiException
from pytorchjob_support import (
    MANIFEST,
    NAME,
    condition,
    stamp,
    trigger,
    wait_for_event,
)
from urllib3.exceptions import ProtocolError

from dtp.hooks.pytorchjob import PyTorchJobHook
from dtp.triggers.pytorchjob import PyTorchJobTrigger, transient

# Every test here signs its EKS token with the offline credentials.
pytestmark = pytest.mark.usefixtures("offline_aws")


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


def test_trigger_reports_a_job_suspended_under_it(kubernetes_api: Any, first_event: Any) -> None:
    # A cleared task's trigger suspended the job (on_kill) after the task's next try found it still running.
    suspended = {**MANIFEST["spec"], "runPolicy": {"suspend": True}}
    kubernetes_api.jobs = {NAME: {**MANIFEST, "spec": suspended, "status": {}}}
    kubernetes_api.timeline = [("Running", [f"{stamp(1)} step 1"])]  # its pods are going: nothing new, for ever
    event = wait_for_event(kubernetes_api, trigger(hang_timeout=0.5), first_event)
    assert (event["status"], event["state"]) == ("failed", "Suspended")  # not a hang: a retry replaces it


def failing(monkeypatch: pytest.MonkeyPatch, method: str, errors: list[Exception | None]) -> list[Exception | None]:
    """Make ``PyTorchJobHook.<method>`` raise the next of ``errors`` (None: answer) while any are left."""
    answer = getattr(PyTorchJobHook, method)

    def call(self: PyTorchJobHook, *args: Any, **kwargs: Any) -> Any:
        if errors and (error := errors.pop(0)) is not None:
            raise error
        return answer(self, *args, **kwargs)

    monkeypatch.setattr(PyTorchJobHook, method, call)
    return errors


def test_trigger_waits_through_api_errors_a_later_poll_may_not_meet(
    kubernetes_api: Any, first_event: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubernetes_api.jobs = {NAME: {**MANIFEST, "status": {}}}
    kubernetes_api.timeline = [
        ("Running", [f"{stamp(1)} step 1"]),
        (None, [f"{stamp(2)} step 2"]),
        ("Succeeded", [f"{stamp(3)} done"]),
    ]
    # The API server overloaded or restarting, then the connection lost: three polls in a row fail ...
    job_errors = failing(monkeypatch, "get_job", [ApiException(503, "Service Unavailable"),
                                                   ProtocolError("Connection aborted."), ConnectionResetError(),
                                                   None, ApiException(429, "Too Many Requests")])  # fmt: skip
    # ... and worker 0's kubelet fails a log read, which is skipped: the next poll reads those lines.
    log_errors = failing(monkeypatch, "log_lines", [ApiException(500, "Internal Server Error")])
    event = wait_for_event(kubernetes_api, trigger(max_poll_failures=3), first_event)
    assert (event["status"], event["tail"]) == ("success", ["step 1", "step 2", "done"])
    assert job_errors == log_errors == []


def test_trigger_gives_up_when_the_api_fails_poll_after_poll(
    kubernetes_api: Any, first_event: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubernetes_api.jobs = {NAME: {**MANIFEST, "status": {}}}
    kubernetes_api.timeline = [("Running", [])]
    failing(monkeypatch, "get_job", [None, *[ApiException(502, "Bad Gateway")] * 4])
    event = wait_for_event(kubernetes_api, trigger(max_poll_failures=3), first_event)
    assert (event["status"], event["state"]) == ("error", "Running")  # as the last poll that answered found it
    assert event["message"] == "the Kubernetes API failed 4 polls in a row (502 Bad Gateway); the job is left as it is"
    assert {method for method, *_ in kubernetes_api.requests} == {"GET"}  # the job was left as it is


def test_only_errors_a_later_call_may_not_meet_are_waited_through() -> None:
    assert all(map(transient, [ApiException(429), ApiException(504), ProtocolError(), TimeoutError()]))
    assert not any(map(transient, [ApiException(401), ApiException(403), ApiException(404), ValueError()]))


LIMITS = ("sinceSeconds", "limitBytes")  # what a log read may ask the kubelet for


@pytest.fixture
def kubelet(kubernetes_api: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """conftest.py's Kubernetes API on a clock of its own that each request moves on 30 s, the trigger's clock too:
    each read of the job first has worker 0 log a step (``step <n>``, until the job succeeds at the ``steps``-th),
    and a log read answers as the kubelet does, with the lines logged ``sinceSeconds`` before it at most and the first
    ``limitBytes`` of them (the lines it did not log itself were logged long before)."""
    leader = f"{NAME}-worker-0"
    kubernetes_api.pods = {leader: {"training.kubeflow.org/job-name": NAME,
                                    "training.kubeflow.org/replica-type": "worker",
                                    "training.kubeflow.org/replica-index": "0"}}  # fmt: skip
    kubernetes_api.jobs = {NAME: {**MANIFEST, "status": {"conditions": [condition("Running", stamp(0))]}}}
    kubernetes_api.logs = {leader: []}
    monkeypatch.setattr(kubernetes_api, "clock", 1000.0, raising=False)
    monkeypatch.setattr(kubernetes_api, "steps", 7, raising=False)
    logged_at: dict[str, float] = {}
    answer = kubernetes_api.do_GET

    def do_get(handler: Any) -> None:
        kubernetes_api.clock += 30
        url = urlsplit(handler.path)
        lines = kubernetes_api.logs[leader]
        if url.path.endswith(f"/pytorchjobs/{NAME}"):
            lines.append(line := f"{stamp(len(lines) + 1)} step {len(lines) + 1}")
            logged_at[line] = kubernetes_api.clock
            if len(lines) == kubernetes_api.steps:
                kubernetes_api.jobs[NAME]["status"]["conditions"].append(condition("Succeeded", stamp(59)))
        elif url.path.endswith(f"/pods/{leader}/log"):
            query = {key: int(values[0]) for key, values in parse_qs(url.query).items() if key in LIMITS}
            since = kubernetes_api.clock - query.get("sinceSeconds", kubernetes_api.clock)
            text = "".join(f"{line}\n" for line in lines if logged_at.get(line, 0.0) >= since)
            handler.requests.append((handler.command, handler.path, "", b""))
            handler._send(200, text[: query.get("limitBytes")], "text/plain")
            return
        answer(handler)

    monkeypatch.setattr(kubernetes_api, "do_GET", do_get)
    monkeypatch.setattr("dtp.triggers.pytorchjob.time", SimpleNamespace(monotonic=lambda: kubernetes_api.clock))
    return kubernetes_api


def test_a_log_read_after_failed_ones_reads_all_that_was_logged_since_the_last_that_answered(
    kubelet: Any, first_event: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Worker 0's kubelet fails the four reads after the first, four polls (two minutes here) in which worker 0 logs on.
    failing(monkeypatch, "log_lines", [None, *[ApiException(500, "Internal Server Error")] * 4])
    event = wait_for_event(kubelet, trigger(), first_event)
    assert (event["status"], event["tail"]) == ("success", [f"step {n}" for n in range(1, 8)])


def test_the_first_log_read_takes_the_first_bytes_of_a_long_log_then_what_is_logged_from_then_on(
    kubelet: Any, first_event: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubelet.logs[f"{NAME}-worker-0"] = [f"{stamp(n)} step {n}" for n in range(1, 5)]  # before the trigger started
    kubelet.steps = 6
    first_bytes = len(f"{stamp(1)} step 1\n{stamp(2)} step 2\n{stamp(3)} st")
    monkeypatch.setattr("dtp.triggers.pytorchjob.MAX_FIRST_READ_BYTES", first_bytes)
    event = wait_for_event(kubelet, trigger(), first_event)
    # Step 3, cut short by the first read, and step 4 are left out; steps 5 and 6 were logged after that read.
    assert (event["status"], event["tail"]) == ("success", ["step 1", "step 2", "step 5", "step 6"])
    reads = [parse_qs(urlsplit(path).query) for _, path, *_ in kubelet.requests if path.split("?")[0].endswith("/log")]
    assert [(read.get("sinceSeconds"), read.get("limitBytes")) for read in reads] == [
        (None, [str(first_bytes)]),
        (["150"], None),  # the 90 s since the first read was sent, and LOG_WINDOW_MARGIN
    ]
