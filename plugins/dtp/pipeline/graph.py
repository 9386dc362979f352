# TaskFlow wiring passes XComArgs where the task callables declare plain values: mypy cannot see through it.
# mypy: disable-error-code="arg-type,index,list-item"
"""The training pipeline as Airflow tasks: one builder, used by every training DAG.

    validate_params -> resolve_images -> deploy_network (plan, create, wait, outputs) -> deploy_cluster -> stage_data
      -> preflight -> train -> collect_metrics -> evaluate_gates -> report
    (a regression DAG waits in wait_for_other_runs between validate_params and resolve_images while another of
    its runs holds it; preflight and train each prepare their job, then the cluster's scheduler picks who runs it:
    sbatch, a PyTorchJob on EKS or a Batch job; the others are skipped)
    save_checkpoint -> teardown_cluster -> teardown_network -> judge_run
        (teardowns of deploy_cluster / plan_stack, deploy_cluster, stage_data and the two prepare_* jobs /
        plan_stack, create_stack, its wait and stack_outputs: clearing any of those clears its teardowns too;
        judge_run, a teardown without setups after every task, fails the run if a task failed, also when the
        run was marked failed, which skips the watcher; the teardowns go first in the queue)
    watcher                                (fails the run as soon as a task failed)

The task callables are thin: each calls one step function of dtp.pipeline.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, TaskGroup, TriggerRule, task
from airflow.sdk.exceptions import AirflowFailException

from dtp.connections import AWS_CONN_ID, TRAINING_QUEUE
from dtp.form_params import ParamsError
from dtp.metrics.preflight_gate import preflight_message
from dtp.naming import RunNames
from dtp.operators.batch import BatchJobOperator
from dtp.operators.checkpoints import SaveCheckpointOperator
from dtp.operators.cluster import DeployClusterOperator, TeardownClusterOperator
from dtp.operators.pytorchjob import EksPyTorchJobOperator
from dtp.operators.report import TrainingReportOperator
from dtp.operators.slurm import PENDING_TIMEOUT_S, submit_prepared_slurm_job
from dtp.params import NODES_OUTLIVE_RUNS
from dtp.params_env import mask_extra_env
from dtp.pipeline import checkpoints, data, jobs, network, results
from dtp.pipeline.spec import build_spec, tear_down_earlier_incarnations
from dtp.pipeline.spec_tasks import spec_task
from dtp.pipeline.teardowns import end_with_judgement, schedule_teardowns_first, tasks_to_follow
from dtp.platforms import get_platform
from dtp.platforms.base import PlatformNotReady
from dtp.recipes import RecipeError
from dtp.sensors.other_runs import OtherRunsSensor
from dtp.sensors.stacks import StackCreatedSensor

log = logging.getLogger(__name__)
# Suffixes of the tasks that run a prepared job off Slurm: as a PyTorchJob (``scheduler: kubernetes``), as an
# AWS Batch job (``scheduler: batch``).
ON_EKS, ON_BATCH = "_on_eks", "_on_batch"


@task
def validate_params(**context: Any) -> dict[str, Any]:
    """Refuse bad input, with field, value and what is allowed, before anything is created."""
    from dtp.images.container import framework_image_problem  # boto3, through SSM: not when a DAG file is parsed

    try:
        dag_run = context["dag_run"]
        names = RunNames.from_dag_run(dag_run)
        spec = build_spec(context["params"], dag_run.conf or {}, names)
        # extra_env may hold tokens: masked in this task's log (the conf and the spec's XCom show them as given).
        mask_extra_env(spec["params"])
        # For the metrics history: a backfilled run, a scheduled one and each incarnation of a run, told apart.
        logical_date = dag_run.logical_date.isoformat() if dag_run.logical_date else None
        spec |= {"logical_date": logical_date, "run_type": dag_run.run_type.value, "incarnation": names.incarnation}
        spec["resume"] = checkpoints.resume_source(spec, AWS_CONN_ID)
        # Another framework's recipe runs from its own image: refused here when its platform has none published.
        checks = (data.dataset_problem(spec, AWS_CONN_ID), framework_image_problem(spec, AWS_CONN_ID))
        if problems := [problem for problem in checks if problem]:
            raise ParamsError.from_problems(*problems)
    except (ParamsError, RecipeError, ValueError, PlatformNotReady) as err:
        raise AirflowFailException(str(err)) from None
    if spec["resume"]:
        log.info("Resuming from %s (step %s of run %s)", *(spec["resume"][k] for k in ("uri", "step", "from_run")))
    log.info(
        "Run %s: estimated cost %.2f USD; training time limit %d min (budget_usd, expiry_hours)",
        spec["names"]["run_key"],
        spec["estimated_cost_usd"],
        spec["training_time_limit_minutes"],
    )
    return spec


@spec_task()
def resolve_images(spec: dict[str, Any]) -> dict[str, str]:
    """The newest image and AMI published by container_build/ami_bake (SSM), for a backfill run the newest at its
    logical date (logged, with their versions): the recipe's framework's image, with where the framework is in it,
    or for DTP's trainer the platform's training image, else its default runtime."""
    from dtp.images.container import resolve_runtime  # boto3, through SSM: not when a DAG file is parsed

    platform = get_platform(spec["params"]["platform"])
    try:
        runtime = resolve_runtime(platform, spec, AWS_CONN_ID)
    except PlatformNotReady as err:
        raise AirflowFailException(str(err)) from None
    log.info("Training runtime: %s", runtime)
    return runtime


@spec_task()
def plan_stack(spec: dict[str, Any]) -> str:
    """Validate the network template with CloudFormation before anything exists; the stack's name."""
    return network.plan_network_stack(spec, AWS_CONN_ID)


