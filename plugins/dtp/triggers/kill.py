"""Tell a user's kill of a deferred task from a trigger's move to another triggerer, both of which call ``on_kill``.

The triggerer (Airflow 3.3) cancels each trigger no longer assigned to it as it cancels one whose task a user marked
failed or succeeded, or cleared, and so calls its ``on_kill``: when this triggerer missed its heartbeats and another
took its triggers over, say. The trigger runs on there, so its ``on_kill`` must leave what it waits on alone; only
the task instance's state tells the two apart.
"""

from __future__ import annotations

import asyncio

from airflow.triggers.base import BaseTrigger

# The task instance's state while it waits on its trigger (``airflow.sdk.TaskInstanceState.DEFERRED``).
DEFERRED = "deferred"


async def task_still_deferred(trigger: BaseTrigger) -> bool:
    """Whether the task instance of ``trigger`` still waits on a trigger, as the Task SDK's API says: the trigger
    moved to another triggerer rather than being killed. False without a task instance, or when the API cannot say
    (a user's kill is then the likelier)."""
    ti = trigger.task_instance
    if ti is None:
        return False
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    try:
        states = await asyncio.to_thread(
            RuntimeTaskInstance.get_task_states,
            dag_id=ti.dag_id,
            map_index=ti.map_index,
            task_ids=[ti.task_id],
            run_ids=[ti.run_id],
        )
    except Exception:
        trigger.log.warning("Could not read the state of task %s", ti.task_id, exc_info=True)
        return False
    key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}_{ti.map_index}"  # as the API keys mapped ones
    return bool(states.get(ti.run_id, {}).get(key) == DEFERRED)
