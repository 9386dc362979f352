"""Wait while another run of the DAG holds it: one run of a regression DAG at a time, its backfill runs included.

Airflow holds a DAG's scheduled and manual runs to the DAG's ``max_active_runs`` and a backfill's runs to the
backfill's own ``max_active_runs``, counting the two apart (``SchedulerJobRunner._start_queued_dagruns``): a
backfill run of a model size would start beside its scheduled run, on the same capacity. ``OtherRunsSensor``, in
reschedule mode right after ``validate_params``, closes that gap with what the Task SDK lets a task read (task
states and run states of its DAG): a run holds the DAG from when its sensor passes until its last teardown ended
(or the run did), and a run's sensor passes only when no other running run holds the DAG or is passing its own
sensor ahead of it.

Why no two runs pass: a sensor checks while its own task instance is ``running`` (set before the task's code runs),
then ends ``success`` when it passed. Of two sensors that both passed, the later check saw the earlier sensor
``running`` or ``success``: ``success`` waits; ``running`` waits when the other run's id sorts first, and
otherwise waits out that other check (seconds) before looking again, to find it ``success``. The run whose id
sorts first never waits for a check that is still running, so two runs that check at once do not both wait.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

ENDED_TASK_STATES = {"success", "failed", "skipped", "upstream_failed", "removed"}


def runs_in_the_way(ti: Any, last_task_id: str, settle_s: float = 60, poll_s: float = 2) -> list[str]:
    """The run ids of the other running runs of ``ti``'s DAG that hold it or pass their sensor (``ti``'s task)
    ahead of ``ti``'s run; an empty list when this run may go on. A run holds the DAG until its ``last_task_id``
    ended. Waits up to ``settle_s`` for a check of a run whose id sorts after this one's to end, and reports that
    run when it has not by then."""
    if ti.get_dr_count(dag_id=ti.dag_id, states=["running"]) <= 1:  # this run alone
        return []
    deadline = time.monotonic() + settle_s
    while True:
        sensors = _sensors_of_running_runs(ti, last_task_id)
        ahead = sorted(run_id for run_id, state in sensors.items() if state == "success" or run_id < ti.run_id)
        checking = sorted(set(sensors) - set(ahead))
        if ahead or not checking or time.monotonic() >= deadline:
            return ahead or checking
        time.sleep(poll_s)


def _sensors_of_running_runs(ti: Any, last_task_id: str) -> dict[str, str]:
    """The state of the sensor of each other running run of the DAG whose sensor passed or is checking, and whose
    ``last_task_id`` did not end, by run id."""
    states = ti.get_task_states(dag_id=ti.dag_id, task_ids=[ti.task_id, last_task_id])
    candidates = {
        run_id: tasks[ti.task_id]
        for run_id, tasks in states.items()
        if run_id != ti.run_id
        and tasks.get(ti.task_id) in ("running", "success")
        and tasks.get(last_task_id) not in ENDED_TASK_STATES
    }
    # A run marked failed or success by hand keeps its unfinished tasks' states: its own state says it ended.
    return {
        run_id: sensor for run_id, sensor in candidates.items() if ti.get_dagrun_state(ti.dag_id, run_id) == "running"
    }


class OtherRunsSensor(BaseSensorOperator):
    """Wait, in reschedule mode (no worker slot held), while another run of this DAG holds it: from its own
    ``OtherRunsSensor``, which has this task's id, until its ``last_task_id`` ended.

    :param last_task_id: the task after which a run no longer holds the DAG (its last teardown)
    """

    def __init__(self, *, last_task_id: str, poke_interval: float = 60, **kwargs: Any) -> None:
        super().__init__(mode="reschedule", poke_interval=poke_interval, **kwargs)
        self.last_task_id = last_task_id

    def poke(self, context: Context) -> bool:
        if in_the_way := runs_in_the_way(context["ti"], self.last_task_id):
            self.log.info("Waiting for run(s) %s of this DAG", ", ".join(in_the_way))
        return not in_the_way
