"""The regression DAGs (dtp.pipeline.factory): one per recipe, scheduled or on demand, and their guard that keeps a
backfill run from running beside another run of the same size (dtp.sensors.other_runs)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG
from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

from dtp.pipeline import factory
from dtp.pipeline.graph import training_pipeline
from dtp.recipes import catalogue
from dtp.sensors import other_runs

GUARD, TEARDOWN = "wait_for_other_runs", "teardown_network"


@pytest.fixture(scope="module")
def dags() -> dict[str, DAG]:
    return factory.regression_dags()


def test_every_recipe_has_a_regression_dag_on_its_schedule_or_on_demand(dags: dict[str, DAG]) -> None:
    recipes = catalogue()
    assert set(dags) == {f"regression__{name}" for name in recipes}
    for name, recipe in recipes.items():
        dag = dags[f"regression__{name}"]
        # The GPU sizes set no schedule: their DAG never starts a run by itself.
        assert dag.schedule == recipe.schedule
        assert dag.max_active_runs == 1 and not dag.catchup
    assert dags["regression__tiny"].schedule == "@daily" and dags["regression__llama3_1_70b"].schedule is None


def test_a_regression_run_waits_for_other_runs_before_it_creates_anything(dags: dict[str, DAG]) -> None:
    dag = dags["regression__llama3_2_1b"]
    guard = dag.get_task(GUARD)
    assert isinstance(guard, other_runs.OtherRunsSensor)
    assert guard.upstream_task_ids == {"validate_params"} and "resolve_images" in guard.downstream_task_ids
    # Every other task comes after it: a waiting run has created nothing.
    assert guard.get_flat_relative_ids(upstream=False) == set(dag.task_ids) - {"validate_params", GUARD}
    assert guard.mode == "reschedule" and guard.poke_interval == 60 and guard.last_task_id == TEARDOWN


def test_train_e2e_runs_side_by_side() -> None:
    with DAG("side_by_side", schedule=None, start_date=datetime(2026, 1, 1)) as dag:
        training_pipeline(dag)
    assert GUARD not in dag.task_ids


class FakeTi:
    """The Task SDK calls the guard makes, answered from ``runs`` (run id: its state, and its guard's and last
    teardown's states), each checked against RuntimeTaskInstance's signature. ``after`` replaces ``runs`` once the
    guard read the task states that many times."""

    def __init__(self, run_id: str, runs: Mapping[str, tuple[str, str | None, str | None]], after: Any = None) -> None:
        self.dag_id, self.task_id, self.run_id = "regression__tiny", GUARD, run_id
        self.runs, self.after, self.reads = runs, after, 0

    @staticmethod
    def _check(name: str, *args: Any, **kwargs: Any) -> None:
        inspect.signature(getattr(RuntimeTaskInstance, name)).bind(*args, **kwargs)

    def get_dr_count(self, *args: Any, **kwargs: Any) -> int:
        self._check("get_dr_count", *args, **kwargs)
        assert kwargs == {"dag_id": self.dag_id, "states": ["running"]}
        return sum(state == "running" for state, _, _ in self.runs.values())

    def get_task_states(self, *args: Any, **kwargs: Any) -> dict[str, dict[str, str | None]]:
        self._check("get_task_states", *args, **kwargs)
        assert kwargs == {"dag_id": self.dag_id, "task_ids": [GUARD, TEARDOWN]}
        self.reads += 1
        answer = {run_id: {GUARD: guard, TEARDOWN: teardown} for run_id, (_, guard, teardown) in self.runs.items()}
        if self.after and self.reads >= self.after[0]:
            self.runs = self.after[1]
        return answer

    def get_dagrun_state(self, *args: Any) -> str:
        self._check("get_dagrun_state", *args)
        return self.runs[args[1]][0]


def in_the_way(ti: FakeTi) -> list[str]:
    return other_runs.runs_in_the_way(ti, TEARDOWN, settle_s=1, poll_s=0.01)


ME = "scheduled__2026-12-07"


def test_a_run_alone_goes_on() -> None:
    assert in_the_way(FakeTi(ME, {ME: ("running", "running", None)})) == []


@pytest.mark.parametrize(
    ("other", "waits"),
    [
        (("running", "success", None), True),  # it holds the DAG: past its guard, not torn down
        (("running", "success", "running"), True),
        (("running", "success", "success"), False),  # torn down: only its report and judgement are left
        (("running", "up_for_reschedule", None), False),  # it waits, for this run among others
        (("running", None, None), False),  # not at its guard yet: it will wait for this one
        (("failed", "success", None), False),  # marked failed by hand, its teardown never ran
    ],
)
def test_a_run_waits_for_a_running_run_that_passed_its_guard(other: tuple[str, str, str | None], waits: bool) -> None:
    # A backfill run beside a scheduled one: Airflow counts them apart, so both may be running.
    backfill_run = "backfill__2026-11-20"
    ti = FakeTi(ME, {ME: ("running", "running", None), backfill_run: other})
    assert in_the_way(ti) == ([backfill_run] if waits else [])


def test_of_two_runs_checking_at_once_exactly_one_goes_on() -> None:
    first, second = "backfill__2026-11-20", "scheduled__2026-12-07"
    both_checking = {first: ("running", "running", None), second: ("running", "running", None)}
    # The run whose id sorts first waits out the other's check, which ends waiting (it found this one checking).
    settled = {first: ("running", "running", None), second: ("running", "up_for_reschedule", None)}
    assert in_the_way(FakeTi(first, both_checking, after=(2, settled))) == []
    assert in_the_way(FakeTi(second, both_checking)) == [first]
    # Had the other's check passed meanwhile, it holds the DAG.
    passed = {first: ("running", "running", None), second: ("running", "success", None)}
    assert in_the_way(FakeTi(first, both_checking, after=(2, passed))) == [second]


def test_a_check_that_does_not_end_leaves_the_run_waiting() -> None:
    first, second = "backfill__2026-11-20", "scheduled__2026-12-07"
    stuck = {first: ("running", "running", None), second: ("running", "running", None)}
    assert in_the_way(FakeTi(first, stuck)) == [second]


def test_the_sensor_pokes_true_only_when_nothing_is_in_the_way() -> None:
    sensor = other_runs.OtherRunsSensor(task_id=GUARD, last_task_id=TEARDOWN)
    alone: Any = {"ti": FakeTi(ME, {ME: ("running", "running", None)})}
    assert sensor.poke(alone) is True
    held: Any = {"ti": FakeTi(ME, {ME: ("running", "running", None), "manual__1": ("running", "success", None)})}
    assert sensor.poke(held) is False


PROBE = """
import json
from datetime import datetime, timezone

from airflow.sdk import DAG, task

from dtp.sensors.other_runs import OtherRunsSensor

with DAG("guard_probe", schedule=None, start_date=datetime(2026, 1, 1)) as dag:
    @task
    def teardown_network() -> None:
        pass

    guard = OtherRunsSensor(task_id="wait_for_other_runs", last_task_id="teardown_network", poke_interval=1, timeout=3)
    guard >> teardown_network()

if __name__ == "__main__":
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models import DagRun, TaskInstance
    from airflow.models.dagbundle import DagBundleModel
    from airflow.utils.session import create_session

    with create_session() as session:
        session.add(DagBundleModel(name="dags-folder"))
    sync_bag_to_db(DagBag(dag_folder=__file__), "dags-folder", None)

    def states(run_id):
        with create_session() as session:
            return {ti.task_id: ti.state for ti in session.query(TaskInstance).filter_by(run_id=run_id)}

    first = dag.test(run_after=datetime(2026, 1, 1, tzinfo=timezone.utc))
    alone = states(first.run_id)
    with create_session() as session:  # as if it still ran, past its guard, before its last teardown
        session.query(DagRun).filter_by(run_id=first.run_id).update({"state": "running"})
        session.query(TaskInstance).filter_by(run_id=first.run_id, task_id="teardown_network").update({"state": None})
    second = dag.test(run_after=datetime(2026, 1, 2, tzinfo=timezone.utc))
    print("PROBE", json.dumps({"alone": alone, "held": states(second.run_id)}))
"""


def test_the_sensor_reads_other_runs_through_airflows_execution_api(tmp_path) -> None:
    # The Task SDK calls, answered by Airflow's own execution API (dag.test runs it in process) over a fresh database.
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    env["PYTHONPATH"] = str(Path(other_runs.__file__).parents[2])  # the plugins folder
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{tmp_path}/airflow.db"
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    (tmp_path / "guard_probe.py").write_text(PROBE)
    probe = subprocess.run(
        [sys.executable, str(tmp_path / "guard_probe.py")], env=env, capture_output=True, text=True, timeout=300
    )
    assert probe.returncode == 0, probe.stderr[-4000:]
    [line] = [line for line in probe.stdout.splitlines() if line.startswith("PROBE ")]
    found = json.loads(line.removeprefix("PROBE "))
    assert found["alone"] == {GUARD: "success", TEARDOWN: "success"}
    # The first run holds the DAG: the second waits for it until its sensor times out.
    assert found["held"] == {GUARD: "failed", TEARDOWN: "upstream_failed"}
    assert "Waiting for run(s) manual__2026-01-01T00:00:00+00:00 of this DAG" in probe.stdout + probe.stderr
