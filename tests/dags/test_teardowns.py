"""judge_run, the teardown that judges a run once every other task is done, and the teardowns' place in the queue."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException

from dtp.pipeline.teardowns import TEARDOWN_PRIORITY, end_with_judgement, judge_run, schedule_teardowns_first

RUN_ID = "manual__2026-01-01"


class _RunningJudge:
    """The task instance judge_run runs as: it answers ``get_task_states`` from ``states``, as the Task SDK does."""

    dag_id, task_id, run_id = "pipeline", "judge_run", RUN_ID

    def __init__(self, states: dict[str, str]) -> None:
        self.states = states

    def get_task_states(self, *, dag_id: str, task_ids: list[str], run_ids: list[str]) -> dict[str, dict[str, Any]]:
        assert dag_id == self.dag_id and run_ids == [RUN_ID]
        return {RUN_ID: {task_id: self.states[task_id] for task_id in task_ids}}


def _pipeline() -> DAG:
    """work -> report, and a setup with two teardowns: one that fails the run when it fails, one that does not."""
    with DAG("pipeline", start_date=datetime(2026, 1, 1), schedule=None) as dag:
        create = EmptyOperator(task_id="create")
        work = EmptyOperator(task_id="work")
        create >> work >> EmptyOperator(task_id="report")
        work >> EmptyOperator(task_id="delete").as_teardown(setups=create)
        work >> EmptyOperator(task_id="cancel").as_teardown(setups=create, on_failure_fail_dagrun=True)
        end_with_judgement(dag)
    return dag


def _judge(states: dict[str, str]) -> None:
    judge_run.function(ti=_RunningJudge(states | {"judge_run": "running"}), dag=_pipeline())


ALL_DONE = {"create": "success", "work": "success", "report": "success", "delete": "success", "cancel": "success"}


@pytest.mark.parametrize(
    "ended",
    [
        ALL_DONE,
        ALL_DONE | {"work": "skipped", "report": "skipped"},  # a run marked failed before its work started
        ALL_DONE | {"delete": "failed"},  # a teardown that does not fail the run in Airflow does not here either
    ],
)
def test_a_run_whose_tasks_succeeded_or_were_skipped_passes(ended: dict[str, str]) -> None:
    _judge(ended)


@pytest.mark.parametrize(
    "ended, message",
    [
        # A run marked failed while its work ran: the work failed, the rest was skipped.
        (ALL_DONE | {"work": "failed", "report": "skipped"}, "failed: work; see"),
        (ALL_DONE | {"create": "failed", "work": "upstream_failed"}, "failed: create; upstream_failed: work; see"),
        (ALL_DONE | {"cancel": "failed"}, "failed: cancel; see"),
    ],
)
def test_a_run_with_a_failed_task_fails(ended: dict[str, str], message: str) -> None:
    with pytest.raises(AirflowFailException, match=message):
        _judge(ended)


def test_the_judge_follows_every_task_but_the_setups_as_a_teardown_that_fails_the_run() -> None:
    dag = _pipeline()
    judge = dag.get_task("judge_run")
    assert judge.is_teardown and judge.on_failure_fail_dagrun
    assert judge.upstream_task_ids == {"work", "report", "delete", "cancel"}


def test_teardowns_go_first_and_the_others_keep_their_downstream_weights() -> None:
    dag = _pipeline()
    schedule_teardowns_first(dag)
    weights = {t.task_id: (t.weight_rule, t.priority_weight) for t in dag.tasks}
    absolute = "absolute"
    assert weights == {
        # One for the task and one per task after it, as the downstream rule gave each when every task weighed 1.
        "create": (absolute, 6),
        "work": (absolute, 5),
        "report": (absolute, 2),
        **{teardown: (absolute, TEARDOWN_PRIORITY) for teardown in ("delete", "cancel", "judge_run")},
    }
