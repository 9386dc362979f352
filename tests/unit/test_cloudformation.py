"""cloudformation/network.yaml: valid CloudFormation (cfn-lint) with the exports the pipeline reads."""

from __future__ import annotations

import re

import pytest
from cfnlint.api import ManualArgs, lint
from cfnlint.decode import decode_str

from dtp.naming import RunNames
from dtp.templates import TEMPLATE_DIR

NETWORK = TEMPLATE_DIR / "cloudformation" / "network.yaml"
EXPORTS = [
    "VPC",
    "PublicSubnet",
    "PrivateSubnet",
    "FallbackPrivateSubnet",
    "SecurityGroup",
    "FSXSecurityGroup",
    "DataBucket",
]


@pytest.fixture(scope="module")
def text() -> str:
    return NETWORK.read_text()


@pytest.fixture(scope="module")
def template(text: str) -> dict:
    decoded, errors = decode_str(text)
    assert errors == []
    return decoded


def errors_of(text: str) -> list:
    matches = lint(text, config=ManualArgs(regions=["us-east-1"]))
    for match in matches:
        print(match)
    return [m for m in matches if m.rule.id.startswith("E")]


def test_network_template_passes_cfn_lint(text: str) -> None:
    assert errors_of(text) == []


def test_cfn_lint_catches_a_broken_template(text: str) -> None:
    # The check above can fail: the same template with a dangling reference is an error.
    broken = text.replace("VpcId: !Ref VPC", "VpcId: !Ref NoSuchVPC", 1)
    assert broken != text
    assert errors_of(broken)


def test_network_template_is_plain_cloudformation(text: str) -> None:
    assert "{{" not in text and "{%" not in text


def test_exports(template: dict) -> None:
    outputs = template["Outputs"]
    assert list(outputs) == EXPORTS
    for name in EXPORTS:
        assert outputs[name]["Value"] == {"Ref": name}
        assert outputs[name]["Export"]["Name"] == {"Fn::Sub": f"${{AWS::StackName}}-{name}"}
        assert name in template["Resources"]


def test_parameters_and_bucket(template: dict) -> None:
    assert set(template["Parameters"]) == {"VPCName", "SubnetsAZ", "FallbackSubnetAZ", "DataBucketName"}
    bucket = template["Resources"]["DataBucket"]
    assert bucket["Type"] == "AWS::S3::Bucket"
    assert bucket["Properties"]["BucketName"] == {"Ref": "DataBucketName"}
    assert all(bucket["Properties"]["PublicAccessBlockConfiguration"].values())


def test_run_bucket_names_satisfy_the_template_pattern(template: dict) -> None:
    pattern = re.compile(template["Parameters"]["DataBucketName"]["AllowedPattern"])
    for run_id in ("manual__2026-01-01T00:00:00+00:00", "x; rm -rf /", "ü" * 300):
        assert pattern.fullmatch(RunNames("train_e2e", run_id).data_bucket)


def test_the_elastic_ip_carries_the_runs_tag(template: dict) -> None:
    """A sweep finds an address that outlived its NAT gateway by the dtp:run tag; VPCName is the run's key
    (dtp.pipeline.network passes it), stack tags alone do not reach an address on every implementation."""
    eip = template["Resources"]["ElasticIP"]
    assert eip["Type"] == "AWS::EC2::EIP"
    assert {"Key": "dtp:run", "Value": {"Ref": "VPCName"}} in eip["Properties"]["Tags"]
