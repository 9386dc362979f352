"""What a DAG run still queued or running keeps from the reaper, whatever the expiry of its resources, and what
another Airflow installation's runs keep from it for a while past their expiry."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from dtp.naming import parse_expiry, tag_value
from dtp.reaper.expired import Expired

log = logging.getLogger(__name__)
# The DAG run states in which a run may still create or use its resources.
ACTIVE_RUN_STATES = ("queued", "running")
# How long past their expiry the resources of another installation's run (in the same account) are left to that
# installation's reaper, which knows whether the run still goes (a task cleared after the run's expiry recreates
# what it needs with that expiry, and uses it): this one cannot ask. Past it, the other installation may be gone.
OTHER_INSTALLATION_GRACE = timedelta(hours=24)


def spare_active_runs(found: list[Expired], active: Callable[[str, str], bool]) -> list[Expired]:
    """``found`` less every resource of a run that ``active(dag_id, run_id)`` says is still queued or running: a
    task cleared or retried after its run's expiry recreates what it needs with that expiry, and it is in use. A
    run's resources are kept or deleted together (its network sweep takes all that is tagged with its key), so one
    of them naming an active DAG run keeps them all; one naming no DAG run (an older Slurm comment) cannot."""
    answers: dict[tuple[str, str], bool] = {}

    def is_active(dag_run: tuple[str, str]) -> bool:
        if dag_run not in answers:
            answers[dag_run] = active(*dag_run)
        return answers[dag_run]

    live = {
        item.run_key: (item.dag_id, item.run_id)
        for item in found
        if item.dag_id and item.run_id and is_active((item.dag_id, item.run_id))
    }
    for item in found:
        if item.run_key in live:
            dag_id, run_id = live[item.run_key]
            log.info(
                "keeping %s %s of run %s: expired %s but its run %s of %s is still running",
                item.kind,
                item.name,
                item.run_key,
                item.expires_at,
                run_id,
                dag_id,
            )
    return [item for item in found if item.run_key not in live]


def spare_other_installations(found: list[Expired], installation: str, now: datetime) -> list[Expired]:
    """``found`` less every resource of a run of another installation than ``installation`` (by its
    ``dtp:installation`` tag: one without, made before runs carried it, counts as this installation's) that expired
    less than ``OTHER_INSTALLATION_GRACE`` before ``now``. A run's resources are kept or deleted together; the
    tag holds the installation's id as ``tag_value`` wrote it."""
    own = tag_value(installation)
    kept = {
        item.run_key
        for item in found
        if item.installation not in ("", own) and parse_expiry(item.expires_at) + OTHER_INSTALLATION_GRACE > now
    }
    for item in found:
        if item.run_key in kept:
            log.info(
                "keeping %s %s of run %s: installation %s's, expired %s; reaped %s past its expiry",
                item.kind,
                item.name,
                item.run_key,
                item.installation,
                item.expires_at,
                OTHER_INSTALLATION_GRACE,
            )
    return [item for item in found if item.run_key not in kept]


def run_is_active(dag_id: str, run_id: str) -> bool:
    """Whether this Airflow's DAG run ``run_id`` of ``dag_id`` is queued or running in a DAG that is not paused,
    asked through the Task SDK (so callable in a running task only): the check the reaper's tasks pass their
    finders. A run it does not know (deleted, another installation's made before resources named their
    installation, or one whose id has a character a tag cannot hold, which ``tag_value`` replaced) is not active.
    A paused DAG's run is not either: the scheduler leaves it "running" for as long as the DAG stays paused, and
    its teardowns do not run, so the expiry is what ends its resources. Any other error raises: nothing is
    deleted on a guess."""
    from airflow.sdk.exceptions import AirflowRuntimeError
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    try:
        state = RuntimeTaskInstance.get_dagrun_state(dag_id, run_id)
    except AirflowRuntimeError as err:
        if (err.error.detail or {}).get("status_code") != 404:
            raise
        return False
    return state in ACTIVE_RUN_STATES and not RuntimeTaskInstance.get_dag(dag_id).is_paused
