"""The reaper's AMI sweep: the bakes' expired AMIs no run may still boot, the snapshots they left, and the AMIs a
bake left untagged.

An AMI's expiry (ami_bake's retain_days) says when no new run should use it, not when the last one has: SSM
``/dtp/amis/<family>`` moves to a rebake while runs that resolved the old AMI are still being created, and their
clusters boot nodes from it for as long as they live (clustermgtd replacing a static node, an EKS node group's launch
template). So an AMI is kept, whatever its expiry, while an instance not terminated was launched from it, while SSM
pointed at it within the longest a run lives (``MAX_EXPIRY_HOURS``), or while a launch template names it: a node group
scaled to zero launches from its template with no instance of the AMI alive.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

from dtp.hooks.ami import snapshot_ids
from dtp.images.ami import AMI_PARAMETER_PATH, BUILDER_EXPIRY_HOURS
from dtp.images.published import parameter_versions
from dtp.naming import EXPIRES_TAG, TAG_PREFIX, tags_dict
from dtp.params import MAX_EXPIRY_HOURS
from dtp.reaper.expired import RUN, Expired, is_expired

log = logging.getLogger(__name__)
# How long after SSM stopped pointing at an AMI a run that resolved it then may still boot nodes from it.
RUN_LIFETIME = timedelta(hours=MAX_EXPIRY_HOURS)
# The states of an instance whose fleet may still launch more from its AMI.
LIVE_INSTANCE_STATES = ["pending", "running", "stopping", "stopped"]
# The versions of a launch template an Auto Scaling group (an EKS managed node group's too) launches from unless pinned
# to a version number (Batch's compute environment asks for $Latest): a group pinned to an older one is not followed.
LAUNCH_TEMPLATE_VERSIONS = ["$Default", "$Latest"]
# How a launch template names its AMI by SSM parameter (resolve:ssm:<parameter>) instead of by id.
SSM_IMAGE_REFERENCE = "resolve:ssm:"
# Image ids asked about per DescribeInstances: EC2 refuses a filter of too many values (200, in practice).
IMAGE_IDS_PER_CALL = 100
# The name PackerBuildOperator gives an AMI: bake_requests' name prefix dtp-<family>, then its 12-digit fingerprint.
# It names no installation.
BAKED_AMI_NAME = re.compile(r"^dtp-[a-z0-9-]+-[0-9a-f]{12}$")
OWNER = f"{TAG_PREFIX}owner"
# How long an untagged AMI of a bake is left alone: a bake still going tags its AMI once packer is done with it.
UNTAGGED_GRACE = timedelta(hours=BUILDER_EXPIRY_HOURS)


def expired_amis(ec2: Any, ssm: Any, now: datetime) -> list[Expired]:
    """Expired AMIs of the bakes (disabled ones too: their snapshots still cost) that no run may still boot
    (``kept_amis``, each kept one logged with why), and expired snapshots no AMI uses any more (an AMI deregistered
    whose snapshot could not be deleted then). AMIs a bake left untagged are logged (``report_untagged_amis``), not
    returned. ``ec2`` and ``ssm`` are boto3 clients."""
    pages = ec2.get_paginator("describe_images").paginate(Owners=["self"], IncludeDisabled=True)
    images = [image for page in pages for image in page["Images"]]
    expired = [
        Expired.from_tags("ami", image["ImageId"], tags)
        for image in images
        if RUN in (tags := tags_dict(image.get("Tags", []))) and is_expired(tags.get(EXPIRES_TAG), now)
    ]
    untagged = [image for image in images if is_untagged_bake(image, now)]
    kept = kept_amis(ec2, ssm, [item.name for item in expired] + [image["ImageId"] for image in untagged], now)
    found = []
    for item in expired:
        if why := kept.get(item.name):
            log.info("keeping ami %s of run %s: expired %s but %s", item.name, item.run_key, item.expires_at, why)
        else:
            found.append(item)
    report_untagged_amis(untagged, kept)
    # The snapshots of an AMI reaped now go with it (AmiHook.deregister_image), not a second time as orphans.
    in_use = {snapshot for image in images for snapshot in snapshot_ids(image)}
    snapshots = ec2.describe_snapshots(OwnerIds=["self"], Filters=[{"Name": "tag-key", "Values": [RUN]}])
    for snapshot in snapshots["Snapshots"]:
        tags = tags_dict(snapshot.get("Tags", []))
        if is_expired(tags.get(EXPIRES_TAG), now) and snapshot["SnapshotId"] not in in_use:
            found.append(Expired.from_tags("snapshot", snapshot["SnapshotId"], tags))
    return found


def kept_amis(ec2: Any, ssm: Any, image_ids: list[str], now: datetime) -> dict[str, str]:
    """Those of ``image_ids`` a run may still boot, each with why: one an instance not terminated was launched from
    (``amis_in_use``), one SSM points runs at or did within ``RUN_LIFETIME`` (``published_amis``), or one a launch
    template's default or latest version names (``template_amis``)."""
    if not image_ids:
        return {}
    return {**template_amis(ec2), **published_amis(ssm, now), **amis_in_use(ec2, image_ids)}


