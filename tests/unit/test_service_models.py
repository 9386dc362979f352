"""dtp.platforms.service_models: a request is checked against the service model's patterns, the Unicode classes
of AWS's tag patterns (``\\p{L}``) included."""

from __future__ import annotations

from dtp.platforms.service_models import request_problems


def _tags(*tags: dict[str, str]) -> dict:
    return {"ClusterName": "c", "InstanceGroups": [], "Tags": list(tags)}


def test_a_tag_value_outside_the_unicode_tag_pattern_is_named() -> None:
    problems = request_problems("sagemaker", "CreateCluster", _tags({"Key": "dtp:run", "Value": "bad;value"}))
    assert any(p.startswith("CreateCluster.Tags[0].Value: 'bad;value' does not match the pattern") for p in problems)


def test_letters_digits_spaces_and_the_allowed_signs_of_any_script_pass() -> None:
    tags = ({"Key": "dtp:run-id", "Value": "manual__2026-01-01T00:00:00+00:00"}, {"Key": "équipe", "Value": "ü 1 @"})
    assert not [p for p in request_problems("sagemaker", "CreateCluster", _tags(*tags)) if "Tags" in p]
