"""A backfill run trains with the image and AMI that were the newest at its logical date, read from the SSM
parameters' history, and is refused when that AMI was deregistered since; every other run with the newest. Any run
is refused when its image was deleted from its registry since it was published. moto's SSM, EC2 and ECR stand in for
AWS's: SSM stamps each version with the real clock, so the instants between versions are taken from the history it
keeps."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dtp.form_params import parse_params
from dtp.hooks.ami import AmiHook
from dtp.hooks.registry import ContainerRegistryHook
from dtp.images import ami, container
from dtp.images.published import published_as_of
from dtp.params import TrainParams
from dtp.pipeline.spec import is_backfill, run_spec
from dtp.platforms import get_platform
from dtp.platforms.base import PlatformNotReady

IMAGE = container.training_parameter("eks", "training")
AMI = ami.ssm_parameter("eks-gpu")
BACKFILL = ("backfill__2026-11-20T00:00:00+00:00", "backfill")
TRIGGERED = ("backfill_triggered__20261207T101500__2026-11-20", "manual")
MANUAL = ("manual__2026-12-07T10:15:00+00:00", "manual")
SCHEDULED = ("scheduled__2026-11-20T00:00:00+00:00", "scheduled")
# moto's account's ECR registry, and the repository container_build pushes the training image to.
REGISTRY = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
REPOSITORY = "dtp/training"


@pytest.fixture
def ecr(moto_aws: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto's ECR with the training image's repository, behind the ``container_registry`` connection."""
    conn = {"conn_type": "generic", "host": REGISTRY, "extra": {"ecr": True, "aws_conn_id": "aws_default"}}
    monkeypatch.setenv("AIRFLOW_CONN_CONTAINER_REGISTRY", json.dumps(conn))
    client = moto_aws("ecr")
    client.create_repository(repositoryName=REPOSITORY)
    return client


@pytest.fixture
def ssm(moto_aws: Callable[[str], Any], ecr: Any) -> Any:
    return moto_aws("ssm")


def layer(version: int) -> str:
    return f"sha256:{version:064d}"


def image(version: int) -> str:
    """The ``version``-th image's reference, pinned by digest (moto's: of its manifest's layers)."""
    return f"{REGISTRY}/{REPOSITORY}@sha256:{hashlib.sha256(layer(version).encode()).hexdigest()}"


def push_image(ecr: Any, version: int) -> None:
    """Push the ``version``-th image (a manifest of one layer) to moto's ECR."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "layers": [{"digest": layer(version), "size": 1}],
    }
    ecr.put_image(repositoryName=REPOSITORY, imageManifest=json.dumps(manifest), imageTag=f"v{version}")


def register_ami(version: int) -> str:
    """Register an AMI in moto's EC2 for the ``version``-th bake; its id."""
    image_id: str = AmiHook(aws_conn_id="aws_default").conn.register_image(
        Name=f"dtp-eks-gpu-{version}",
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8}}],
    )["ImageId"]
    return image_id


def publish(ssm: Any, version: int) -> str:
    """Push and publish the ``version``-th image and a newly registered AMI, then let the clock move on: moto stamps
    versions to the millisecond. The AMI's id."""
    push_image(ContainerRegistryHook().ecr.conn, version)
    ami_id = register_ami(version)
    ssm.put_parameter(Name=IMAGE, Value=image(version), Type="String", Overwrite=True)
    ssm.put_parameter(Name=AMI, Value=ami_id, Type="String", Overwrite=True)
    time.sleep(0.01)
    return ami_id


def written(ssm: Any, parameter: str, version: int) -> datetime:
    """When ``version`` of ``parameter`` was written, as SSM's history says."""
    (found,) = [v for v in ssm.get_parameter_history(Name=parameter)["Parameters"] if v["Version"] == version]
    stamp: datetime = found["LastModifiedDate"]
    return stamp


def spec_of(
    run: tuple[str, str], logical_date: datetime, recipe: str = "llama3_2_1b", platform: str = "eks"
) -> dict[str, Any]:
    """The spec of a run (run id, run type) of ``logical_date``, as validate_params gives it."""
    conf = {"platform": platform, "recipe": recipe, "instance_type": "p5.48xlarge", "dataset_uri": "s3://dtp-data/p/"}
    spec = run_spec(parse_params(TrainParams, conf), f"regression__{recipe}", run[0])
    return spec | {"logical_date": logical_date.isoformat(), "run_type": run[1]}


def resolved(spec: dict[str, Any]) -> tuple[str, str | None]:
    runtime = container.resolve_runtime(get_platform("eks"), spec, "aws_default")
    return runtime["image"], runtime.get("ami")