def amis_in_use(ec2: Any, image_ids: list[str]) -> dict[str, str]:
    """Those of ``image_ids`` an instance in one of ``LIVE_INSTANCE_STATES`` was launched from, each with why: the
    cluster or node group that launched it may launch more from its AMI."""
    in_use: dict[str, str] = {}
    for start in range(0, len(image_ids), IMAGE_IDS_PER_CALL):
        filters = [
            {"Name": "image-id", "Values": image_ids[start : start + IMAGE_IDS_PER_CALL]},
            {"Name": "instance-state-name", "Values": LIVE_INSTANCE_STATES},
        ]
        for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for instance in (i for reservation in page["Reservations"] for i in reservation["Instances"]):
                in_use.setdefault(
                    instance["ImageId"], f"instance {instance['InstanceId']} ({instance['State']['Name']}) uses it"
                )
    return in_use


def template_amis(ec2: Any) -> dict[str, str]:
    """The AMIs the default or latest version (``LAUNCH_TEMPLATE_VERSIONS``) of a launch template in the account names
    by id, each with why: an Auto Scaling group or EKS managed node group launching from it boots that AMI at its next
    scale-up or node replacement, though none of its instances may be alive now. DTP creates no launch template
    itself: ParallelCluster makes one per compute resource naming the cluster's ``CustomAmi``, Batch launches from the
    ``dtp_batch`` connection's ``launch_template_id``, and an EKS cluster's node groups are its owner's."""
    named: dict[str, str] = {}
    for page in ec2.get_paginator("describe_launch_templates").paginate():
        for template in page["LaunchTemplates"]:
            template_id, name = template["LaunchTemplateId"], template["LaunchTemplateName"]
            for version in launch_template_versions(ec2, template_id):
                image_id = version["LaunchTemplateData"].get("ImageId", "")
                # An SSM reference to /dtp/amis/... names an AMI published_amis keeps already; the worker may read
                # no other parameter (docs/iam), so one elsewhere is not followed.
                if image_id and not image_id.startswith(SSM_IMAGE_REFERENCE):
                    why = f"launch template {template_id} ({name}) version {version['VersionNumber']} names it"
                    named.setdefault(image_id, why)
    return named


def launch_template_versions(ec2: Any, template_id: str) -> list[dict[str, Any]]:
    """The default and latest versions of launch template ``template_id``; none where it was deleted since it was
    listed (a cluster torn down meanwhile): it launches nothing any more."""
    try:
        response = ec2.describe_launch_template_versions(
            LaunchTemplateId=template_id, Versions=LAUNCH_TEMPLATE_VERSIONS
        )
    except ClientError as err:
        if err.response["Error"]["Code"] == "InvalidLaunchTemplateId.NotFound":
            return []
        raise
    return list(response["LaunchTemplateVersions"])


def published_amis(ssm: Any, now: datetime) -> dict[str, str]:
    """The AMIs an SSM parameter under ``/dtp/amis`` points runs at, or pointed at within ``RUN_LIFETIME`` before
    ``now``, each with why. A version of a parameter (GetParameterHistory, of the 100 versions SSM keeps) points at
    its AMI until the next version was written: a run that resolved the AMI by then may still boot it."""
    since = now - RUN_LIFETIME
    published: dict[str, str] = {}
    for page in ssm.get_paginator("get_parameters_by_path").paginate(Path=AMI_PARAMETER_PATH, Recursive=True):
        for parameter in page["Parameters"]:
            name = parameter["Name"]
            versions = parameter_versions(ssm, name)
            for version, newer in reversed(list(zip(versions, [*versions[1:], None], strict=True))):
                if newer is None:
                    published.setdefault(version["Value"], f"SSM {name} points at it")
                elif newer["LastModifiedDate"] > since:
                    until = newer["LastModifiedDate"].isoformat()
                    why = f"SSM {name} pointed at it until {until}, and a run may last {MAX_EXPIRY_HOURS} h"
                    published.setdefault(version["Value"], why)
    return published


def is_untagged_bake(image: Mapping[str, Any], now: datetime) -> bool:
    """Whether ``image`` is an AMI a bake made (``BAKED_AMI_NAME``) that carries neither DTP's run nor owner tag
    ``UNTAGGED_GRACE`` after it was made: packer tags an AMI only once it is available, and DTP's tags follow once
    packer exits, so a worker that died hard in between left it so. Nothing else finds it: it has no expiry."""
    if not BAKED_AMI_NAME.match(image.get("Name", "")) or {RUN, OWNER} & tags_dict(image.get("Tags", [])).keys():
        return False
    return datetime.fromisoformat(image["CreationDate"]) + UNTAGGED_GRACE < now


def report_untagged_amis(untagged: list[Mapping[str, Any]], kept: Mapping[str, str]) -> None:
    """Log each AMI of ``untagged`` (``is_untagged_bake``) that no run may still boot (``kept``), with how to delete
    it and its snapshots; delete none. Its name names no installation, so it may be another installation's (same
    account) bake, and without DTP's owner tag the workers may not deregister it (docs/iam): a person decides."""
    for image in untagged:
        image_id, snapshots = image["ImageId"], snapshot_ids(image)
        if why := kept.get(image_id):
            log.info("keeping untagged ami %s (%s): %s", image_id, image["Name"], why)
            continue
        log.warning(
            "ami %s (%s), made %s, carries no DTP tags (a bake's worker died before tagging it) and no run uses it: "
            "not deleted, as its name names no installation; delete it with `aws ec2 deregister-image --image-id %s`%s",
            image_id,
            image["Name"],
            image["CreationDate"],
            image_id,
            "".join(f" and `aws ec2 delete-snapshot --snapshot-id {snapshot}`" for snapshot in snapshots),
        )
