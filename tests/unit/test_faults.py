"""The fault-injection listener: which task tries a plan strikes, once each, and how."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException
from pydantic import ValidationError

from dtp.faults import PLAN_ENV, Fault, FaultInjectionListener, FaultPlan, InjectedFault, fired_faults

RUN = "manual__2026-12-02T10:00:00+00:00"


def _ti(task_id: str = "stage_data", try_number: int = 1, run_id: str = RUN) -> SimpleNamespace:
    return SimpleNamespace(
        dag_id="train_e2e",
        run_id=run_id,
        task_id=task_id,
        map_index=-1,
        try_number=try_number,
        task=BaseOperator(task_id=task_id),
    )


@pytest.fixture
def plan_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "faults.json"
    monkeypatch.setenv(PLAN_ENV, str(path))
    return path


def _plan(path: Path, **fault) -> None:
    FaultPlan(faults=[Fault(dag_id="train_e2e", run_id=RUN, task_id="stage_data", **fault)]).write(path)


def test_no_plan_file_injects_nothing(plan_path: Path) -> None:
    ti = _ti()
    FaultInjectionListener().on_task_instance_running(previous_state=None, task_instance=ti)
    ti.task.pre_execute(context={})
    assert fired_faults(plan_path) == []


def test_exception_fault_strikes_the_first_try_once(plan_path: Path) -> None:
    _plan(plan_path, kind="exception")
    listener = FaultInjectionListener()
    first = _ti()
    listener.on_task_instance_running(previous_state=None, task_instance=first)
    with pytest.raises(InjectedFault, match="injected exception fault before stage_data, try 1"):
        first.task.pre_execute(context={})
    # The same try started again (a deferred task resuming, a sensor rescheduled) is left alone.
    resumed = _ti()
    listener.on_task_instance_running(previous_state=None, task_instance=resumed)
    resumed.task.pre_execute(context={})
    # So are the retry, other tasks and other runs.
    for other in (_ti(try_number=2), _ti(task_id="deploy_cluster"), _ti(run_id="manual__other")):
        listener.on_task_instance_running(previous_state=None, task_instance=other)
        other.task.pre_execute(context={})
    assert [(f["task_id"], f["try_number"], f["kind"]) for f in fired_faults(plan_path)] == [
        ("stage_data", 1, "exception")
    ]


def test_fatal_fault_on_every_try_fails_without_retry(plan_path: Path) -> None:
    _plan(plan_path, kind="fatal", tries="all")
    for try_number in (1, 2, 3):
        ti = _ti(try_number=try_number)
        FaultInjectionListener().on_task_instance_running(previous_state=None, task_instance=ti)
        with pytest.raises(AirflowFailException, match=f"try {try_number}"):
            ti.task.pre_execute(context={})
    assert len(fired_faults(plan_path)) == 3


def test_after_fault_strikes_once_the_work_is_done(plan_path: Path) -> None:
    _plan(plan_path, kind="exception", when="after")
    ti = _ti()
    FaultInjectionListener().on_task_instance_running(previous_state=None, task_instance=ti)
    ti.task.pre_execute(context={})
    with pytest.raises(InjectedFault, match="after stage_data"):
        ti.task.post_execute(context={}, result={"created": "bucket"})


def test_sigkill_fault_kills_the_task_process(plan_path: Path) -> None:
    _plan(plan_path, kind="sigkill")
    child = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = {sys.path!r}
        from tests.unit.test_faults import _ti
        from dtp.faults import FaultInjectionListener
        ti = _ti()
        FaultInjectionListener().on_task_instance_running(previous_state=None, task_instance=ti)
        ti.task.pre_execute(context={{}})
        print("survived")
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "survived" not in proc.stdout
    assert [f["kind"] for f in fired_faults(plan_path)] == ["sigkill"]


def test_plan_refuses_unknown_kinds_and_keys() -> None:
    with pytest.raises(ValidationError):
        Fault(dag_id="d", run_id="r", task_id="t", kind="oom")
    with pytest.raises(ValidationError):
        FaultPlan.model_validate({"faults": [], "extra": 1})
