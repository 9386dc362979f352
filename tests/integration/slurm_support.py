"""What the Slurm integration tests share: a job script on the shared filesystem, the operator that submits it,
a stand-in for the task instance's XCom, and a drained node given back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from dtp.hooks.slurm import SlurmHook
from dtp.operators.slurm import SlurmSubmitJobOperator


def job_script(workdir: Path, body: str) -> str:
    """A two-node batch script running ``body``, written into ``workdir``; its path."""
    path = workdir / "job.sh"
    path.write_text("#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n" + body)
    return str(path)


class XComSink:
    """What the operator pushes to XCom, kept for the test to read."""

    def __init__(self) -> None:
        self.pushed: dict[str, str] = {}

    def xcom_push(self, key: str, value: str) -> None:
        self.pushed[key] = value


def job_operator(workdir: Path, name: str, body: str, **options: Any) -> SlurmSubmitJobOperator:
    """The operator submitting ``body`` as job ``name`` (``options`` its further arguments)."""
    return SlurmSubmitJobOperator(
        task_id="train",
        script_path=job_script(workdir, body),
        job_name=name,
        output_path=str(workdir / f"{name}-%j"),
        poll_interval=1,
        **options,
    )


def submit(workdir: Path, name: str, body: str, **options: Any) -> tuple[SlurmSubmitJobOperator, XComSink, Any]:
    """Submit ``body`` through the operator (``options`` its arguments); return it, its XCom sink and its trigger."""
    operator = job_operator(workdir, name, body, **options)
    sink = XComSink()
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute({"ti": sink})
    return operator, sink, deferred.value.trigger


def resume_node(hook: SlurmHook, node: str, timeout_s: float = 120.0) -> None:
    """Give a drained ``node`` back and wait until it takes jobs: resumed, it may show as not answering ("idle*")
    until slurmctld's next ping of it, and a test after this one would find the cluster a node short."""
    hook.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"])
    deadline = time.monotonic() + timeout_s
    while hook.node_states()[node] != "idle" and time.monotonic() < deadline:
        time.sleep(2)
    assert hook.node_states()[node] == "idle"
