"""Fault injection into task runs, for the fault-injection suite and for game days.

A fault plan is a JSON file named by ``DTP_FAULT_PLAN`` (the local stack sets it
to ``<DTP_HOME>/faults.json``; where the variable is unset or the file does not
exist, nothing is injected)::

    {"faults": [{"dag_id": "train_e2e", "run_id": "manual__...", "task_id": "stage_data",
                 "kind": "sigkill", "tries": [1]}]}

``FaultInjectionListener`` (registered by the ``dtp`` Airflow plugin) runs in
each task process just before the task executes and, when a fault matches the
task instance and try, injects it ``when`` asked: ``before`` the task's work,
or ``after`` it (the work is done, then the task fails: its retry must find and
reuse what the first try created):

- ``exception``: the task raises ``InjectedFault`` (a retryable error);
- ``fatal``: the task raises ``AirflowFailException`` and fails without retrying;
- ``sigkill``: the task process kills itself with SIGKILL, as the OOM killer would.

Each fault fires at most once per task instance and try (a sensor's reschedule
or a deferred task's resume starts the same try again), and each firing is
appended to ``<plan>.fired.jsonl`` so a test can count what it injected.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any, Literal

from airflow.listeners import hookimpl
from airflow.sdk.exceptions import AirflowFailException
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)
PLAN_ENV = "DTP_FAULT_PLAN"
FaultKind = Literal["exception", "fatal", "sigkill"]
FaultTime = Literal["before", "after"]


class InjectedFault(RuntimeError):
    """The error an ``exception`` fault raises in its task."""


class Fault(BaseModel):
    """One fault: where it strikes (DAG, run, task, tries) and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dag_id: str
    run_id: str
    task_id: str
    kind: FaultKind
    when: FaultTime = "before"
    tries: list[int] | Literal["all"] = Field(default_factory=lambda: [1])
    map_index: int = -1

    def matches(self, dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int) -> bool:
        return (self.dag_id, self.run_id, self.task_id, self.map_index) == (dag_id, run_id, task_id, map_index) and (
            self.tries == "all" or try_number in self.tries
        )


class FaultPlan(BaseModel):
    """The faults to inject, as read from (and written to) the plan file."""

    model_config = ConfigDict(extra="forbid")

    faults: list[Fault] = Field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> FaultPlan:
        return cls.model_validate_json(path.read_text()) if path.exists() else cls()

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=1))
        tmp.replace(path)


def fired_path(plan_path: Path) -> Path:
    """The ledger of faults that fired, one JSON object per line."""
    return plan_path.with_name(plan_path.name + ".fired.jsonl")


def fired_faults(plan_path: Path) -> list[dict[str, Any]]:
    """The faults of the plan at ``plan_path`` that fired so far, one record per task try, in firing order."""
    ledger = fired_path(plan_path)
    return [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []


def _claim(plan_path: Path, record: dict[str, Any]) -> bool:
    """Append ``record`` to the ledger unless this task try already fired; True when it is new."""
    with fired_path(plan_path).open("a+") as ledger:
        fcntl.flock(ledger, fcntl.LOCK_EX)
        ledger.seek(0)
        key = {k: record[k] for k in ("dag_id", "run_id", "task_id", "map_index", "try_number")}
        if any({k: json.loads(line)[k] for k in key} == key for line in ledger if line.strip()):
            return False
        ledger.write(json.dumps(record) + "\n")
        return True


def _strike(fault: Fault, plan_path: Path, record: dict[str, Any]) -> Any:
    """A pre/post-execute hook that injects ``fault`` (a hook's errors fail the task; a listener's do not).

    The fault is claimed when it strikes, not when the hook is set: a deferred
    task never reaches its first process's post-execute, only its resumed one's.
    """
    message = f"injected {fault.kind} fault {fault.when} {record['task_id']}, try {record['try_number']}"

    def hook(context: Any, result: Any = None) -> None:
        if not _claim(plan_path, record | {"kind": fault.kind, "when": fault.when}):
            return
        log.warning("Fault injection: %s", message)
        if fault.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise AirflowFailException(message) if fault.kind == "fatal" else InjectedFault(message)

    return hook


class FaultInjectionListener:
    """An Airflow listener that arms the planned fault of a starting task (through its pre- or post-execute)."""

    @hookimpl
    def on_task_instance_running(self, previous_state: Any, task_instance: Any) -> None:
        plan_file = os.environ.get(PLAN_ENV)
        if not plan_file or not Path(plan_file).exists():
            return
        plan_path = Path(plan_file)
        ti = task_instance
        where = (ti.dag_id, ti.run_id, ti.task_id, ti.map_index, ti.try_number)
        fault = next((f for f in FaultPlan.read(plan_path).faults if f.matches(*where)), None)
        if fault is None:
            return
        record = dict(zip(("dag_id", "run_id", "task_id", "map_index", "try_number"), where, strict=True))
        setattr(ti.task, f"{'pre' if fault.when == 'before' else 'post'}_execute", _strike(fault, plan_path, record))
