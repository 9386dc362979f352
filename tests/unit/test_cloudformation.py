"""cloudformation/network.yaml: valid CloudFormation (cfn-lint) with the exports the pipeline reads, and with
CreateNetwork=false (a platform that needs no network: EKS) a stack of the bucket alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cfnlint.api import ManualArgs, lint
from cfnlint.decode import decode_str

from dtp.naming import RunNames
from dtp.pipeline.network import PLATFORMS_WITHOUT_NETWORK
from dtp.templates import TEMPLATE_DIR

NETWORK = TEMPLATE_DIR / "cloudformation" / "network.yaml"
PLUGINS = Path(__file__).resolve().parents[2] / "plugins" / "dtp"
EXPORTS = [
    "VPC",
    "PublicSubnet",
    "PrivateSubnet",
    "FallbackPrivateSubnet",
    "SecurityGroup",
    "FSXSecurityGroup",
    "PlacementGroup",
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


def findings_of(text: str) -> list:
    matches = lint(text, config=ManualArgs(regions=["us-east-1"]))
    for match in matches:
        print(match)
    return list(matches)


def errors_of(text: str) -> list:
    return [m for m in findings_of(text) if m.rule.id.startswith("E")]


def test_network_template_passes_cfn_lint(text: str) -> None:
    assert errors_of(text) == []
    # Warnings too: W1001 is how cfn-lint reports a reference that CreateNetwork=false leaves dangling.
    assert findings_of(text) == []


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
    assert set(template["Parameters"]) == {
        "CreateNetwork",
        "VPCName",
        "SubnetsAZ",
        "FallbackSubnetAZ",
        "DataBucketName",
    }
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


def _unconditional(section: dict) -> set[str]:
    return {name for name, item in section.items() if "Condition" not in item}


def test_without_the_network_only_the_bucket_and_the_placement_group_are_created(template: dict) -> None:
    """CreateNetwork=false: no VPC, subnets, NAT gateway (billed hourly) or Elastic IP (VPCs and addresses: 5 per
    region by default); the bucket, the placement group (which belongs to no VPC: Batch's nodes in an existing VPC
    use it) and their exports stay."""
    parameter = template["Parameters"]["CreateNetwork"]
    assert parameter["AllowedValues"] == ["true", "false"] and parameter["Default"] == "true"
    assert template["Conditions"] == {"WithNetwork": {"Fn::Equals": [{"Ref": "CreateNetwork"}, "true"]}}
    unconditional = {"DataBucket", "PlacementGroup"}
    assert _unconditional(template["Resources"]) == unconditional
    assert _unconditional(template["Outputs"]) == unconditional
    conditioned = set(template["Resources"]) - unconditional
    assert {template["Resources"][name]["Condition"] for name in conditioned} == {"WithNetwork"}
    assert {template["Outputs"][name]["Condition"] for name in set(template["Outputs"]) - unconditional} == {
        "WithNetwork"
    }
    # The zones are looked up only for a network: a bucket-only stack is created without them.
    assert template["Parameters"]["SubnetsAZ"]["Default"] == template["Parameters"]["FallbackSubnetAZ"]["Default"] == ""


def test_cfn_lint_catches_an_unconditional_reference_to_the_network(text: str) -> None:
    """The bucket (created without the network) must not refer to what only the network creates: cfn-lint says
    so, which the check of the template above relies on."""
    broken = text.replace("Value: !Ref DataBucket", "Value: !Ref VPC", 1)
    assert broken != text
    assert "W1001" in {m.rule.id for m in findings_of(broken)}


def _outputs_read(path: Path) -> set[str]:
    return set(re.findall(r"""(?:network|outputs)(?:\[|\.get\()\s*["'](\w+)["']""", path.read_text()))


def test_a_bucket_only_stack_has_every_output_its_readers_read(template: dict) -> None:
    """The pipeline's steps (dtp.pipeline) and the platforms that need no network read only the outputs a
    bucket-only stack has (today DataBucket, in dtp.pipeline.data)."""
    readers = sorted(PLUGINS.glob("pipeline/*.py")) + [
        PLUGINS / "platforms" / f"{p}.py" for p in PLATFORMS_WITHOUT_NETWORK
    ]
    read = {path.name: keys for path in readers if (keys := _outputs_read(path))}
    assert read.get("data.py") == {"DataBucket"}
    assert set().union(*read.values()) <= _unconditional(template["Outputs"]), read
