"""ContainerRegistryHook.ensure_repository on ECR against moto's: a repository a build pushes to gets DTP's lifecycle
policy (untagged images expire, the newest ones are kept) when it is created or found without one, and DTP's
own older policy is replaced; a policy the account owner set is left as it is."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from dtp.hooks.registry import IMAGES_KEPT, LIFECYCLE_POLICY, UNTAGGED_IMAGE_DAYS, ContainerRegistryHook

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
    conn = {"conn_type": "generic", "host": "123456789012.dkr.ecr.us-east-1.amazonaws.com", "extra": {"ecr": True}}
    monkeypatch.setenv("AIRFLOW_CONN_CONTAINER_REGISTRY", json.dumps(conn))
    return moto_aws("ecr")


def lifecycle_policy(ecr: Any) -> dict[str, Any]:
    return json.loads(ecr.get_lifecycle_policy(repositoryName=REPOSITORY)["lifecyclePolicyText"])


def test_a_repository_made_for_a_build_expires_untagged_images_and_keeps_the_newest(ecr: Any) -> None:
    ContainerRegistryHook().ensure_repository(REPOSITORY, {"dev.dtp.image": "training"})

    [repository] = ecr.describe_repositories(repositoryNames=[REPOSITORY])["repositories"]
    assert repository["imageScanningConfiguration"] == {"scanOnPush": True}
    untagged, newest = sorted(lifecycle_policy(ecr)["rules"], key=lambda rule: rule["rulePriority"])
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
    assert untagged["action"] == newest["action"] == {"type": "expire"}


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
