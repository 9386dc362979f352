"""EC2 AMIs: find one by name, wait out a pending one, tag it, deregister it with its snapshots.

Extends the amazon provider's ``EC2Hook`` (which manages instances but not
images) on its client API. ``PackerBuildOperator`` uses it to find the AMI an
earlier try baked and to tag the one it returns; the reaper to delete expired
AMIs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
from botocore.exceptions import ClientError, WaiterError

from dtp.naming import aws_tags

# How often, and after how long at first, a snapshot EC2 still holds as in use is tried again (2 + 4 + ... + 32 s).
SNAPSHOT_IN_USE_RETRIES = 5
SNAPSHOT_IN_USE_DELAY_S = 2.0


def snapshot_ids(image: Mapping) -> list[str]:
    """The EBS snapshots behind an AMI."""
    return [m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings", []) if m.get("Ebs", {}).get("SnapshotId")]


class AmiHook(EC2Hook):
    """
    Find, wait for, tag and deregister AMIs, and the EBS snapshots behind them.

    Always on boto3's EC2 client (``api_type="client_type"``); other arguments (such as ``aws_conn_id``) are passed
    down to ``EC2Hook``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs["api_type"] = "client_type"
        super().__init__(**kwargs)

    def newest_image(self, name: str, owner: str) -> str | None:
        """The newest AMI of ``owner`` whose name matches ``name`` (a pattern, ``*`` a wildcard), as packer's
        ``source_ami_filter`` with ``most_recent`` picks it; None when there is none."""
        images = self.conn.describe_images(Owners=[owner], Filters=[{"Name": "name", "Values": [name]}])["Images"]
        return max(images, key=lambda image: image["CreationDate"])["ImageId"] if images else None

    def find_image(self, name: str) -> dict | None:
        """The account's AMI called ``name``, if there is one, in whatever state (``pending``, ``failed``,
        ``disabled``: EC2 lists disabled AMIs only when asked, yet their names stay taken)."""
        images = self.conn.describe_images(
            Owners=["self"], Filters=[{"Name": "name", "Values": [name]}], IncludeDisabled=True
        )["Images"]
        return images[0] if images else None

    @property
    def waiter_path(self) -> Path:
        """waiters/ec2.json beside this module: ``image_settled``."""
        return Path(__file__).with_name("waiters") / "ec2.json"

    def describe_image(self, image_id: str) -> dict:
        """The AMI ``image_id`` as DescribeImages reports it."""
        return self.conn.describe_images(ImageIds=[image_id])["Images"][0]

    def existing_image(self, image_id: str) -> dict | None:
        """The AMI ``image_id`` as DescribeImages reports it; None when it is gone: deregistered (which EC2 lists
        for a while as ``deregistered``, then not at all) or never there."""
        try:
            images = self.conn.describe_images(ImageIds=[image_id])["Images"]
        except ClientError as err:
            if err.response["Error"]["Code"] != "InvalidAMIID.NotFound":
                raise
            return None
        return images[0] if images and images[0]["State"] != "deregistered" else None

    def wait_available(self, image_id: str, delay: int = 15, max_attempts: int = 120) -> dict | None:
        """Wait until the AMI is no longer pending, and return it: ``available``, or ``failed``; None when it is
        gone (deregistered while waited for: a killed packer cleans up the AMI it was making). EC2's
        ``image_available`` waiter, which also stops at a gone AMI (``image_settled``). Raises botocore's
        WaiterError when it is still pending after ``max_attempts`` checks ``delay`` seconds apart."""
        try:
            self.get_waiter("image_settled").wait(
                ImageIds=[image_id], WaiterConfig={"Delay": delay, "MaxAttempts": max_attempts}
            )
        except WaiterError:
            image = self.existing_image(image_id)
            if image is not None and image["State"] != "failed":
                raise
            return image
        return self.describe_image(image_id)

    def deregister_image(self, image_id: str) -> list[str]:
        """Deregister the AMI, then delete the snapshots behind it (EC2 keeps an AMI's snapshots); their ids."""
        snapshots = snapshot_ids(self.describe_image(image_id))
        self.conn.deregister_image(ImageId=image_id)
        for snapshot in snapshots:
            self.delete_snapshot(snapshot)
        return snapshots

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete the snapshot. EC2 may hold one of an AMI deregistered a moment ago as in use
        (``InvalidSnapshot.InUse``) for a while: it is tried again ``SNAPSHOT_IN_USE_RETRIES`` times, after
        ``SNAPSHOT_IN_USE_DELAY_S`` seconds and twice as long each time after.

        Not DeregisterImage's ``DeleteAssociatedSnapshots``: the local profile's EC2 emulator (moto) ignores it."""
        for retry in range(SNAPSHOT_IN_USE_RETRIES + 1):
            try:
                self.conn.delete_snapshot(SnapshotId=snapshot_id)
                return
            except ClientError as err:
                if err.response["Error"]["Code"] != "InvalidSnapshot.InUse" or retry == SNAPSHOT_IN_USE_RETRIES:
                    raise
                delay = SNAPSHOT_IN_USE_DELAY_S * 2**retry
                self.log.info("Snapshot %s is still in use, trying again in %.0f s", snapshot_id, delay)
                time.sleep(delay)

    def tag_image(self, image_id: str, tags: Mapping[str, str]) -> None:
        """Tag the AMI and the snapshots behind it."""
        snapshots = snapshot_ids(self.describe_image(image_id))
        self.conn.create_tags(Resources=[image_id, *snapshots], Tags=aws_tags(tags))