@spec_task()
def create_stack(spec: dict[str, Any]) -> str:
    """Start creating the network stack (a VPC, or only the data bucket where the run makes none), or find the one
    an earlier try started; the ``wait`` sensor waits for it."""
    return network.create_network_stack(spec, AWS_CONN_ID)


@spec_task()
def stack_outputs(spec: dict[str, Any]) -> dict[str, str]:
    """The network stack's outputs: subnets, security groups, the run's data bucket."""
    return network.network_outputs(spec, AWS_CONN_ID)


# It writes into the cluster's shared filesystem: on the training queue, whose worker has it mounted.
@spec_task(queue=TRAINING_QUEUE)
def stage_data(spec: dict[str, Any], network_outputs: dict[str, str], cluster: dict[str, Any]) -> dict[str, Any]:
    """The dataset, and the checkpoint the run resumes from, onto the cluster's shared filesystem."""
    staged = data.stage_data(spec, network_outputs, cluster, AWS_CONN_ID)
    if spec["resume"]:
        staged["checkpoint"] = checkpoints.restore_checkpoint(spec, cluster, AWS_CONN_ID)
    return staged


@task
def record_resources(
    network_outputs: dict[str, str], cluster: dict[str, Any], staged: dict[str, Any]
) -> dict[str, Any]:
    """What the run created and used, in one XCom for the report."""
    return {"network": network_outputs, "cluster": cluster, "data": staged}


@spec_task(multiple_outputs=True, queue=TRAINING_QUEUE)
def prepare_preflight(spec: dict[str, Any], cluster: dict[str, Any], images: dict[str, str]) -> dict[str, str | None]:
    """Write the preflight job (node checks, all-reduce sweep) into the run's directory; what submits it."""
    return jobs.prepare_preflight(spec, cluster, images)


@spec_task(queue=TRAINING_QUEUE)
def check_preflight(
    spec: dict[str, Any], cluster: dict[str, Any], results_path: str, nccl_tests_path: str
) -> dict[str, Any]:
    """Judge the preflight results: the task fails naming every node and check that failed."""
    checked = results.check_preflight(spec, cluster, results_path, nccl_tests_path)
    if checked["failures"]:
        outlive = spec["params"]["platform"] in NODES_OUTLIVE_RUNS
        raise AirflowFailException(preflight_message(checked["failures"], nodes_outlive_runs=outlive))
    return checked["result"]


@spec_task(multiple_outputs=True, queue=TRAINING_QUEUE)
def prepare_training(
    spec: dict[str, Any],
    cluster: dict[str, Any],
    images: dict[str, str],
    staged: dict[str, Any],
    preflight: dict[str, Any] | None,
) -> dict[str, Any]:
    """Write the training job (batch script or manifest, and its config) into the run's directory; on a cluster
    whose nodes outlive runs, its Slurm job runs only on the nodes ``preflight`` (the gate's result) checked."""
    return jobs.prepare_training(spec, cluster, images, staged, preflight)


@spec_task(queue=TRAINING_QUEUE)
def collect_metrics(
    spec: dict[str, Any], cluster: dict[str, Any], images: dict[str, Any], metrics_path: str, profile_dir: str
) -> dict[str, Any]:
    """Parse the job's metrics and store them in the artifacts bucket; their summary, for the gates and the report
    (compared with past runs of the same recipe content, runtime and hardware)."""
    return results.collect_metrics(spec, cluster, images, metrics_path, AWS_CONN_ID, profile_dir)


