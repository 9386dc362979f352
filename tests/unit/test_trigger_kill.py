"""task_still_deferred: how a trigger's ``on_kill`` tells a trigger that moved to another triggerer (the task still
waits on it) from a user's kill (the task marked failed or cleared, its run deleted), for the PyTorchJob, Slurm and
FSx triggers alike; each trigger's own tests check only what its ``on_kill`` does with the answer."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from dtp.triggers.kill import task_still_deferred


def waiting_trigger(map_index: int = -1) -> Any:
    """A trigger whose task instance is run_job of run manual__1 of train_e2e."""
    ti = SimpleNamespace(dag_id="train_e2e", run_id="manual__1", task_id="run_job", map_index=map_index)
    return SimpleNamespace(task_instance=ti, log=SimpleNamespace(warning=lambda *args, **kwargs: None))


@pytest.fixture
def task_states(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """What the Task SDK's API answers for task states (``answer``), and the queries it was asked (``asked``)."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    api = SimpleNamespace(answer={}, asked=[])

    def get_task_states(**query: Any) -> dict:
        api.asked.append(query)
        if isinstance(api.answer, Exception):
            raise api.answer
        return api.answer

    monkeypatch.setattr(RuntimeTaskInstance, "get_task_states", staticmethod(get_task_states))
    return api


@pytest.mark.parametrize(
    ("answer", "still_deferred"),
    [
        ({"manual__1": {"run_job": "deferred"}}, True),  # the trigger moved to another triggerer
        ({"manual__1": {"run_job": "failed"}}, False),  # a user marked the task failed
        ({"manual__1": {"run_job": None}}, False),  # ... or cleared it
        ({}, False),  # the run was deleted
        (ConnectionError("the API server is restarting"), False),  # a user's kill is then the likelier
    ],
    ids=["moved", "marked_failed", "cleared", "run_deleted", "api_unreachable"],
)
def test_only_a_task_that_still_waits_on_its_trigger_is_still_deferred(
    task_states: SimpleNamespace, run_coroutine: Any, answer: Any, still_deferred: bool
) -> None:
    task_states.answer = answer
    assert run_coroutine(task_still_deferred(waiting_trigger())) is still_deferred
    assert task_states.asked == [
        {"dag_id": "train_e2e", "map_index": -1, "task_ids": ["run_job"], "run_ids": ["manual__1"]}
    ]


def test_a_mapped_task_is_read_under_the_key_the_api_gives_it(task_states: SimpleNamespace, run_coroutine: Any) -> None:
    task_states.answer = {"manual__1": {"run_job_3": "deferred", "run_job": "failed"}}
    assert run_coroutine(task_still_deferred(waiting_trigger(map_index=3))) is True
    assert task_states.asked[0]["map_index"] == 3


def test_a_trigger_without_a_task_instance_asks_nothing(task_states: SimpleNamespace, run_coroutine: Any) -> None:
    assert run_coroutine(task_still_deferred(SimpleNamespace(task_instance=None))) is False
    assert task_states.asked == []
