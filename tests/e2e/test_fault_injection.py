"""Fault injection: train_e2e with a fault at each of its tasks in turn, on the local stack.

Faults are injected by dtp.faults' listener in the real task processes, from a
plan file the stack's Airflow reads (``DTP_FAULT_PLAN``):

- transient: one run in which the first try of every task fails, by exception
  or SIGKILL, before or after the task's work. Retries must recover the run,
  reusing what the failed try created: one network stack, one preflight and
  one training job.
- persistent: for each task before the teardowns, a run in which that task
  fails on every try (a create task failing after it created its resource
  included). The run must fail at that task, the teardowns must have run
  unless the run failed before anything could exist, and nothing of the run
  may be left.

These runs go concurrently, as train_e2e's max_active_runs allows. Then runs
against an emulator that throttles, is briefly unavailable or refuses a call,
one at a time. Every run is then checked for leftovers in the emulator and on
Slurm. The counts go to test-artifacts/fault_injection.json.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from dtp.faults import Fault, FaultPlan, fired_faults
from dtp.hooks.slurm import SlurmHook
from dtp.local.emulator import FAULTS_PATH
from dtp.pipeline.graph import ON_BATCH, ON_EKS

pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(2700), pytest.mark.fault_injection]
DAG_ID = "train_e2e"
# The recovered run trains the recipe's full 300 steps, so its gates pass; failing runs stop early anyway.
RECOVERED_CONF = {"hang_timeout_minutes": 2}
FAILING_CONF = {"max_steps": 20, "checkpoint_interval": 10, "hang_timeout_minutes": 2}
TEARDOWNS = ("teardown_cluster", "teardown_network")
# Transient faults cycle through these (kind, when) pairs, task by task.
TRANSIENT = (("exception", "before"), ("sigkill", "after"), ("exception", "after"), ("sigkill", "before"))
# Persistent faults: a non-retryable failure, except where retries are the point.
PERSISTENT = {
    "deploy_cluster": ("exception", "before"),  # retryable: all retries are used up, then teardown
    "train.run_job": ("sigkill", "after"),  # the job completes, the task dies on every try
    "deploy_network.create_stack": ("fatal", "after"),  # the stack exists, its setup task failed
}
# The emulator playing a control plane that throttles and is briefly unavailable (botocore retries absorb these)
# and refuses one call once (the task's retry absorbs it).
FLAKY_CONTROL_PLANE = [
    {"service": "cloudformation", "action": "CreateStack", "code": "ServiceUnavailable", "status": 503, "times": 2},
    {"service": "cloudformation", "action": "DescribeStacks", "code": "Throttling", "status": 400, "times": 3},
    {"service": "s3", "code": "SlowDown", "status": 503, "times": 3},
    {"service": "ec2", "action": "DescribeVpcs", "code": "RequestLimitExceeded", "status": 503, "times": 2},
    {"service": "cloudformation", "action": "ValidateTemplate", "code": "AccessDenied", "status": 403, "times": 1},
]
RESULTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "fault_injection.json"


@pytest.fixture(scope="module")
def pipeline_tasks(airflow_api) -> list[str]:
    """train_e2e's task ids, as the scheduler knows them, less those no worker runs on the local profile: the
    watcher, the joins (the scheduler ends an EmptyOperator itself) and the PyTorchJob and Batch job tasks
    (skipped on Slurm)."""
    airflow_api.wait_for_dag(DAG_ID)
    _, body = airflow_api.request("GET", f"/api/v2/dags/{DAG_ID}/tasks")
    tasks = [t["task_id"] for t in body["tasks"]]
    assert {"validate_params", "train.run_job", "train.run_job_on_eks", "train.run_job_on_batch", *TEARDOWNS} <= set(
        tasks
    )
    not_run = {t["task_id"] for t in body["tasks"] if t["operator_name"] == "EmptyOperator"} | {"watcher"}
    return [t for t in tasks if t not in not_run and not t.endswith((ON_EKS, ON_BATCH))]


@pytest.fixture(scope="module")
def ledger(stack):
    """Collects each run's outcome and writes the suite's JSON record at the end."""
    plan_path = stack.fault_plan
    FaultPlan().write(plan_path)
    runs: list[dict] = []
    yield plan_path, runs, stack
    plan_path.unlink(missing_ok=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "injected_faults": sum(len(r["fired"]) + sum(e["hits"] for e in r["emulator_errors"]) for r in runs),
                "runs": len(runs),
                "leaked_resources": sum(len(ids) for r in runs for ids in r["leftovers"].values()),
                "details": runs,
            },
            indent=1,
        )
    )


def _emulator_rules(stack, method: str, rules: list[dict] | None = None) -> list[dict]:
    """Set (PUT), read (GET) or clear (DELETE) the emulator's error rules (dtp.local.emulator)."""
    data = json.dumps({"rules": rules}).encode() if rules is not None else None
    req = urllib.request.Request(stack.moto_url + FAULTS_PATH, data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["rules"]


def _add_faults(plan_path: Path, run_id: str, faults: list[dict]) -> None:
    plan = FaultPlan.read(plan_path)
    FaultPlan(faults=plan.faults + [Fault(dag_id=DAG_ID, run_id=run_id, **f) for f in faults]).write(plan_path)


def _outcome(api, run_leftovers, ledger, name: str, run_id: str, state: str, emulator_hits: list[dict]) -> dict:
    """What one run did and left, recorded in the ledger."""
    plan_path, runs, _ = ledger
    tis = api.task_instances(DAG_ID, run_id)
    outcome = {
        "name": name,
        "run_id": run_id,
        "state": state,
        "tasks": {ti["task_id"]: ti["state"] for ti in tis},
        "tries": {ti["task_id"]: ti["try_number"] for ti in tis},
        "fired": [f for f in fired_faults(plan_path) if f["run_id"] == run_id],
        "emulator_errors": emulator_hits,
        "leftovers": run_leftovers(DAG_ID, run_id),
    }
    runs.append(outcome)
    return outcome


def _run_id(name: str) -> str:
    return f"faults__{name}__{uuid.uuid4().hex[:6]}"


def _run_with_emulator_errors(api, run_leftovers, ledger, name: str, conf: dict, rules: list[dict]) -> dict:
    """One run while the emulator answers with ``rules``' errors (which are global: no other run may be active)."""
    _, _, stack = ledger
    run_id = _run_id(name)
    _emulator_rules(stack, "PUT", rules)
    try:
        api.trigger(DAG_ID, conf, run_id=run_id)
        state = api.wait(DAG_ID, run_id, timeout=1200)
    finally:
        emulator_hits = [r for r in _emulator_rules(stack, "GET") if r["hits"]]
        _emulator_rules(stack, "DELETE")
    return _outcome(api, run_leftovers, ledger, name, run_id, state, emulator_hits)


def _task_log(api, run_id: str, task_id: str) -> str:
    return api.task_log(DAG_ID, run_id, task_id, try_number=1)  # the try the fault was injected into


PERSISTENT_TASKS = [
    "validate_params",
    "resolve_images",
    "deploy_network.plan_stack",
    "deploy_network.create_stack",
    "deploy_network.wait_for_stack",
    "deploy_network.stack_outputs",
    "deploy_cluster",
    "stage_data",
    "record_resources",
    "preflight.prepare_preflight",
    "preflight.pick_run_checks_scheduler",
    "preflight.run_checks",
    "preflight.check_preflight",
    "train.prepare_training",
    "train.pick_run_job_scheduler",
    "train.run_job",
    "collect_metrics",
    "evaluate_gates",
    "save_checkpoint",
    "report",
]


def _persistent_fault(task_id: str) -> dict:
    kind, when = PERSISTENT.get(task_id, ("fatal", "before"))
    return {"task_id": task_id, "kind": kind, "when": when, "tries": "all"}


@pytest.fixture(scope="module")
def planned_runs(airflow_api, run_leftovers, ledger, pipeline_tasks) -> dict[str, dict]:
    """The transient run and one persistent run per task, run concurrently (as many as train_e2e allows at once).

    All their faults are in the plan before the first is triggered; each strikes only its own run.
    """
    plan_path, _, _ = ledger
    _, body = airflow_api.request("GET", f"/api/v2/dags/{DAG_ID}/tasks")
    branches = {t["task_id"] for t in body["tasks"] if t["operator_name"] == "@task.branch"}
    assert branches == {"preflight.pick_run_checks_scheduler", "train.pick_run_job_scheduler"}
    planned = {
        "transient": (
            [
                # A branch's execute ends by raising the skip of the tasks it did not pick: no post-execute
                # follows it, so its fault strikes before.
                {"task_id": task, "kind": kind, "when": "before" if task in branches else when, "tries": [1]}
                for task, (kind, when) in zip(pipeline_tasks, TRANSIENT * len(pipeline_tasks), strict=False)
            ],
            RECOVERED_CONF,
        ),
        **{task: ([_persistent_fault(task)], FAILING_CONF) for task in PERSISTENT_TASKS},
    }
    run_ids = {name: _run_id(name) for name in planned}
    for name, (faults, _) in planned.items():
        _add_faults(plan_path, run_ids[name], faults)
    for name, (_, conf) in planned.items():
        airflow_api.trigger(DAG_ID, conf, run_id=run_ids[name])
    states = airflow_api.wait_all(DAG_ID, list(run_ids.values()), timeout=2400)
    return {
        name: _outcome(airflow_api, run_leftovers, ledger, name, run_id, states[run_id], [])
        for name, run_id in run_ids.items()
    }


def test_a_transient_fault_at_every_task_is_recovered(planned_runs, pipeline_tasks, run_names) -> None:
    run = planned_runs["transient"]
    assert sorted(f["task_id"] for f in run["fired"]) == sorted(pipeline_tasks)
    assert run["state"] == "success", run["tasks"]
    assert all(run["tasks"][t] == "success" and run["tries"][t] == 2 for t in pipeline_tasks), run["tries"]
    # Retries reused what the failed tries created: one job each, though both tasks were retried.
    run_key = run_names(DAG_ID, run["run_id"])["run_key"]
    jobs = SlurmHook().ended_jobs(run_key, prefix=True)
    assert sorted(job.name for job in jobs) == [run_key, f"{run_key}-preflight"], jobs
    assert run["leftovers"] == {}


def test_the_persistent_list_covers_the_pipeline(pipeline_tasks) -> None:
    assert sorted(PERSISTENT_TASKS) == sorted(t for t in pipeline_tasks if t not in (*TEARDOWNS, "judge_run"))


@pytest.mark.parametrize("task_id", PERSISTENT_TASKS)
def test_a_persistent_fault_fails_the_run_and_leaves_nothing(airflow_api, planned_runs, task_id) -> None:
    run = planned_runs[task_id]
    fault = _persistent_fault(task_id)
    assert run["state"] == "failed"
    assert run["tasks"][task_id] == "failed"
    assert run["tasks"]["watcher"] == "failed"
    assert run["tasks"]["judge_run"] == "failed"
    assert {f["task_id"] for f in run["fired"]} == {task_id}
    if fault["kind"] != "sigkill":
        expected = f"injected {fault['kind']} fault {fault['when']} {task_id}"
        assert expected in _task_log(airflow_api, run["run_id"], task_id)
    # Both teardowns ran once plan_stack, the first setup, had succeeded; before it nothing existed to tear down.
    planned = run["tasks"]["deploy_network.plan_stack"] == "success"
    for teardown in TEARDOWNS:
        assert run["tasks"][teardown] in (("success",) if planned else ("skipped", "upstream_failed")), run["tasks"]
    assert run["leftovers"] == {}


# The emulator's error rules are global, so these runs go one at a time, after the planned runs have ended.
def test_a_flaky_control_plane_is_recovered(airflow_api, run_leftovers, ledger) -> None:
    run = _run_with_emulator_errors(
        airflow_api, run_leftovers, ledger, "flaky-aws", RECOVERED_CONF, FLAKY_CONTROL_PLANE
    )
    assert run["state"] == "success", run["tasks"]
    hits = {(e["service"], e["action"]): e["hits"] for e in run["emulator_errors"]}
    assert hits == {(r["service"], r.get("action")): r["times"] for r in FLAKY_CONTROL_PLANE}, hits
    assert run["tries"]["deploy_network.plan_stack"] == 2  # AccessDenied is not retried by botocore
    assert run["tries"]["deploy_network.create_stack"] == 1  # 503s are
    assert run["leftovers"] == {}


def test_a_refusing_control_plane_fails_the_run_and_leaves_nothing(airflow_api, run_leftovers, ledger) -> None:
    refuse = [{"service": "cloudformation", "action": "CreateStack", "code": "AccessDenied", "status": 403}]
    run = _run_with_emulator_errors(airflow_api, run_leftovers, ledger, "refusing-aws", FAILING_CONF, refuse)
    assert run["state"] == "failed"
    assert run["tasks"]["deploy_network.create_stack"] == "failed" and run["tries"]["deploy_network.create_stack"] == 3
    assert run["tasks"]["teardown_cluster"] == "success" and run["tasks"]["teardown_network"] == "success"
    assert "AccessDenied" in _task_log(airflow_api, run["run_id"], "deploy_network.create_stack")
    assert run["leftovers"] == {}