@spec_task()
def evaluate_gates(spec: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Fail the run when the recipe's gates or the comparison with comparable past runs fail."""
    failures = results.gate_failures(spec, metrics)
    if failures:
        raise AirflowFailException("gates failed:\n" + "\n".join(failures))
    log.info("All gates passed")


@spec_task(retries=3)
def teardown_network(spec: dict[str, Any]) -> dict[str, Any]:
    """Delete the network stack and the run's data bucket, and sweep what the stack's deletion left behind; then
    those of the run's earlier incarnations, kept or not."""
    done = network.teardown_network(spec, AWS_CONN_ID)
    retired = tear_down_earlier_incarnations(spec, lambda earlier: network.destroy_network(earlier, AWS_CONN_ID))
    return done | ({"earlier_incarnations": retired} if retired else {})


@task(trigger_rule=TriggerRule.ONE_FAILED, retries=0)
def watcher(**context: Any) -> None:
    """Fail the run as soon as any task failed, naming the tasks that had failed by then.

    The report may be skipped (no metrics) and teardowns do not decide a run's
    state, so without this a failed training could end in a "successful" run.
    The same idiom as the amazon provider's system tests; ``judge_run`` judges
    the run again once every task is done.
    """
    ti = context["ti"]
    try:
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id, {})
        failed = ", ".join(sorted(task for task, state in states.items() if state == "failed"))
    except Exception:  # the run fails all the same; only the names are missing
        log.exception("Could not read the run's task states")
        failed = ""
    raise AirflowFailException(f"failed: {failed or 'a task of this run'}; see that task's log for why")


def submit_prepared_batch_job(task_id: str, job: Any, **kwargs: Any) -> BatchJobOperator:
    """Submit a Batch job prepared by ``dtp.pipeline.jobs`` (its XCom keys are the operator's arguments)."""
    return BatchJobOperator(
        task_id=task_id,
        job_name=job["job_name"],
        job_queue=job["job_queue"],
        job_definition=job["job_definition"],
        node_overrides=job["node_overrides"],
        submit_job_timeout=job["timeout_s"],
        tags=job["tags"],
        aws_conn_id=AWS_CONN_ID,
        deferrable=True,
        **kwargs,
    )


@task.branch
def pick_scheduler(cluster: dict[str, Any], runners: dict[str, str]) -> str:
    """The task that runs the prepared job on the cluster's scheduler; the others are skipped."""
    return runners[cluster["scheduler"]]


def run_prepared_job(task_id: str, job: Any, cluster: Any, *, time_limit: bool = False, **kwargs: Any) -> EmptyOperator:
    """Run a job prepared by ``dtp.pipeline.jobs`` (its XCom keys are the operators' arguments) as a Slurm job, a
    PyTorchJob (``task_id`` + ``_on_eks``) or a Batch job (+ ``_on_batch``), as the cluster's scheduler picks;
    return the task that joins them (tasks fed by ``deploy_cluster``, a setup, must keep ALL_SUCCESS, which a
    skipped upstream defeats)."""
    # Slurm stops the job once it has used the time budget_usd pays for and the expiry leaves (the PyTorchJob's
    # deadline and the Batch job definition's timeout say so).
    limit = {"time_limit_minutes": job["time_limit_minutes"]} if time_limit else {}
    runners = {
        "slurm": submit_prepared_slurm_job(task_id, job, **limit, **kwargs),
        "kubernetes": EksPyTorchJobOperator(
            task_id=task_id + ON_EKS,
            manifest=job["manifest"],
            cluster_name=job["cluster_name"],
            aws_conn_id=AWS_CONN_ID,
            hang_timeout=job["hang_timeout_s"],
            pending_timeout=PENDING_TIMEOUT_S,
            **kwargs,
        ),
        "batch": submit_prepared_batch_job(task_id + ON_BATCH, job, **kwargs),
    }
    pick = pick_scheduler.override(task_id=f"pick_{task_id}_scheduler")(
        cluster, {scheduler: runner.task_id for scheduler, runner in runners.items()}
    )
    done = EmptyOperator(task_id=f"{task_id}_done", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    job >> pick >> list(runners.values()) >> done
    return done


def training_pipeline(dag: DAG, *, one_run_at_a_time: bool = False) -> None:
    """Add the pipeline's tasks to ``dag`` (call inside ``with DAG(...) as dag``); with ``one_run_at_a_time``, a
    run waits before it creates anything while another run of the DAG, a backfill run included, holds it."""
    spec = validate_params()
    images = resolve_images(spec)
    if one_run_at_a_time:  # Airflow counts a backfill's runs apart from the DAG's max_active_runs
        spec >> OtherRunsSensor(task_id="wait_for_other_runs", last_task_id="teardown_network") >> images

    with TaskGroup("deploy_network", tooltip="VPC, subnets, EFA security group, S3 bucket (CloudFormation)"):
        plan = plan_stack(spec)
        stack = create_stack(spec)
        plan >> stack
        # The provider's CloudFormationCreateStackSensor, failing at once with CloudFormation's reasons when the
        # stack failed (rolled back) or is gone, instead of "bad state" without a cause or poking until its timeout.
        wait = StackCreatedSensor(
            task_id="wait_for_stack",
            stack_name=stack,
            aws_conn_id=AWS_CONN_ID,
            mode="reschedule",
            poke_interval=15,
            timeout=3600,
        )
        outputs = stack_outputs(spec)
        images >> plan
        wait >> outputs

    deploy = DeployClusterOperator(task_id="deploy_cluster", spec=spec, network=outputs, images=images)
    cluster = deploy.output
    staged = stage_data(spec, outputs, cluster)
    resources = record_resources(outputs, cluster, staged)

    with TaskGroup("preflight", tooltip="environment screen and all-reduce bus bandwidth on every node"):
        pf_job = prepare_preflight(spec, cluster, images)
        pf_run = run_prepared_job("run_checks", pf_job, cluster)
        pf_result = check_preflight(spec, cluster, pf_job["results_path"], pf_job["nccl_tests_path"])
        pf_run >> pf_result
    staged >> pf_job

    with TaskGroup("train", tooltip="training on Slurm, EKS or Batch, resumable from checkpoints"):
        job = prepare_training(spec, cluster, images, staged, pf_result)
        # A job stopped at the time budget_usd pays for is not retried.
        run = run_prepared_job("run_job", job, cluster, time_limit=True, retries=1)

    metrics = collect_metrics(spec, cluster, images, job["metrics_path"], job["profile_dir"])
    run >> metrics
    # Recorded once training is over: a task cleared after the teardowns ran rebuilds the network and the cluster
    # under new ids, and clears this with it (it is downstream), so the report shows what the run trained on.
    metrics >> resources
    gates = evaluate_gates(spec, metrics)
    # A teardown of deploy_cluster: it runs once training is over, however it ended, while the cluster still exists.
    # It reads the cluster's shared filesystem: on the training queue, like stage_data.
    saved = SaveCheckpointOperator(
        task_id="save_checkpoint", spec=spec, cluster=cluster, aws_conn_id=AWS_CONN_ID, queue=TRAINING_QUEUE, retries=3
    ).as_teardown(setups=[deploy])
    [run, metrics] >> saved
    report = TrainingReportOperator(
        task_id="report",
        spec=spec,
        metrics=metrics,
        preflight=pf_result,
        run_resources=resources,
        checkpoint=saved.output,
        aws_conn_id=AWS_CONN_ID,
        trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS,
    )
    gates >> report

    # A teardown runs when at least one of its setups succeeded. plan_stack creates nothing and succeeds before
    # anything exists, so both teardowns also run when create_stack or deploy_cluster failed after creating.
    # Every task that builds what a teardown deletes is one of its setups: clearing a task after the teardowns
    # ran (train.run_job, say) re-runs the whole chain that rebuilds the network and the cluster it needs, not
    # only the tasks that create them (Airflow clears a cleared task's setups, not the tasks between them).
    # It waits in the triggerer while the platform deletes the clusters (ParallelCluster, HyperPod).
    cluster_down = TeardownClusterOperator(task_id="teardown_cluster", spec=spec, retries=3).as_teardown(
        setups=[plan, deploy, staged, pf_job, job]
    )
    network_down = teardown_network(spec).as_teardown(setups=[plan, stack, wait, outputs])
    # The gates and the report read XComs and write to the artifacts bucket: the cluster does not wait for them,
    # and clearing one to judge or render again rebuilds nothing.
    saved >> cluster_down >> network_down
    # Setups may only be followed by ALL_SUCCESS tasks, and a branch skips every task it does not pick that follows
    # it: their failures reach the watcher as upstream_failed.
    tasks_to_follow(dag) >> watcher()
    end_with_judgement(dag)
    schedule_teardowns_first(dag)
