"""What the reaper's finders return: a resource past its expiry, and the test of an expiry."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from dtp.naming import EXPIRES_TAG, INSTALLATION_TAG, TAG_PREFIX, parse_expiry

RUN = f"{TAG_PREFIX}run"
DAG = f"{TAG_PREFIX}dag"
RUN_ID = f"{TAG_PREFIX}run-id"


@dataclass(frozen=True)
class Expired:
    """A resource past its expiry: its kind (``stack``, ``slurm_job``, ...), the name or id to delete it by, the
    run it belongs to, its expiry, and the DAG run that made it and its Airflow installation (empty where the
    resource does not say)."""

    kind: str
    name: str
    run_key: str
    expires_at: str
    dag_id: str = ""
    run_id: str = ""
    installation: str = ""

    @classmethod
    def from_tags(cls, kind: str, name: str, tags: Mapping[str, str], run_key: str | None = None) -> Expired:
        """The expired resource ``name`` of ``kind``, its run (``run_key`` where given), expiry and installation as
        its tags say."""
        run_key = run_key or tags[RUN]
        dag_run = (tags.get(DAG, ""), tags.get(RUN_ID, ""))
        return cls(kind, name, run_key, tags[EXPIRES_TAG], *dag_run, tags.get(INSTALLATION_TAG, ""))


def is_expired(expires_at: str | None, now: datetime) -> bool:
    """Whether the expiry ``expires_at`` is before ``now``; an absent or unreadable one never is."""
    if not expires_at:
        return False
    try:
        return parse_expiry(expires_at) < now
    except ValueError:
        return False
