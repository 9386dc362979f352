"""StackHook and StackCreatedSensor on stacks that failed, rolled back or are being deleted.

The local emulator (moto) cannot play these: a resource that fails makes its CreateStack call fail and leaves the
stack CREATE_IN_PROGRESS for good, with no failure events; it ignores OnFailure, never rolls back, and deletes
synchronously (no DELETE_IN_PROGRESS). So botocore's Stubber answers as CloudFormation does: every request is
validated against the real service model, every canned response against its output shapes. The answers follow
what CloudFormation reports for a create that failed on an Elastic IP quota. What the emulator can play (a stack
deleted outright, a half-created one) is in tests/integration/test_network_stack.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException
from botocore.stub import ANY, Stubber

from dtp.hooks.stacks import StackFailed, StackHook
from dtp.naming import aws_tags
from dtp.sensors.stacks import StackCreatedSensor

NAME = "dtp-train-e2e-0123456789-network"
STACK_ID = f"arn:aws:cloudformation:us-east-1:123456789012:stack/{NAME}/11111111-2222-3333-4444-555555555555"
OLD_ID = f"arn:aws:cloudformation:us-east-1:123456789012:stack/{NAME}/00000000-2222-3333-4444-555555555555"
CREATED = datetime(2026, 12, 5, tzinfo=UTC)
TAGS = {"dtp:run": "dtp-train-e2e-0123456789"}
QUOTA = "The maximum number of addresses has been reached. (Service: Ec2, Status Code: 400, Request ID: 1a2b)"
ROLLED_BACK_REASON = "The following resource(s) failed to create: [ElasticIP]. Rollback requested by user."
MISSING = ("ValidationError", f"Stack with id {NAME} does not exist")


@pytest.fixture
def hook(offline_aws: None) -> StackHook:
    return StackHook(aws_conn_id=None, region_name="us-east-1")


def _stack(status: str, stack_id: str = STACK_ID, reason: str | None = None) -> dict:
    stack = {"StackId": stack_id, "StackName": NAME, "CreationTime": CREATED, "StackStatus": status}
    return {"Stacks": [{**stack, "StackStatusReason": reason} if reason else stack]}


def _event(n: int, logical_id: str, status: str, reason: str = "", stack_id: str = STACK_ID) -> dict:
    return {
        "StackId": stack_id,
        "EventId": f"event-{n}",
        "StackName": NAME,
        "LogicalResourceId": logical_id,
        "ResourceType": "AWS::CloudFormation::Stack" if logical_id == NAME else "AWS::EC2::Subnet",
        "Timestamp": CREATED + timedelta(seconds=n),
        "ResourceStatus": status,
        **({"ResourceStatusReason": reason} if reason else {}),
    }


def _rollback_events(stack_id: str = STACK_ID) -> dict:
    """A create that failed on the Elastic IP: newest first, as DescribeStackEvents returns them, with more
    cancelled resources after the cause than the five reasons a message carries."""
    cancelled = ["NATGateway", "PrivateSubnet", "PublicSubnet", "FallbackPrivateSubnet", "SecurityGroup", "DataBucket"]
    events = [
        _event(0, NAME, "CREATE_IN_PROGRESS", "User Initiated", stack_id),
        _event(1, "ElasticIP", "CREATE_IN_PROGRESS", "", stack_id),
        _event(2, "ElasticIP", "CREATE_FAILED", QUOTA, stack_id),
        *(_event(3 + i, r, "CREATE_FAILED", "Resource creation cancelled", stack_id) for i, r in enumerate(cancelled)),
        _event(10, NAME, "ROLLBACK_IN_PROGRESS", ROLLED_BACK_REASON, stack_id),
        _event(11, NAME, "ROLLBACK_COMPLETE", "", stack_id),
    ]
    return {"StackEvents": list(reversed(events))}


def _expect_create(stub: Stubber) -> None:
    stub.add_response(
        "create_stack",
        {"StackId": STACK_ID},
        {
            "StackName": NAME,
            "TemplateBody": "template",
            "Parameters": [{"ParameterKey": "VPCName", "ParameterValue": "v"}],
            "Tags": aws_tags(TAGS),
            "Capabilities": ["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"],
            "OnFailure": "ROLLBACK",
        },
    )
    stub.add_response("describe_stacks", _stack("CREATE_IN_PROGRESS"), {"StackName": NAME})


def _ensure(hook: StackHook) -> dict:
    return hook.ensure_stack(NAME, "template", {"VPCName": "v"}, TAGS, poll=0)


def test_a_new_stack_is_created_to_roll_back_on_failure(hook: StackHook, stub: Stubber) -> None:
    """Not OnFailure=DELETE: a stack deleted on failure takes its events (the reasons) with it."""
    stub.add_client_error("describe_stacks", *MISSING, expected_params={"StackName": NAME})
    _expect_create(stub)
    assert _ensure(hook)["StackStatus"] == "CREATE_IN_PROGRESS"


def test_a_rolled_back_stack_is_deleted_then_created_again(hook: StackHook, stub: Stubber) -> None:
    stub.add_response("describe_stacks", _stack("ROLLBACK_COMPLETE", reason=ROLLED_BACK_REASON), {"StackName": NAME})
    stub.add_response("describe_stack_events", _rollback_events(), {"StackName": NAME})  # logged
    stub.add_response("describe_stacks", _stack("ROLLBACK_COMPLETE"), {"StackName": NAME})
    stub.add_response("delete_stack", {}, {"StackName": STACK_ID})
    stub.add_response("describe_stacks", _stack("DELETE_IN_PROGRESS"), {"StackName": STACK_ID})
    stub.add_response("describe_stacks", _stack("DELETE_COMPLETE"), {"StackName": STACK_ID})
    _expect_create(stub)
    assert _ensure(hook)["StackStatus"] == "CREATE_IN_PROGRESS"


def test_a_retry_waits_for_a_stack_being_deleted_before_creating_it(hook: StackHook, stub: Stubber) -> None:
    """A create while the old stack is DELETE_IN_PROGRESS would fail with AlreadyExistsException."""
    stub.add_response("describe_stacks", _stack("DELETE_IN_PROGRESS"), {"StackName": NAME})
    stub.add_response("describe_stacks", _stack("DELETE_IN_PROGRESS"), {"StackName": STACK_ID})
    stub.add_response("describe_stacks", _stack("DELETE_COMPLETE"), {"StackName": STACK_ID})
    stub.add_client_error("describe_stacks", *MISSING, expected_params={"StackName": NAME})
    _expect_create(stub)
    assert _ensure(hook)["StackStatus"] == "CREATE_IN_PROGRESS"


def test_a_retry_waits_for_a_rollback_then_replaces_the_stack(hook: StackHook, stub: Stubber) -> None:
    stub.add_response("describe_stacks", _stack("ROLLBACK_IN_PROGRESS"), {"StackName": NAME})
    stub.add_response("describe_stacks", _stack("ROLLBACK_IN_PROGRESS"), {"StackName": STACK_ID})
    stub.add_response("describe_stacks", _stack("ROLLBACK_COMPLETE"), {"StackName": STACK_ID})
    stub.add_response("describe_stacks", _stack("ROLLBACK_COMPLETE"), {"StackName": NAME})
    stub.add_response("describe_stack_events", _rollback_events(), {"StackName": NAME})
    stub.add_response("describe_stacks", _stack("ROLLBACK_COMPLETE"), {"StackName": NAME})
    stub.add_response("delete_stack", {}, {"StackName": STACK_ID})
    stub.add_response("describe_stacks", _stack("DELETE_COMPLETE"), {"StackName": STACK_ID})
    _expect_create(stub)
    assert _ensure(hook)["StackStatus"] == "CREATE_IN_PROGRESS"


def test_a_failed_stack_that_cannot_be_deleted_is_reported_not_created_over(hook: StackHook, stub: Stubber) -> None:
    stub.add_response("describe_stacks", _stack("ROLLBACK_FAILED"), {"StackName": NAME})
    stub.add_response("describe_stack_events", _rollback_events(), {"StackName": NAME})
    stub.add_response("describe_stacks", _stack("ROLLBACK_FAILED"), {"StackName": NAME})
    stub.add_response("delete_stack", {}, {"StackName": STACK_ID})
    stub.add_response("describe_stacks", _stack("DELETE_FAILED"), {"StackName": STACK_ID})
    stub.add_response("describe_stack_events", _rollback_events(), {"StackName": NAME})
    with pytest.raises(StackFailed, match=r"ROLLBACK_FAILED and could not be deleted: ElasticIP: The maximum number"):
        _ensure(hook)


def test_a_stack_rolling_back_is_deleted_once_the_rollback_ended(hook: StackHook, stub: Stubber) -> None:
    """Teardown right after the sensor failed meets the stack still rolling back."""
    stub.add_response("describe_stacks", _stack("ROLLBACK_IN_PROGRESS"), {"StackName": NAME})
    stub.add_response("describe_stacks", _stack("ROLLBACK_COMPLETE"), {"StackName": STACK_ID})
    stub.add_response("delete_stack", {}, {"StackName": STACK_ID})
    stub.add_client_error("describe_stacks", *MISSING, expected_params={"StackName": STACK_ID})
    assert hook.delete_and_wait(NAME, poll=0) == "DELETE_COMPLETE"


@pytest.fixture
def sensor(hook: StackHook) -> StackCreatedSensor:
    """The training pipeline's wait_for_stack task, its hook answered by the Stubber."""
    from dtp.pipeline.graph import training_pipeline

    with DAG("stack_sensor_test", schedule=None) as dag:
        training_pipeline(dag)
    task = dag.get_task("deploy_network.wait_for_stack")
    assert isinstance(task, StackCreatedSensor)
    task.stack_name = NAME  # an XComArg in the DAG, rendered at run time
    task.hook = hook
    return task


