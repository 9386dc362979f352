"""ContainerRegistryHook.ensure_repository on ECR against moto's: a repository a build pushes to gets DTP's lifecycle
policy (the image published for each platform is kept, untagged images expire, the newest ones are kept) when it is
created or found without one, and DTP's own older policy is replaced, by a build that finds its image too; a policy the
account owner set is left as it is. container_build's publish tags the image ``published-<platform>``, moving the tag
from the platform's previous one."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from dtp.hooks.image_builder import ContainerBuildError
from dtp.hooks.registry import (
    IMAGES_KEPT,
    LIFECYCLE_POLICY,
    PUBLISHED_IMAGES_KEPT,
    UNTAGGED_IMAGE_DAYS,
    ContainerRegistryHook,
)
from dtp.operators.container import ContainerImageBuildOperator
from dtp.pipeline.container_build import publish

REGISTRY = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
REPOSITORY = "dtp/training"
OWNERS_POLICY = {
    "rules": [
        {
            "rulePriority": 1,
            "description": "keep the last 3 images",
            "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": 3},
            "action": {"type": "expire"},
        }
    ]
}


@pytest.fixture
def ecr(moto_aws: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto's ECR, behind a ``container_registry`` connection that says it is ECR."""
    conn = {"conn_type": "generic", "host": REGISTRY, "extra": {"ecr": True}}
    monkeypatch.setenv("AIRFLOW_CONN_CONTAINER_REGISTRY", json.dumps(conn))
    return moto_aws("ecr")


def lifecycle_policy(ecr: Any) -> dict[str, Any]:
    return json.loads(ecr.get_lifecycle_policy(repositoryName=REPOSITORY)["lifecyclePolicyText"])


def test_a_repository_made_for_a_build_keeps_published_images_expires_untagged_ones_and_keeps_the_newest(
    ecr: Any,
) -> None:
    ContainerRegistryHook().ensure_repository(REPOSITORY, {"dev.dtp.image": "training"})

    [repository] = ecr.describe_repositories(repositoryNames=[REPOSITORY])["repositories"]
    assert repository["imageScanningConfiguration"] == {"scanOnPush": True}
    published, untagged, newest = sorted(lifecycle_policy(ecr)["rules"], key=lambda rule: rule["rulePriority"])
    # First: ECR never expires an image a rule of a higher priority selects, and this one expires none it selects.
    assert published["rulePriority"] == 1
    assert published["selection"] == {
        "tagStatus": "tagged",
        "tagPrefixList": ["published-"],
        "countType": "imageCountMoreThan",
        "countNumber": PUBLISHED_IMAGES_KEPT,
    }
    assert untagged["selection"] == {
        "tagStatus": "untagged",
        "countType": "sinceImagePushed",
        "countUnit": "days",
        "countNumber": UNTAGGED_IMAGE_DAYS,
    }
    assert newest["selection"] == {
        "tagStatus": "any",
        "countType": "imageCountMoreThan",
        "countNumber": IMAGES_KEPT,
    }
    assert untagged["action"] == newest["action"] == published["action"] == {"type": "expire"}


def test_a_repository_found_without_a_policy_gets_it(ecr: Any) -> None:
    # A repository DTP made before it set lifecycle policies, or one made by hand.
    ecr.create_repository(repositoryName=REPOSITORY)
    ContainerRegistryHook().ensure_repository(REPOSITORY, {})
    assert lifecycle_policy(ecr) == LIFECYCLE_POLICY


def test_the_account_owners_policy_is_kept(ecr: Any) -> None:
    ecr.create_repository(repositoryName=REPOSITORY)
    ecr.put_lifecycle_policy(repositoryName=REPOSITORY, lifecyclePolicyText=json.dumps(OWNERS_POLICY))
    ContainerRegistryHook().ensure_repository(REPOSITORY, {})
    assert lifecycle_policy(ecr) == OWNERS_POLICY


def test_an_older_policy_of_dtps_is_replaced_by_the_current_one(ecr: Any) -> None:
    older = json.loads(json.dumps(LIFECYCLE_POLICY))
    for rule in older["rules"]:
        rule["selection"]["countNumber"] += 1
    ecr.create_repository(repositoryName=REPOSITORY)
    ecr.put_lifecycle_policy(repositoryName=REPOSITORY, lifecyclePolicyText=json.dumps(older))
    ContainerRegistryHook().ensure_repository(REPOSITORY, {})
    assert lifecycle_policy(ecr) == LIFECYCLE_POLICY