@pytest.mark.parametrize(
    ("run", "backfill"), [(BACKFILL, True), (TRIGGERED, True), (MANUAL, False), (SCHEDULED, False)]
)
def test_runs_of_airflow_backfills_and_of_scripts_backfill_are_backfills(run: tuple[str, str], backfill: bool) -> None:
    spec = spec_of(run, datetime.fromisoformat("2026-11-20T00:00:00+00:00"))
    assert is_backfill(spec) is backfill
    assert (published_as_of(spec) is not None) is backfill


@pytest.mark.parametrize("run", [BACKFILL, TRIGGERED])
def test_a_backfill_of_a_date_between_two_publications_trains_with_the_earlier(
    ssm, caplog: pytest.LogCaptureFixture, run: tuple[str, str]
) -> None:
    first = publish(ssm, 1)
    publish(ssm, 2)
    between = max(written(ssm, IMAGE, 1), written(ssm, AMI, 1))  # at or before it counts; version 2 came later
    assert between < min(written(ssm, IMAGE, 2), written(ssm, AMI, 2))
    with caplog.at_level(logging.INFO, logger="dtp.images.published"):
        assert resolved(spec_of(run, between)) == (image(1), first)
    for parameter in (IMAGE, AMI):
        assert (
            f"{parameter}: version 1, written {written(ssm, parameter, 1).isoformat()}, the newest at "
            f"{between.isoformat()} (the run's logical date)" in caplog.messages
        )


@pytest.mark.parametrize("run", [MANUAL, SCHEDULED])
def test_any_other_run_of_that_date_trains_with_the_newest_without_asking_ec2(
    ssm, monkeypatch: pytest.MonkeyPatch, run: tuple[str, str]
) -> None:
    publish(ssm, 1)
    newest = publish(ssm, 2)
    # The reaper spares the AMIs SSM points at now: only a backfill's may be gone.
    monkeypatch.setattr(AmiHook, "conn", property(lambda hook: pytest.fail("EC2 was asked")))
    assert resolved(spec_of(run, written(ssm, IMAGE, 1))) == (image(2), newest)


@pytest.mark.parametrize("run", [MANUAL, SCHEDULED])
def test_any_run_whose_newest_image_was_deleted_since_is_refused_naming_it(ssm, ecr, run: tuple[str, str]) -> None:
    # Another platform's frequent pushes expired it (before the lifecycle policy kept published images), or a
    # person deleted it: the run's nodes could not pull it.
    publish(ssm, 1)
    ecr.batch_delete_image(repositoryName=REPOSITORY, imageIds=[{"imageTag": "v1"}])
    with pytest.raises(PlatformNotReady) as refused:
        resolved(spec_of(run, datetime.now(UTC)))
    assert str(refused.value) == (
        f"{IMAGE}: its newest version is image {image(1)}, which its registry no longer has: deleted since (by hand, "
        "or by ECR's lifecycle policy before it kept the image published for each platform, tagged "
        "published-<platform>), so the nodes could not pull it. Run container_build for this image and platform "
        "again to publish one the registry has"
    )
    second = publish(ssm, 2)
    assert resolved(spec_of(run, datetime.now(UTC))) == (image(2), second)


def test_a_backfill_whose_ami_was_deregistered_since_is_refused_naming_it(ssm) -> None:
    first = publish(ssm, 1)
    AmiHook(aws_conn_id="aws_default").conn.deregister_image(ImageId=first)  # the reaper, its retain_days passed
    second = publish(ssm, 2)
    between = max(written(ssm, IMAGE, 1), written(ssm, AMI, 1))
    with pytest.raises(PlatformNotReady) as refused:
        resolved(spec_of(BACKFILL, between))
    assert str(refused.value) == (
        f"{AMI}: version 1, written {written(ssm, AMI, 1).isoformat()}, which the run's logical date "
        f"{between.isoformat()} reads, is AMI {first}, which no longer exists: the reaper deregistered it once its "
        "retain_days had passed (a rebake is a new version, which earlier dates do not read). Backfill later dates, "
        "whose AMIs are still kept; ami_bake's retain_days sets how far back a backfill can go"
    )
    assert resolved(spec_of(BACKFILL, written(ssm, AMI, 2))) == (image(2), second)


def test_a_backfill_whose_ami_ec2_never_had_is_refused(ssm) -> None:
    ssm.put_parameter(Name=AMI, Value="ami-00000000000000001", Type="String")
    with pytest.raises(PlatformNotReady, match="is AMI ami-00000000000000001, which no longer exists"):
        resolved(spec_of(BACKFILL, datetime.now(UTC)))


