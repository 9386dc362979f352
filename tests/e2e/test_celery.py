"""train_e2e under CeleryExecutor: a second local stack (own state, shifted ports) with Redis and two workers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from dtp.local.api import AirflowApi
from dtp.local.config import CELERY_QUEUES, PROJECT_ROOT, StackConfig

pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(2700)]
OFFSET = 500


@pytest.fixture(scope="module")
def celery_stack() -> Iterator[StackConfig]:
    home = PROJECT_ROOT / ".dtp" / f"it-celery-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "DTP_HOME": str(home),
        "DTP_PORT_OFFSET": str(OFFSET),
        "PYTHONPATH": str(PROJECT_ROOT / "plugins"),
    }
    cli = [sys.executable, "-m", "dtp.local.stack"]
    try:
        up = subprocess.run([*cli, "up", "--executor", "celery"], env=env, capture_output=True, text=True, timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        yield StackConfig(
            home=home.resolve(), ports=StackConfig.from_env().ports.with_offset(OFFSET), executor="celery"
        )
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=180)
        shutil.rmtree(home, ignore_errors=True)


def test_train_e2e_runs_on_both_celery_workers(celery_stack: StackConfig) -> None:
    api = AirflowApi(celery_stack.airflow_url, "admin", celery_stack.passwords()["admin"])
    api.wait_for_dag("train_e2e")
    run_id = api.trigger("train_e2e", {"max_steps": 200, "checkpoint_interval": 100})
    state = api.wait("train_e2e", run_id, timeout=900)
    assert state == "success", api.failures("train_e2e", run_id)
    tasks = api.task_instances("train_e2e", run_id)
    queues = {ti["task_id"]: ti["queue"] for ti in tasks if ti["state"] == "success"}
    # What submits Slurm jobs or touches the shared filesystem runs where it is mounted; the rest does not.
    training = {"train.run_job", "preflight.run_checks", "collect_metrics", "train.prepare_training", "save_checkpoint"}
    assert {task for task, queue in queues.items() if queue == "training"} >= training
    assert queues["validate_params"] == queues["train.pick_run_job_scheduler"] == "default"
    for role in CELERY_QUEUES:
        log = (celery_stack.log_dir / f"airflow-worker-{role}.log").read_text()
        assert log.count("received") >= (2 if role == "training" else 10), role