def test_the_policy_dtp_set_before_published_images_were_kept_is_replaced_by_a_build_that_finds_its_image(
    ecr: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # A rebuild would be skipped (the registry has the tag): the repository's policy is brought up to date anyway.
    before = {
        "rules": [
            {
                "rulePriority": 1,
                "description": "dtp: expire untagged images 14 days after their push",
                "selection": {
                    "tagStatus": "untagged",
                    "countType": "sinceImagePushed",
                    "countUnit": "days",
                    "countNumber": 14,
                },
                "action": {"type": "expire"},
            },
            {
                "rulePriority": 2,
                "description": "dtp: keep the newest 30 images",
                "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": 30},
                "action": {"type": "expire"},
            },
        ]
    }
    ecr.create_repository(repositoryName=REPOSITORY)
    ecr.put_lifecycle_policy(repositoryName=REPOSITORY, lifecyclePolicyText=json.dumps(before))
    digest = "sha256:" + "d" * 64
    monkeypatch.setattr(ContainerRegistryHook, "manifest_digest", lambda hook, repository, tag: digest)
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    operator = ContainerImageBuildOperator(
        task_id="build", context_dir=str(tmp_path), dockerfile=str(tmp_path / "Dockerfile"), repository=REPOSITORY
    )
    assert operator.execute({})["built"] is False
    assert lifecycle_policy(ecr) == LIFECYCLE_POLICY


class AliasEvents(list[dict[str, Any]]):
    """The events a task adds through one Asset alias: their extras."""

    def add(self, asset: Any, extra: dict[str, Any]) -> None:
        self.append(extra)


class OutletEvents(dict[Any, AliasEvents]):
    """The ``outlet_events`` Airflow gives a task."""

    def __missing__(self, alias: Any) -> AliasEvents:
        events = self[alias] = AliasEvents()
        return events


def push(ecr: Any, layer: int) -> str:
    """Push an image (a manifest of one layer) under a fingerprint-like tag, as a build does; its digest."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "layers": [{"digest": f"sha256:{layer:064d}", "size": 1}],
    }
    pushed = ecr.put_image(repositoryName=REPOSITORY, imageManifest=json.dumps(manifest), imageTag=f"fp{layer}")
    digest: str = pushed["image"]["imageId"]["imageDigest"]
    return digest


def published(ecr: Any, platform: str, digest: str) -> None:
    """container_build's publish task for the training image ``digest`` on ``platform``."""
    request = {"platform": platform, "image_name": "training", "repository": REPOSITORY}
    built = {"image": f"{REGISTRY}/{REPOSITORY}@{digest}", "digest": digest, "build_args": {}, "built": True}
    publish.function(request, built, outlet_events=OutletEvents())


def tags(ecr: Any) -> dict[str, set[str]]:
    """Each image's tags, by digest."""
    images = ecr.describe_images(repositoryName=REPOSITORY)["imageDetails"]
    return {image["imageDigest"]: set(image.get("imageTags", [])) for image in images}


def test_publishing_tags_the_image_for_its_platform_moving_the_tag_from_the_one_before(ecr: Any, moto_aws: Any) -> None:
    ContainerRegistryHook().ensure_repository(REPOSITORY, {})
    first, second = push(ecr, 1), push(ecr, 2)
    published(ecr, "eks", first)
    published(ecr, "parallelcluster", first)
    published(ecr, "eks", second)
    published(ecr, "eks", second)  # a retry of publish, or a rerun that found the image
    assert tags(ecr) == {first: {"fp1", "published-parallelcluster"}, second: {"fp2", "published-eks"}}
    # The digest SSM publishes is the one tagged: the manifest was put again, not changed.
    assert moto_aws("ssm").get_parameter(Name="/dtp/images/eks/training")["Parameter"]["Value"].endswith(second)


def test_tagging_an_image_the_repository_lacks_says_so(ecr: Any) -> None:
    ContainerRegistryHook().ensure_repository(REPOSITORY, {})
    missing = "sha256:" + "0" * 64
    with pytest.raises(ContainerBuildError, match=f"cannot tag {REPOSITORY}@{missing} published-eks"):
        ContainerRegistryHook().tag_image(REPOSITORY, missing, "published-eks")
