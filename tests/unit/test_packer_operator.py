"""PackerBuildOperator finding the AMI an earlier try made, in each state, in moto's EC2 (run in this process:
the emulator of the local stack makes every AMI available at once, so only here can an AMI be pending or failed).

The packer it is given records its arguments in ``calls`` and fails, so any attempt to bake shows and raises.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException
from botocore.exceptions import ClientError, WaiterError
from botocore.stub import Stubber
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

from dtp.hooks.packer import PackerError, fingerprint
from dtp.images.ami import BUILDER_TAG
from dtp.naming import EXPIRES_TAG, expiry, parse_expiry
from dtp.operators.packer import PackerBuildOperator

REGION = "us-east-1"


@pytest.fixture
def ec2(moto_aws: Callable[[str], Any]) -> Any:
    return moto_aws("ec2")


@pytest.fixture
def template(tmp_path: Path) -> Path:
    path = tmp_path / "ami" / "ami.pkr.hcl"
    path.parent.mkdir()
    path.write_text('source "amazon-ebs" "aws" {}\n')
    return path


@pytest.fixture
def operator(tmp_path: Path, template: Path) -> PackerBuildOperator:
    packer = tmp_path / "bin" / "packer"
    packer.parent.mkdir()
    packer.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\necho "this packer cannot bake" >&2\nexit 1\n')
    packer.chmod(0o755)
    return PackerBuildOperator(
        task_id="bake",
        template=str(template),
        name_prefix="dtp-test",
        tags={"dtp:run": "r1"},
        packer_path=str(packer),
        waiter_delay=1,
        waiter_max_attempts=10,
    )


@pytest.fixture
def earlier_ami(ec2: Any, template: Path) -> dict[str, str]:
    """The AMI an earlier try registered under the name this operator gives its inputs, and its snapshot."""
    name = f"dtp-test-{fingerprint([template, template.parent], {})}"
    image_id = ec2.register_image(Name=name)["ImageId"]
    image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    return {"name": name, "id": image_id, "snapshot": image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]}


def set_state(image_id: str, state: str) -> None:
    ec2_backends[DEFAULT_ACCOUNT_ID][REGION].amis[image_id].state = state


def later(seconds: float, image_id: str, state: str) -> threading.Timer:
    """Move the AMI to ``state`` after ``seconds``, as EC2 would while the operator waits."""
    timer = threading.Timer(seconds, set_state, (image_id, state))
    timer.start()
    return timer


def test_an_available_ami_is_returned_and_tagged_without_baking(ec2, operator, earlier_ami, tmp_path) -> None:
    result = operator.execute({})
    assert (result["ami_id"], result["ami_name"], result["built"]) == (earlier_ami["id"], earlier_ami["name"], False)
    image = ec2.describe_images(ImageIds=[earlier_ami["id"]])["Images"][0]
    assert {"Key": "dtp:run", "Value": "r1"} in image["Tags"]
    assert not (tmp_path / "calls").exists()


@pytest.mark.parametrize("state", ["pending", "transient"])
def test_a_pending_ami_is_waited_for_and_returned_without_baking(ec2, operator, earlier_ami, tmp_path, state) -> None:
    set_state(earlier_ami["id"], state)
    available = threading.Event()

    def become_available() -> None:
        set_state(earlier_ami["id"], "available")
        available.set()

    timer = threading.Timer(1.0, become_available)
    timer.start()
    try:
        result = operator.execute({})
        returned_once_available = available.is_set()  # read before cancel(): the AMI flipped before execute returned
    finally:
        timer.cancel()
    assert returned_once_available, "the operator returned before the AMI became available"
    assert (result["ami_id"], result["built"]) == (earlier_ami["id"], False)
    assert ec2.describe_images(ImageIds=[earlier_ami["id"]])["Images"][0]["State"] == "available"
    assert not (tmp_path / "calls").exists()


def test_an_ami_still_pending_when_the_wait_runs_out_fails_the_task_and_is_kept(
    ec2, operator, earlier_ami, tmp_path
) -> None:
    set_state(earlier_ami["id"], "pending")
    operator.waiter_max_attempts = 2
    with pytest.raises(WaiterError, match="Max attempts exceeded"):
        operator.execute({})
    assert ec2.describe_images(ImageIds=[earlier_ami["id"]])["Images"][0]["State"] == "pending"
    assert not (tmp_path / "calls").exists()


@pytest.mark.parametrize("state", ["pending", "transient"])
def test_a_pending_ami_deregistered_while_waited_for_is_baked_again(
    ec2, operator, earlier_ami, tmp_path, state
) -> None:
    # The killed try's packer cleans up the AMI it was making: the wait ends there, and the AMI is baked again.
    set_state(earlier_ami["id"], state)
    operator.waiter_max_attempts = 60
    timer = threading.Timer(1.0, ec2.deregister_image, kwargs={"ImageId": earlier_ami["id"]})
    timer.start()
    try:
        with pytest.raises(PackerError, match=r"packer validate ami\.pkr\.hcl failed:\nthis packer cannot bake"):
            operator.execute({})
    finally:
        timer.cancel()
    assert (tmp_path / "calls").read_text().startswith("validate ")


def test_waiting_for_a_gone_ami_returns_none_at_once(ec2, operator, earlier_ami) -> None:
    hook = operator.ami_hook
    ec2.deregister_image(ImageId=earlier_ami["id"])
    with Stubber(hook.conn) as stub:
        # One check: a gone AMI is not polled until the attempts run out. EC2 lists a deregistered AMI for a while
        # (moto not at all), then answers InvalidAMIID.NotFound.
        stub.add_response("describe_images", {"Images": [{"ImageId": earlier_ami["id"], "State": "deregistered"}]})
        stub.add_response("describe_images", {"Images": [{"ImageId": earlier_ami["id"], "State": "deregistered"}]})
        assert hook.wait_available(earlier_ami["id"], delay=1, max_attempts=100) is None
        stub.add_client_error("describe_images", "InvalidAMIID.NotFound")
        stub.add_client_error("describe_images", "InvalidAMIID.NotFound")
        assert hook.wait_available(earlier_ami["id"], delay=1, max_attempts=100) is None
        stub.assert_no_pending_responses()
    assert hook.wait_available(earlier_ami["id"], delay=1, max_attempts=100) is None


def _expiry_tag(ec2: Any, image_id: str) -> str:
    tags = ec2.describe_images(ImageIds=[image_id])["Images"][0]["Tags"]
    return {t["Key"]: t["Value"] for t in tags}[EXPIRES_TAG]


def test_a_reused_ami_keeps_its_later_expiry(ec2, operator, earlier_ami) -> None:
    # Baked by hand with retain_days=3650, reused by the weekly run (90 days): it stays kept for ten years.
    long_kept = expiry(3650 * 24)
    ec2.create_tags(Resources=[earlier_ami["id"]], Tags=[{"Key": EXPIRES_TAG, "Value": long_kept}])
    operator.tags = {"dtp:run": "weekly", EXPIRES_TAG: expiry(90 * 24)}
    result = operator.execute({})
    assert result["built"] is False
    assert _expiry_tag(ec2, earlier_ami["id"]) == long_kept
    snapshot = ec2.describe_snapshots(SnapshotIds=[earlier_ami["snapshot"]])["Snapshots"][0]
    assert {"Key": "dtp:run", "Value": "weekly"} in snapshot["Tags"]
    assert {"Key": EXPIRES_TAG, "Value": long_kept} in snapshot["Tags"]


@pytest.mark.parametrize("earlier", [expiry(24), "whenever"], ids=["sooner", "not-an-expiry"])
def test_a_reused_ami_takes_this_runs_later_expiry(ec2, operator, earlier_ami, earlier) -> None:
    ec2.create_tags(Resources=[earlier_ami["id"]], Tags=[{"Key": EXPIRES_TAG, "Value": earlier}])
    later = expiry(90 * 24)
    operator.tags = {"dtp:run": "r2", EXPIRES_TAG: later}
    operator.execute({})
    assert _expiry_tag(ec2, earlier_ami["id"]) == later


def test_disabled_amis_are_asked_for(ec2, operator, earlier_ami) -> None:
    # EC2 leaves disabled AMIs out of DescribeImages unless asked (moto lists them anyway: the request is checked).
    hook = operator.ami_hook
    with Stubber(hook.conn) as stub:
        name_filter = [{"Name": "name", "Values": [earlier_ami["name"]]}]
        expected = {"Owners": ["self"], "Filters": name_filter, "IncludeDisabled": True}
        stub.add_response("describe_images", {"Images": []}, expected)
        assert hook.find_image(earlier_ami["name"]) is None


def test_a_disabled_ami_fails_the_task_without_baking_and_is_kept(ec2, operator, earlier_ami, tmp_path) -> None:
    ec2.disable_image(ImageId=earlier_ami["id"])
    with pytest.raises(AirflowFailException, match=rf"is disabled: .*enable-image --image-id {earlier_ami['id']}"):
        operator.execute({})
    assert ec2.describe_images(ImageIds=[earlier_ami["id"]])["Images"][0]["State"] == "disabled"
    assert not (tmp_path / "calls").exists()


@pytest.mark.parametrize(
    ("state", "then"),
    [("failed", None), ("error", None), ("invalid", None), ("pending", "failed")],
    ids=["failed", "error", "invalid", "pending-then-failed"],
)
def test_a_failed_ami_is_deregistered_with_its_snapshot_and_baked_again(
    ec2, operator, earlier_ami, tmp_path, state, then
) -> None:
    set_state(earlier_ami["id"], state)
    timer = later(1.0, earlier_ami["id"], then) if then else None
    try:
        with pytest.raises(PackerError, match=r"packer validate ami\.pkr\.hcl failed:\nthis packer cannot bake"):
            operator.execute({})
    finally:
        if timer:
            timer.cancel()
    name_filter = [{"Name": "name", "Values": [earlier_ami["name"]]}]
    assert ec2.describe_images(Owners=["self"], Filters=name_filter)["Images"] == []
    with pytest.raises(ClientError, match=r"InvalidSnapshot\.NotFound"):
        ec2.describe_snapshots(SnapshotIds=[earlier_ami["snapshot"]])
    assert (tmp_path / "calls").read_text().startswith("validate ")


def test_the_builders_expiry_counts_from_when_its_bake_starts(ec2, operator, tmp_path) -> None:
    # The run's tags were made when it began: a bake cleared 13 hours later must not start already expired, or
    # the hourly reaper would terminate its builder mid-bake.
    began = {"dtp:run": "r1", EXPIRES_TAG: expiry(12, datetime.now(UTC) - timedelta(hours=13)), BUILDER_TAG: "true"}
    operator.builder_tags, operator.builder_expiry_hours = began, 12
    with pytest.raises(PackerError):
        operator.execute({})
    tags = json.loads(re.search(r"builder_tags=(\{.*?\})", (tmp_path / "calls").read_text())[1])
    assert tags["dtp:run"] == "r1" and tags[BUILDER_TAG] == "true"
    assert parse_expiry(tags[EXPIRES_TAG]) > datetime.now(UTC) + timedelta(hours=11)


def test_the_amis_tags_go_to_packer_through_the_tags_variable(ec2, operator, tmp_path) -> None:
    operator.tags_variable = "image_tags"
    with pytest.raises(PackerError):
        operator.execute({})
    assert json.loads(re.search(r"image_tags=(\{.*?\})", (tmp_path / "calls").read_text())[1]) == {"dtp:run": "r1"}


def _baked_name(tmp_path: Path) -> str:
    """The AMI name of the last bake packer was asked for."""
    return re.findall(r"ami_name=(\S+)", (tmp_path / "calls").read_text())[-1]


def test_a_newer_source_ami_gives_a_new_ami_name_and_a_bake(ec2, operator, tmp_path) -> None:
    # The weekly bake exists to pick up source AMIs with security fixes: the same files and versions on a newer
    # source AMI must not reuse the AMI baked on the older one.
    operator.source_ami = {"name": "base-al2023-*", "owner": DEFAULT_ACCOUNT_ID}
    backend = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]
    ec2.register_image(Name="unrelated-1")
    backend.amis[ec2.register_image(Name="base-al2023-1")["ImageId"]].creation_date = datetime(2026, 11, 1, tzinfo=UTC)
    names = []
    for _ in range(2):
        with pytest.raises(PackerError):
            operator.execute({})
        names.append(_baked_name(tmp_path))
    assert names[0] == names[1]
    newer = ec2.register_image(Name="base-al2023-2")["ImageId"]
    backend.amis[newer].creation_date = datetime(2026, 12, 1, tzinfo=UTC)
    with pytest.raises(PackerError):
        operator.execute({})
    assert _baked_name(tmp_path) != names[0]