def test_the_sensor_fails_at_once_with_the_cause_of_a_rollback(sensor, stub: Stubber) -> None:
    """The provider's sensor says 'Stack ... in bad state: ROLLBACK_IN_PROGRESS' and nothing of the cause; this
    one gives the failed resource's own reason (the oldest failure), not only 'Resource creation cancelled'."""
    stub.add_response("describe_stacks", _stack("ROLLBACK_IN_PROGRESS", reason=ROLLED_BACK_REASON), {"StackName": NAME})
    stub.add_response("describe_stack_events", _rollback_events(), {"StackName": NAME})
    with pytest.raises(AirflowFailException) as failed:
        sensor.poke({})
    message = str(failed.value)
    assert message.startswith(f"stack {NAME} is ROLLBACK_IN_PROGRESS ({ROLLED_BACK_REASON}): ElasticIP: {QUOTA};")
    assert message.count("Resource creation cancelled") == 4


def test_the_sensor_fails_at_once_on_a_stack_deleted_on_failure(sensor, stub: Stubber) -> None:
    """A stack gone (OnFailure=DELETE, or deleted by hand) is no stack still being created: the provider's sensor
    pokes it until its timeout. The reasons are read from the newest deleted stack of that name."""
    stub.add_client_error("describe_stacks", *MISSING, expected_params={"StackName": NAME})
    stub.add_client_error("describe_stack_events", *MISSING, expected_params={"StackName": NAME})
    summary = {"StackName": NAME, "StackStatus": "DELETE_COMPLETE"}
    stub.add_response(
        "list_stacks",
        {
            "StackSummaries": [
                {**summary, "StackId": STACK_ID, "CreationTime": CREATED},
                {**summary, "StackId": OLD_ID, "CreationTime": CREATED - timedelta(days=1)},
                {**summary, "StackName": "other", "StackId": OLD_ID, "CreationTime": CREATED + timedelta(days=1)},
            ]
        },
        {"StackStatusFilter": ["DELETE_COMPLETE"]},
    )
    stub.add_response("describe_stack_events", _rollback_events(), {"StackName": STACK_ID})
    with pytest.raises(AirflowFailException, match=rf"stack {NAME} does not exist \(deleted\?\): ElasticIP: The max"):
        sensor.poke({})


@pytest.mark.parametrize(("status", "done"), [("CREATE_IN_PROGRESS", False), ("CREATE_COMPLETE", True)])
def test_the_sensor_waits_for_a_stack_being_created(sensor, stub: Stubber, status: str, done: bool) -> None:
    stub.add_response("describe_stacks", _stack(status), {"StackName": ANY})
    assert sensor.poke({}) is done
