"""DeadlineTrigger.poll in the triggers built on it: a poll that fails transiently (AWS throttling or failing on its
side, a connection that cannot be made, a pcluster that does not answer or that AWS throttled) is tried again and
the wait goes on; a permanent error, or transient ones past the bound, fail it. The hooks are stand-ins answering
from a script."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from dtp.platforms import batch as batch_platform
from dtp.platforms import parallelcluster as pc
from dtp.platforms.pcluster_cli import PclusterError
from dtp.triggers import fsx as fsx_triggers
from dtp.triggers import hyperpod as hyperpod_triggers
from dtp.triggers.batch import BatchJobQueueTrigger
from dtp.triggers.deadline import is_transient
from dtp.triggers.fsx import FsxDataRepositoryTaskTrigger
from dtp.triggers.hyperpod import HyperPodClusterTrigger
from dtp.triggers.parallelcluster import ParallelClusterCreateTrigger


def client_error(code: str, status: int = 400) -> ClientError:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "Describe")


THROTTLED = client_error("ThrottlingException")
# pcluster's answers (exit status 1) when AWS throttled a call it made: a code it maps to its LimitExceededException,
# whose message is AWS's, and one it does not (CloudFormation's Throttling, left to its InternalServiceException).
PCLUSTER_THROTTLED = PclusterError("describe-cluster", 1, {"message": "Rate exceeded"})
PCLUSTER_THROTTLED_UNMAPPED = PclusterError(
    "describe-cluster", 1, {"message": "Failed when calling AWS service in describe_stack: Throttling: Rate exceeded"}
)
PCLUSTER_REFUSED = PclusterError("create-cluster", 1, {"message": "Bad Request: subnet-0 does not exist"})
UNAVAILABLE = client_error("ServiceUnavailable", 503)
ACCESS_DENIED = client_error("AccessDeniedException", 403)


class Script:
    """A call that raises the next of ``answers`` that is an exception, else returns it; it counts its calls."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


class FakeHook:
    """Any hook: each method named in ``calls`` is that script."""

    def __init__(self, **calls: Callable[..., Any]) -> None:
        self.__dict__.update(calls)


def fsx_trigger(monkeypatch: pytest.MonkeyPatch, describe: Script) -> FsxDataRepositoryTaskTrigger:
    monkeypatch.setattr(fsx_triggers, "FsxHook", lambda **_: FakeHook(get_data_repository_task=describe))
    return FsxDataRepositoryTaskTrigger("task-1", poll_interval=0)


def test_a_poll_failing_transiently_twice_then_answering_ends_in_the_success_event(
    monkeypatch: pytest.MonkeyPatch, first_event: Any
) -> None:
    describe = Script(THROTTLED, UNAVAILABLE, {"TaskId": "task-1", "Lifecycle": "SUCCEEDED"})
    event = first_event(fsx_trigger(monkeypatch, describe))
    assert (event["status"], event["lifecycle"]) == ("success", "SUCCEEDED")
    assert describe.calls == 3


def test_a_permanent_error_fails_the_wait_at_once(monkeypatch: pytest.MonkeyPatch, first_event: Any) -> None:
    describe = Script(ACCESS_DENIED, {"ClusterStatus": "InService"})
    monkeypatch.setattr(hyperpod_triggers, "HyperPodHook", lambda **_: FakeHook(describe_cluster=describe))
    with pytest.raises(ClientError, match="AccessDeniedException"):
        first_event(HyperPodClusterTrigger("c", poll_interval=0))
    assert describe.calls == 1


def test_transient_errors_past_the_bound_fail_the_wait(monkeypatch: pytest.MonkeyPatch, first_event: Any) -> None:
    describe = Script(*[EndpointConnectionError(endpoint_url="https://fsx")] * 3, {"Lifecycle": "SUCCEEDED"})
    trigger = fsx_trigger(monkeypatch, describe)
    trigger.max_transient_failures = 2
    with pytest.raises(EndpointConnectionError):
        first_event(trigger)
    assert describe.calls == 3


def test_a_pcluster_that_does_not_answer_in_time_is_asked_again(
    monkeypatch: pytest.MonkeyPatch, first_event: Any
) -> None:
    ready = {"clusterStatus": "CREATE_COMPLETE", "headNode": {"privateIpAddress": "10.0.0.7"}}
    describe = Script(subprocess.TimeoutExpired(["pcluster", "describe-cluster"], 120), ready)

    class Platform:
        cli = FakeHook(describe_cluster=describe)

    monkeypatch.setattr(pc, "ParallelClusterPlatform", Platform)
    event = first_event(ParallelClusterCreateTrigger("c", poll_interval=0))
    assert (event["status"], event["cluster"]) == ("success", {"head_node": "10.0.0.7"})


def test_a_pcluster_that_aws_throttled_is_asked_again_and_one_that_refused_is_not(
    monkeypatch: pytest.MonkeyPatch, first_event: Any
) -> None:
    ready = {"clusterStatus": "CREATE_COMPLETE", "headNode": {"privateIpAddress": "10.0.0.7"}}
    describe = Script(PCLUSTER_THROTTLED, PCLUSTER_THROTTLED_UNMAPPED, ready, PCLUSTER_REFUSED, ready)

    class Platform:
        cli = FakeHook(describe_cluster=describe)

    monkeypatch.setattr(pc, "ParallelClusterPlatform", Platform)
    event = first_event(ParallelClusterCreateTrigger("c", poll_interval=0))
    assert (event["status"], event["cluster"]) == ("success", {"head_node": "10.0.0.7"})
    assert describe.calls == 3
    with pytest.raises(PclusterError, match="subnet-0 does not exist"):
        first_event(ParallelClusterCreateTrigger("c", poll_interval=0))
    assert describe.calls == 4


def test_a_batch_poll_that_times_out_reading_is_tried_again(monkeypatch: pytest.MonkeyPatch, first_event: Any) -> None:
    valid = [{"status": "VALID"}]
    describe = Script(ReadTimeoutError(endpoint_url="https://batch"), valid, valid)

    class Platform:
        def __init__(self, aws_conn_id: str) -> None:
            self.client = object()

    monkeypatch.setattr(batch_platform, "BatchPlatform", Platform)
    monkeypatch.setattr(batch_platform, "describe", describe)
    event = first_event(BatchJobQueueTrigger("ce", "jq", poll_interval=0))
    assert event["status"] == "success" and "provision_again" not in event
    assert describe.calls == 3


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (THROTTLED, True),
        (client_error("RequestLimitExceeded"), True),
        (client_error("SomeNewServerFault", 500), True),
        (ACCESS_DENIED, False),
        (client_error("ResourceNotFound"), False),
        (EndpointConnectionError(endpoint_url="https://x"), True),
        (subprocess.TimeoutExpired(["pcluster"], 120), True),
        (PCLUSTER_THROTTLED, True),
        (PCLUSTER_THROTTLED_UNMAPPED, True),
        (PclusterError("describe-cluster", 1, {"message": "Request limit exceeded."}), True),
        (PclusterError("describe-cluster", 1, {"message": "An error occurred (TooManyRequestsException)"}), True),
        (PCLUSTER_REFUSED, False),
        # A quota reached stays reached.
        (PclusterError("create-cluster", 1, {"message": "Limit on the number of stacks exceeded"}), False),
        (ValueError("bad answer"), False),
    ],
)
def test_what_is_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient
