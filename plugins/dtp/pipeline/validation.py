# TaskFlow wiring passes XComArgs where the task callables declare plain values: mypy cannot see through it.
# mypy: disable-error-code="arg-type,index"
"""validate_cluster: the preflight checks as a pipeline of their own, against a cluster that already exists.

    validate_params -> connect_cluster -> prepare_checks -> run_checks -> checks_done -> evaluate -> report, verdict
    cancel_jobs -> judge_run
        (checks_done passes on how run_checks ended, however it did: evaluate judges what the job left, which names
        a node whose fault ended it; the verdict does not wait on the report's publication)
        (cancel_jobs, a teardown of prepare_checks: no job of the run is left on the cluster; judge_run, a teardown
        without setups after every task: fails the run if a task failed, also when the run was marked failed,
        which skips the verdict; the teardowns go first in the queue)

The checks and the gate are train_e2e's preflight (dtp.pipeline.jobs,
dtp.pipeline.results); the report is its own page with the bandwidth sweep and
the versions of every node.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from airflow.sdk import DAG, TriggerRule, task
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from dtp.connections import AWS_CONN_ID, TRAINING_QUEUE
from dtp.form_params import ParamsError
from dtp.hooks.slurm import SlurmHook, usable
from dtp.hostlist import expand_hostlist
from dtp.metrics.preflight_gate import preflight_message
from dtp.naming import RunNames, expiry, resource_tags
from dtp.operators.report import ClusterValidationReportOperator
from dtp.operators.slurm import submit_prepared_slurm_job
from dtp.params import validate_cluster_params
from dtp.params_env import mask_extra_env
from dtp.pipeline import jobs, results
from dtp.pipeline.spec_tasks import spec_task
from dtp.pipeline.teardowns import end_with_judgement, schedule_teardowns_first
from dtp.recipes import instance_types

log = logging.getLogger(__name__)


def build_validation_spec(params: dict[str, Any], conf: dict[str, Any], names: RunNames) -> dict[str, Any]:
    """The spec the preflight job writers and the gate read, for the validation run whose jobs ``names`` names."""
    validated = validate_cluster_params({**params, **conf})
    return {
        "dag_id": names.dag_id,
        "run_id": names.run_id,
        "params": validated.model_dump(),
        "instance": instance_types()[validated.instance_type].model_dump(),
        "names": names.as_dict(),
        "tags": resource_tags(names, "cluster-validation", expiry(validated.expiry_hours)),
    }


def connect(spec: dict[str, Any]) -> dict[str, Any]:
    """The cluster behind the connection, checked to have the nodes the validation asks for."""
    params = spec["params"]
    hook = SlurmHook(params["slurm_conn_id"])
    try:
        transport = hook.extra.get("transport")
    except AirflowNotFoundException:
        raise ParamsError(f"slurm_conn_id: got {params['slurm_conn_id']!r}; no such Airflow connection") from None
    if transport is None:  # the hook would take it for this worker's own cluster, and validate that one instead
        raise ParamsError(
            f"slurm_conn_id: got {params['slurm_conn_id']!r}; its extra names no transport, so it is not a Slurm "
            'connection: give {"transport": "ssh", "ssh_conn_id": "<head node>"} (or "local" on the head node)'
        )
    if transport != "local" and not params["python"]:  # this worker's interpreter is not on the cluster's nodes
        raise ParamsError(
            f"python: empty; the cluster behind {params['slurm_conn_id']!r} is reached over {transport}: give the "
            "path of the interpreter with torch on its nodes"
        )
    if transport != "local" and spec["instance"]["platforms"] == ["local"]:  # no GPU check, a loopback floor
        raise ParamsError(
            f"instance_type: got {params['instance_type']!r}, the local profile's; the cluster behind "
            f"{params['slurm_conn_id']!r} is reached over {transport}: give its nodes' instance type "
            "(e.g. p5.48xlarge), which sets the GPU checks and the bandwidth floor"
        )
    states = hook.node_states()
    excluded = set(expand_hostlist(params["exclude_nodes"]))  # "n1,n[1-2]" excludes two nodes
    if unknown := excluded - set(states):  # sbatch would refuse the job for it
        raise ParamsError(
            f"exclude_nodes: got {params['exclude_nodes']!r}; the cluster behind {params['slurm_conn_id']!r} has "
            f"no node {', '.join(sorted(unknown))} (its nodes: {', '.join(sorted(states))})"
        )
    working = {node for node, state in states.items() if usable(state)}
    left = working - excluded
    if len(left) < params["num_nodes"]:
        raise ParamsError(
            f"num_nodes: got {params['num_nodes']}; the cluster behind {params['slurm_conn_id']!r} has "
            f"{len(working)} nodes that take jobs (of {len(states)}: the others are down, drained or failing), "
            f"{len(left)} once exclude_nodes={params['exclude_nodes']!r} is applied"
        )
    return {
        "platform": "existing",
        "scheduler": "slurm",
        "slurm_conn_id": params["slurm_conn_id"],
        "shared_dir": hook.shared_dir,
        "nodes": len(states),
        "python": params["python"] or sys.executable,
    }


@task
def validate_params(**context: Any) -> dict[str, Any]:
    """Refuse bad input before any job is submitted."""
    try:
        dag_run = context["dag_run"]
        spec = build_validation_spec(context["params"], dag_run.conf or {}, RunNames.from_dag_run(dag_run))
    except ParamsError as err:
        raise AirflowFailException(str(err)) from None
    # extra_env may hold tokens: masked in this task's log (the conf and the spec's XCom show them as given).
    mask_extra_env(spec["params"])
    return spec


@spec_task()
def connect_cluster(spec: dict[str, Any]) -> dict[str, Any]:
    """Reach the cluster behind slurm_conn_id and check it has the nodes asked for."""
    try:
        return connect(spec)
    except ParamsError as err:
        raise AirflowFailException(str(err)) from None


# It and evaluate read and write the cluster's shared filesystem: on the training queue, whose worker mounts it.
@spec_task(multiple_outputs=True, queue=TRAINING_QUEUE)
def prepare_checks(spec: dict[str, Any], cluster: dict[str, Any]) -> dict[str, str | None]:
    """Write the checks' Slurm job into the run's directory on the cluster; what submits it."""
    return jobs.prepare_preflight(spec, cluster, {"python": cluster["python"]})


# A task of its own: Airflow lets a task that follows a setup (evaluate, prepare_checks') run only on ALL_SUCCESS.
@task(trigger_rule=TriggerRule.ALL_DONE)
def checks_done(**context: Any) -> str | None:
    """The state run_checks ended in, whatever it was: a job a broken node ended still left the other nodes'
    results, which name it."""
    ti = context["ti"]
    states = ti.get_task_states(dag_id=ti.dag_id, task_ids=["run_checks"], run_ids=[ti.run_id])
    return states.get(ti.run_id, {}).get("run_checks")


@spec_task(queue=TRAINING_QUEUE)
def evaluate(
    spec: dict[str, Any], cluster: dict[str, Any], results_path: str, nccl_tests_path: str, run_checks_state: str
) -> dict[str, Any]:
    """Judge what the job left, however run_checks ended; failures are reported first and fail the run in
    ``verdict``."""
    try:
        return results.check_preflight(spec, cluster, results_path, nccl_tests_path)["result"]
    except FileNotFoundError:  # the job never ran, or Slurm ended it before any node wrote its result
        return {"failures": [f"no preflight results: run_checks {run_checks_state}"], "warnings": [], "allreduce": []}


@task
def verdict(result: dict[str, Any]) -> None:
    """Fail the run when a check failed (the report, beside it, lists them all); log the checks that could not
    run."""
    if result["failures"]:
        raise AirflowFailException(preflight_message(result["failures"]))
    if result.get("warnings"):
        log.warning("The cluster passed the checks that ran; not checked:\n%s", "\n".join(result["warnings"]))
    else:
        log.info("The cluster passed every check")


@spec_task(retries=3)
def cancel_jobs(spec: dict[str, Any], cluster: dict[str, Any]) -> list[str]:
    """Cancel every job of the run still on the cluster, and wait until Slurm lists none."""
    return SlurmHook.of_cluster(cluster).cancel_and_wait(spec["names"]["slurm_job"], prefix=True)


def validation_pipeline(dag: DAG) -> None:
    """Add validate_cluster's tasks to ``dag`` (call inside ``with DAG(...) as dag``)."""
    spec = validate_params()
    cluster = connect_cluster(spec)
    job = prepare_checks(spec, cluster)
    run = submit_prepared_slurm_job("run_checks", job)
    done = checks_done()
    run >> done
    result = evaluate(spec, cluster, job["results_path"], job["nccl_tests_path"], done)
    report = ClusterValidationReportOperator(task_id="report", spec=spec, result=result, aws_conn_id=AWS_CONN_ID)
    verdict(result)
    # No watcher here: the verdict fails the run when a check failed, and the teardown itself when the run's jobs
    # are still on the cluster.
    report >> cancel_jobs(spec, cluster).as_teardown(setups=job, on_failure_fail_dagrun=True)
    end_with_judgement(dag)
    schedule_teardowns_first(dag)
