"""The emulator's error injection, seen through botocore as AWS errors are: retried, or raised with their code."""

from __future__ import annotations

import json
import urllib.request

import botocore.exceptions
import pytest

from dtp.local.emulator import FAULTS_PATH

pytestmark = pytest.mark.stack


def _hits(stack) -> dict[tuple[str, str | None], int]:
    with urllib.request.urlopen(stack.moto_url + FAULTS_PATH, timeout=10) as resp:
        return {(r["service"], r["action"]): r["hits"] for r in json.loads(resp.read())["rules"]}


def test_throttling_is_retried_by_botocore_and_counted(stack, aws, set_rules) -> None:
    set_rules(
        [
            {"service": "cloudformation", "action": "ListStacks", "code": "Throttling", "status": 400, "times": 2},
            {"service": "s3", "code": "SlowDown", "status": 503, "times": 1},
            {
                "service": "ssm",
                "action": "DescribeParameters",
                "code": "InternalServerError",
                "status": 500,
                "times": 1,
            },
        ]
    )
    assert isinstance(aws("cloudformation").list_stacks()["StackSummaries"], list)
    assert isinstance(aws("s3").list_buckets()["Buckets"], list)
    assert isinstance(aws("ssm").describe_parameters()["Parameters"], list)
    assert _hits(stack) == {("cloudformation", "ListStacks"): 2, ("s3", None): 1, ("ssm", "DescribeParameters"): 1}


def test_a_refusal_raises_with_its_code_in_each_protocol(stack, aws, set_rules) -> None:
    set_rules(
        [
            {"service": "ec2", "action": "DescribeVpcs", "code": "UnauthorizedOperation", "status": 403},
            {"service": "cloudformation", "action": "CreateStack", "code": "AccessDenied", "status": 403},
            {"service": "ssm", "action": "GetParameter", "code": "AccessDeniedException", "status": 400},
        ]
    )
    calls = {
        "UnauthorizedOperation": lambda: aws("ec2").describe_vpcs(),
        "AccessDenied": lambda: aws("cloudformation").create_stack(StackName="refused", TemplateBody="{}"),
        "AccessDeniedException": lambda: aws("ssm").get_parameter(Name="/dtp/x"),
    }
    for code, call in calls.items():
        with pytest.raises(botocore.exceptions.ClientError) as err:
            call()
        assert err.value.response["Error"]["Code"] == code
    # Calls no rule names still reach moto.
    assert isinstance(aws("ec2").describe_subnets()["Subnets"], list)
    assert "refused" not in [s["StackName"] for s in aws("cloudformation").list_stacks()["StackSummaries"]]


@pytest.mark.parametrize(
    ("service", "operation", "kwargs"),
    [
        (
            "fsx",
            "create_data_repository_association",
            {"FileSystemId": "fs-0123456789abcdef0", "FileSystemPath": "/d", "DataRepositoryPath": "s3://b/d"},
        ),
        ("ssm", "list_command_invocations", {}),
        ("ec2", "create_placement_group", {"GroupName": "g", "Strategy": "cluster"}),
    ],
)
def test_an_api_moto_lacks_says_so_once_without_retries(stack, aws, service, operation, kwargs) -> None:
    """moto's NotImplementedError becomes a 501 NotImplemented naming the call, in the service's protocol."""
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        getattr(aws(service), operation)(**kwargs)
    response = raised.value.response
    assert response["Error"]["Code"] == "NotImplemented"
    assert response["Error"]["Message"].startswith("not supported on the local profile: the local AWS emulator (moto ")
    assert operation in response["Error"]["Message"]
    assert (response["ResponseMetadata"]["HTTPStatusCode"], response["ResponseMetadata"]["RetryAttempts"]) == (501, 0)
    # The emulator still serves the next call.
    assert "Buckets" in aws("s3").list_buckets()
