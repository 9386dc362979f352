"""How DTP's pipelines end: the teardowns first in the queue, and a last teardown that judges the run.

Marking a run failed in the UI fails the tasks running then, skips those yet to run (the training pipeline's
``watcher`` with them) and lets the teardowns finish; Airflow then judges the run by its leaves, leaving out the
teardowns that do not set ``on_failure_fail_dagrun``, and counts a skipped leaf as a success
(``airflow.api.common.mark_tasks``, ``DagRun.update_state``). ``judge_run``, a teardown with that flag after every
other task, is a leaf that mark-failed does not skip: it fails the run when one of its tasks failed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.python import BranchPythonOperator
from airflow.sdk import DAG, task
from airflow.sdk.exceptions import AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk.types import Operator

log = logging.getLogger(__name__)
# The states of a task that fail its run when the task is one of the run's leaves.
FAILED_STATES = ("failed", "upstream_failed")
# Above the weight of every other task of DTP's DAGs (the heaviest, a training run's validate_params, weighs about
# 30: one for itself and one per task after it).
TEARDOWN_PRIORITY = 1000


def judged_task_ids(dag: DAG) -> list[str]:
    """The tasks of ``dag`` whose failure fails a run in Airflow: all but the teardowns that do not say otherwise."""
    return sorted(t.task_id for t in dag.tasks if not t.is_teardown or t.on_failure_fail_dagrun)


@task
def judge_run(**context: Any) -> None:
    """Fail the run when a task that decides its state failed or did not run for an upstream failure, naming them;
    it runs once every other task is done (as a teardown without setups: also after the run was marked failed)."""
    ti = context["ti"]
    task_ids = [task_id for task_id in judged_task_ids(context["dag"]) if task_id != ti.task_id]
    states = ti.get_task_states(dag_id=ti.dag_id, task_ids=task_ids, run_ids=[ti.run_id]).get(ti.run_id, {})
    failed = {state: sorted(t for t, s in states.items() if s == state) for state in FAILED_STATES}
    if any(failed.values()):
        named = "; ".join(f"{state}: {', '.join(tasks)}" for state, tasks in failed.items() if tasks)
        raise AirflowFailException(f"{named}; see those tasks' logs for why")
    log.info("No task of the run failed")


def tasks_to_follow(dag: DAG) -> list[Operator]:
    """The tasks of ``dag`` that a task judging the whole run can follow: all but the setups (whose teardown it
    would become, skipped where they were) and the branches (which would skip it)."""
    return [t for t in dag.tasks if not (t.is_setup or isinstance(t, BranchPythonOperator))]


def end_with_judgement(dag: DAG) -> None:
    """Add ``judge_run`` to ``dag`` (call once every other task is in it): a teardown without setups, after every
    task, whose failure fails the run."""
    tasks_to_follow(dag) >> judge_run().as_teardown(on_failure_fail_dagrun=True)


def schedule_teardowns_first(dag: DAG) -> None:
    """Give the teardowns of ``dag`` the queue before every other task of DTP's DAGs where slots are short
    (``core.parallelism``): a teardown waiting behind other runs' tasks keeps its run's cluster up. Call it once
    every task is in ``dag``.

    Airflow's default weight rule (``downstream``) adds the weights of all the tasks after a task to its own, so the
    teardowns' weight would lift every task before them too: the others keep the weights that rule gave them (one
    for the task and one per task after it), as absolute weights."""
    for t in dag.tasks:
        t.weight_rule = "absolute"
        t.priority_weight = TEARDOWN_PRIORITY if t.is_teardown else 1 + len(t.get_flat_relative_ids(upstream=False))
