"""When the Slurm trigger's ``on_kill`` cancels the job: unless the task still waits on its trigger (the trigger
moved to another triggerer; how the task's state tells: test_trigger_kill.py). The hook is a stand-in for a cluster
(slurm_job_support.py)."""

from __future__ import annotations

from typing import Any
from unittest.mock import AsyncMock

import pytest
from slurm_job_support import Cluster, trigger, use_cluster


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> type[Cluster]:
    return use_cluster(monkeypatch)


@pytest.mark.parametrize(
    ("still_deferred", "cancelled"), [(True, []), (False, ["7"])], ids=["moved_to_another_triggerer", "killed"]
)
def test_on_kill_cancels_the_job_unless_the_task_still_waits_on_its_trigger(
    cluster: type[Cluster], run_coroutine: Any, monkeypatch: pytest.MonkeyPatch, still_deferred: bool, cancelled: list
) -> None:
    monkeypatch.setattr("dtp.triggers.slurm.task_still_deferred", AsyncMock(return_value=still_deferred))
    run_coroutine(trigger().on_kill())
    assert [job_id for hook in cluster.made for job_id in hook.cancelled] == cancelled
