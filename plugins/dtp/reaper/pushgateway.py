"""The reaper's finder on the Prometheus Pushgateway: the groups runs pushed there longer ago than the retention.

A run's report task pushes its numbers as the group ``job="dtp", run="<run_key>"`` (``dtp.metrics.prometheus``), and
the gateway serves a group until it is deleted: Prometheus would scrape every run ever pushed, for ever, and a
dashboard's "latest" panels would keep showing runs long gone. Such a group carries no ``dtp:expires-at``: its
expiry is its last push plus ``RETENTION``. Neither of the reaper's spares applies to it. A group is a copy of
numbers Prometheus has in its own storage from its first scrape on, and no run uses it: deleting the group of a run
still going loses nothing (a report task run again pushes it again, whole), so no DAG run is asked whether it is
active (a group names none). The installations pushing to one gateway all delete a group by the same rule, which
needs no owner's word, so another installation's group is no different from this one's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from airflow.sdk.exceptions import AirflowNotFoundException

from dtp.metrics.prometheus import JOB, PUSHGATEWAY_CONN_ID, PushedGroup, Pushgateway
from dtp.naming import expiry
from dtp.reaper.aws import AwsFindings
from dtp.reaper.expired import Expired, is_expired

log = logging.getLogger(__name__)
KIND = "pushgateway_group"
# How long a run's group stays on the gateway after its last push: Prometheus scrapes the gateway every 15 seconds
# (include/observability/prometheus.yml), so a week lets a Prometheus that was down for days still scrape the numbers
# into its storage, which keeps their history; a dashboard's "latest" panels show the week's runs.
RETENTION = timedelta(days=7)


def find_expired_pushgateway_groups(conn_id: str = PUSHGATEWAY_CONN_ID, now: datetime | None = None) -> AwsFindings:
    """The runs' groups on the Pushgateway of the connection ``conn_id`` last pushed more than ``RETENTION`` before
    ``now`` (``expired_groups``); none where the connection is not defined (an installation that does not export to
    Prometheus). A gateway that cannot be asked, or a connection that names none, is logged and named in
    ``unsearched``."""
    now = now or datetime.now(UTC)
    try:
        found = expired_groups(Pushgateway.from_connection(conn_id).groups(), now)
    except AirflowNotFoundException:
        log.info("No %s connection is defined: no Pushgateway groups to sweep", conn_id)
        return AwsFindings([])
    except Exception as err:  # the other sweeps are tasks of their own; reap fails once the rest is deleted
        where = f"{KIND} ({conn_id})"
        log.exception("could not look for expired resources of kind %s", where)
        return AwsFindings([], {where: f"{type(err).__name__}: {err}"})
    return AwsFindings(found)


def expired_groups(groups: Iterable[PushedGroup], now: datetime) -> list[Expired]:
    """The groups DTP pushed (labels ``job="dtp"`` and ``run``, and no other: the run's group, which a DELETE of its
    path removes whole) whose last push is more than ``RETENTION`` before ``now``, named by their run key. Other jobs'
    groups never are, and neither is one whose push time the gateway does not give; one no push of which succeeded
    (push time 0) holds no numbers and goes at the first sweep. Its expiry is its last push plus
    ``RETENTION``, to the second."""
    found = []
    for group in groups:
        if group.labels.keys() != {"job", "run"} or group.labels["job"] != JOB or group.pushed_at is None:
            continue
        expires_at = expiry(0, group.pushed_at + RETENTION)
        if is_expired(expires_at, now):
            found.append(Expired(KIND, group.labels["run"], group.labels["run"], expires_at))
    return found
