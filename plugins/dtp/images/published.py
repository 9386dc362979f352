"""What container_build and ami_bake had published at a past instant: the image and AMI a backfill run trains with.

Both overwrite one SSM parameter per image or AMI family with the newest; SSM
keeps the parameter's earlier versions, each with when it was written
(GetParameterHistory). A run that fills in a past date reads the newest version
written at or before its logical date (for a run of scripts/backfill, 00:00 of
its date), so the history it fills in measures what a run of that date would
have trained with, not today's image.

The AMI so read may be gone: the reaper deregisters an AMI once its retain_days
have passed, sparing only those a run may still boot (SSM points at them, or did
within the longest a run lives, or an instance uses them). So may the container
image: ECR's lifecycle policy keeps the image each platform has published
(tagged ``published-<platform>``) and a repository's newest others, but an
earlier version, or one published before that tag or deleted by hand, may be
gone. Every run's image is checked, a backfill's AMI too: a run whose image or
AMI is gone is refused while its images are resolved, before its network or
cluster exists, not when its nodes fail to pull the image.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from airflow.providers.amazon.aws.hooks.ssm import SsmHook
from airflow.sdk.exceptions import AirflowNotFoundException
from botocore.exceptions import ClientError

from dtp.hooks.ami import AmiHook
from dtp.hooks.registry import IMAGES_KEPT, PUBLISHED_TAG_PREFIX, ContainerRegistryHook
from dtp.pipeline.spec import is_backfill
from dtp.platforms.base import PlatformNotReady

log = logging.getLogger(__name__)


def published_as_of(spec: dict[str, Any]) -> datetime | None:
    """The instant the run ``spec`` resolves what was published as of: a backfill run's logical date (``is_backfill``);
    None for every other run, which reads the newest."""
    if not is_backfill(spec) or not spec.get("logical_date"):
        return None
    return datetime.fromisoformat(spec["logical_date"])


def published_image(ssm: SsmHook, registry: ContainerRegistryHook, parameter: str, as_of: datetime | None) -> str:
    """The container image the SSM parameter ``parameter`` holds, "" when it does not exist: the newest, or with
    ``as_of`` the newest version written at or before it (the oldest version, with a warning, when none was); then
    refused (``PlatformNotReady``) when ``registry`` no longer has that image, which the nodes could not pull. One
    in another registry than ``registry``'s (the connection moved since), or with no registry connection to check
    with, is not checked, with a warning."""
    if as_of is None:
        image = ssm.get_parameter_value(parameter, default="")
        if image and not _in_registry(registry, parameter, image):
            raise PlatformNotReady(
                f"{parameter}: its newest version is image {image}, which its registry no longer has: deleted since "
                "(by hand, or by ECR's lifecycle policy before it kept the image published for each platform, tagged "
                f"{PUBLISHED_TAG_PREFIX}<platform>), so the nodes could not pull it. Run container_build for this "
                "image and platform again to publish one the registry has"
            )
        return image
    version = _version_as_of(ssm, parameter, as_of)
    if not version:
        return ""
    image = str(version["Value"])
    if not _in_registry(registry, parameter, image):
        raise PlatformNotReady(
            f"{parameter}: version {version['Version']}, written {version['LastModifiedDate'].isoformat()}, which the "
            f"run's logical date {as_of.isoformat()} reads, is image {image}, which its registry no longer has: "
            f"deleted since (ECR's lifecycle policy keeps a repository's newest {IMAGES_KEPT} images), so the nodes "
            "could not pull it. Backfill later dates, whose images are still kept"
        )
    return image


def _in_registry(registry: ContainerRegistryHook, parameter: str, image: str) -> bool:
    """Whether ``registry`` still has ``image``, which the SSM parameter ``parameter`` names; True, with a warning,
    for one that cannot be checked: no registry connection, or an image in another registry (published before the
    connection moved)."""
    try:
        registry_host = registry.registry
    except AirflowNotFoundException:
        conn_id = registry.registry_conn_id
        log.warning("%s: image %s: no connection %r to check its registry with: not checked", parameter, image, conn_id)
        return True
    if not image.startswith(f"{registry_host}/"):
        log.warning("%s: image %s is not in the registry %s: not checked", parameter, image, registry_host)
        return True
    return registry.has_image(image)


def published_ami(ssm: SsmHook, ec2: AmiHook, parameter: str, as_of: datetime | None) -> str:
    """The AMI id the SSM parameter ``parameter`` holds, as ``published_image`` reads it. With ``as_of``, refused
    (``PlatformNotReady``) when that AMI no longer exists: the reaper deregisters an AMI once its retain_days have
    passed, sparing only those a run may still boot (dtp.reaper.amis), so nodes could not boot it."""
    if as_of is None:
        return ssm.get_parameter_value(parameter, default="")
    version = _version_as_of(ssm, parameter, as_of)
    if not version:
        return ""
    ami_id = str(version["Value"])
    if not _image_exists(ec2, ami_id):
        raise PlatformNotReady(
            f"{parameter}: version {version['Version']}, written {version['LastModifiedDate'].isoformat()}, which the "
            f"run's logical date {as_of.isoformat()} reads, is AMI {ami_id}, which no longer exists: the reaper "
            "deregistered it once its retain_days had passed (a rebake is a new version, which earlier dates do not "
            "read). Backfill later dates, whose AMIs are still kept; ami_bake's retain_days sets how far back a "
            "backfill can go"
        )
    return ami_id


def _image_exists(ec2: AmiHook, image_id: str) -> bool:
    """Whether EC2 still has the AMI ``image_id`` (DescribeImages answers a deregistered one with none, or with
    ``InvalidAMIID.NotFound``)."""
    try:
        return bool(ec2.conn.describe_images(ImageIds=[image_id])["Images"])
    except ClientError as err:
        if err.response["Error"]["Code"] == "InvalidAMIID.NotFound":
            return False
        raise


def parameter_versions(ssm: Any, parameter: str) -> list[dict[str, Any]]:
    """Every version of ``parameter`` SSM keeps (its newest 100: GetParameterHistory, every page), oldest first;
    ``ssm`` is a boto3 client. Raises its ``ParameterNotFound`` for a parameter that does not exist."""
    pages = ssm.get_paginator("get_parameter_history").paginate(Name=parameter)
    return sorted((version for page in pages for version in page["Parameters"]), key=lambda v: v["Version"])


def _version_as_of(ssm: SsmHook, parameter: str, as_of: datetime) -> dict[str, Any] | None:
    """The version of ``parameter`` (GetParameterHistory's record) that was the newest at ``as_of``, logged: the
    oldest, with a warning, when none was written by then; None when the parameter does not exist."""
    try:
        versions = parameter_versions(ssm.conn, parameter)
    except ssm.conn.exceptions.ParameterNotFound:
        return None
    if written := [version for version in versions if version["LastModifiedDate"] <= as_of]:
        chosen = max(written, key=lambda version: version["Version"])
        log.info(
            "%s: version %d, written %s, the newest at %s (the run's logical date)",
            parameter,
            chosen["Version"],
            chosen["LastModifiedDate"].isoformat(),
            as_of.isoformat(),
        )
    else:
        chosen = min(versions, key=lambda version: version["Version"])
        log.warning(
            "%s: no version was written by %s (the run's logical date predates its first publication, or the oldest "
            "of the 100 versions SSM keeps): using its oldest, version %d, written %s",
            parameter,
            as_of.isoformat(),
            chosen["Version"],
            chosen["LastModifiedDate"].isoformat(),
        )
    return chosen
