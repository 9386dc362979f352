"""Publish a built image where runs look for it: an SSM parameter and an Airflow Asset event.

The SSM parameter is what a run reads (train_e2e's resolve_images, on any
Airflow or none); the Asset event is what Airflow shows and schedules on, with
the versions in its extra. Both are overwritten by the newest image.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.amazon.aws.hooks.ssm import SsmHook
from airflow.sdk import Asset, AssetAlias

from dtp.naming import aws_tags

AMI_ALIAS = AssetAlias("dtp-amis")
IMAGE_ALIAS = AssetAlias("dtp-container-images")


def put_parameter(name: str, value: str, description: str, tags: dict[str, str], aws_conn_id: str | None) -> int:
    """Write (overwrite) a String parameter and tag it; returns the parameter's new version."""
    ssm = SsmHook(aws_conn_id=aws_conn_id).conn
    version = ssm.put_parameter(Name=name, Value=value, Type="String", Overwrite=True, Description=description)[
        "Version"
    ]
    ssm.add_tags_to_resource(ResourceType="Parameter", ResourceId=name, Tags=aws_tags(tags))
    return version


def emit(outlet_events: Any, alias: AssetAlias, name: str, uri: str, extra: dict[str, Any]) -> Asset:
    """Add an event for the Asset ``uri`` through ``alias`` (a task emits only for the images it made)."""
    asset = Asset(name=name, uri=uri, group="image")
    outlet_events[alias].add(asset, extra=extra)
    return asset