def test_a_backfill_of_a_date_before_the_first_publication_trains_with_the_oldest_saying_so(
    ssm, caplog: pytest.LogCaptureFixture
) -> None:
    first = publish(ssm, 1)
    publish(ssm, 2)
    before = written(ssm, IMAGE, 1) - timedelta(days=30)
    with caplog.at_level(logging.WARNING, logger="dtp.images.published"):
        assert resolved(spec_of(BACKFILL, before)) == (image(1), first)
    assert [record.levelno for record in caplog.records] == [logging.WARNING, logging.WARNING]
    assert caplog.messages[0] == (
        f"{IMAGE}: no version was written by {before.isoformat()} (the run's logical date predates its first "
        f"publication, or the oldest of the 100 versions SSM keeps): using its oldest, version 1, written "
        f"{written(ssm, IMAGE, 1).isoformat()}"
    )


def test_a_backfill_reads_every_page_of_the_history(ssm) -> None:
    for version in range(1, 55):  # SSM answers at most 50 versions a page, as moto does
        ssm.put_parameter(Name=AMI, Value=f"ami-{version:017d}", Type="String", Overwrite=True)
    newest = register_ami(55)
    ssm.put_parameter(Name=AMI, Value=newest, Type="String", Overwrite=True)
    spec = spec_of(BACKFILL, datetime.now(UTC))  # after every version was written
    assert resolved(spec) == (get_platform("eks").default_image()["image"], newest)


def test_a_backfill_whose_image_was_never_published_falls_back_or_is_refused_as_any_run(ssm) -> None:
    date = datetime.fromisoformat("2026-11-20T00:00:00+00:00")
    assert container.resolve_runtime(get_platform("eks"), spec_of(BACKFILL, date), "aws_default") == (
        get_platform("eks").default_image()
    )
    torchtitan = spec_of(BACKFILL, date, recipe="llama3_1_8b_torchtitan", platform="parallelcluster")
    with pytest.raises(PlatformNotReady, match="publish it with container_build image=torchtitan"):
        container.resolve_runtime(get_platform("parallelcluster"), torchtitan, "aws_default")


def test_a_backfill_whose_image_was_deleted_since_is_refused_naming_it(ssm, ecr) -> None:
    publish(ssm, 1)
    ecr.batch_delete_image(repositoryName=REPOSITORY, imageIds=[{"imageTag": "v1"}])  # ECR's lifecycle policy
    second = publish(ssm, 2)
    between = max(written(ssm, IMAGE, 1), written(ssm, AMI, 1))
    with pytest.raises(PlatformNotReady) as refused:
        resolved(spec_of(BACKFILL, between))
    assert str(refused.value) == (
        f"{IMAGE}: version 1, written {written(ssm, IMAGE, 1).isoformat()}, which the run's logical date "
        f"{between.isoformat()} reads, is image {image(1)}, which its registry no longer has: deleted since (ECR's "
        "lifecycle policy keeps a repository's newest 30 images), so the nodes could not pull it. Backfill later "
        "dates, whose images are still kept"
    )
    assert resolved(spec_of(BACKFILL, max(written(ssm, IMAGE, 2), written(ssm, AMI, 2)))) == (image(2), second)


@pytest.mark.parametrize("run", [BACKFILL, MANUAL])
def test_an_image_in_another_registry_trains_unchecked(ssm, caplog: pytest.LogCaptureFixture, run) -> None:
    elsewhere = "registry.example.com/dtp/training@sha256:" + "0" * 64  # published before the connection moved
    ssm.put_parameter(Name=IMAGE, Value=elsewhere, Type="String")
    with caplog.at_level(logging.WARNING, logger="dtp.images.published"):
        assert resolved(spec_of(run, datetime.now(UTC)))[0] == elsewhere
    assert caplog.messages == [f"{IMAGE}: image {elsewhere} is not in the registry {REGISTRY}: not checked"]


@pytest.mark.parametrize("run", [BACKFILL, MANUAL])
def test_with_no_registry_connection_a_run_trains_with_its_image_unchecked(
    ssm, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, run
) -> None:
    publish(ssm, 1)
    monkeypatch.delenv("AIRFLOW_CONN_CONTAINER_REGISTRY")
    with caplog.at_level(logging.WARNING, logger="dtp.images.published"):
        assert resolved(spec_of(run, datetime.now(UTC)))[0] == image(1)
    assert caplog.messages == [
        f"{IMAGE}: image {image(1)}: no connection 'container_registry' to check its registry with: not checked"
    ]
