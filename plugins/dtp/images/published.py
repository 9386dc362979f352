"""What container_build and ami_bake had published at a past instant: the image and AMI a backfill run trains with.

Both overwrite one SSM parameter per image or AMI family with the newest; SSM
keeps the parameter's earlier versions, each with when it was written
(GetParameterHistory). A run that fills in a past date reads the version that
was the newest at the end of that date, so the history it fills in measures
what a run of that date would have trained with, not today's image.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from airflow.providers.amazon.aws.hooks.ssm import SsmHook

from dtp.pipeline.spec import is_backfill

log = logging.getLogger(__name__)


def published_as_of(spec: dict[str, Any]) -> datetime | None:
    """The instant the run ``spec`` resolves what was published as of: a backfill run's logical date (``is_backfill``);
    None for every other run, which reads the newest."""
    if not is_backfill(spec) or not spec.get("logical_date"):
        return None
    return datetime.fromisoformat(spec["logical_date"])


def published_value(ssm: SsmHook, parameter: str, as_of: datetime | None) -> str:
    """The value of the SSM parameter ``parameter``, "" when it does not exist: the newest, or with ``as_of`` the
    newest version written at or before it (the oldest version, with a warning, when none was)."""
    if as_of is None:
        return ssm.get_parameter_value(parameter, default="")
    try:
        pages = ssm.conn.get_paginator("get_parameter_history").paginate(Name=parameter)
        versions = [version for page in pages for version in page["Parameters"]]
    except ssm.conn.exceptions.ParameterNotFound:
        return ""
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
    return str(chosen["Value"])
