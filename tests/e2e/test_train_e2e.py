"""train_e2e through the real scheduler, triggered over the REST API, on the running local stack.

Reads like a system test: trigger, wait, then check the outcome and that the run left nothing behind.
"""

from __future__ import annotations

import json
import re

import pytest
from report_links import report_through_link

from dtp.local.config import StackConfig
from dtp.naming import INSTALLATION_VARIABLE, RunNames
from dtp.pipeline.graph import ON_BATCH, ON_EKS
from dtp.recipes import get_recipe

pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(2700)]
FINAL_LOSS_MAX = get_recipe("tiny").gates.final_loss_max  # the recipe's own gate, which evaluate_gates applies
DAG_ID = "train_e2e"


def _task_log(api, run_id: str, task_id: str, try_number: int | None = None) -> str:
    return api.task_log(DAG_ID, run_id, task_id, try_number)


# The module's runs, triggered together (train_e2e runs four at once; unknown_key and missing_dataset end at once).
RUNS = {
    "success": {"profile_steps": 2},
    # Every relaunch repeats a deterministic failure, so the job and then the task fail; teardown must still run.
    "training_failure": {
        "max_steps": 20,
        "checkpoint_interval": 10,
        "hang_timeout_minutes": 1,
        "extra_env": {"DTP_FAIL_AT_STEP": "5"},
    },
    # Expect more all-reduce bandwidth than loopback gloo gives: the gate must stop the run before train.
    "preflight_failure": {"expected_busbw_gbps": 1000.0, "max_steps": 20, "checkpoint_interval": 10},
    "unknown_key": {"num_nodse": 2},
    # A dataset that is not there fails validate_params, not stage_data after the network and cluster exist.
    "missing_dataset": {"dataset_uri": "s3://dtp-no-such-dataset/corpus/"},
    # The emulator's SageMaker creates the HyperPod cluster; the stack's Slurm stands in for its controller's.
    "hyperpod": {"platform": "hyperpod", "instance_type": "m5.2xlarge"},
}


@pytest.fixture(scope="module")
def runs(airflow_api) -> dict[str, tuple[str, str, dict[str, str]]]:
    """Each of RUNS as (run id, final state, state of each task)."""
    airflow_api.wait_for_dag(DAG_ID)
    run_ids = {name: airflow_api.trigger(DAG_ID, conf) for name, conf in RUNS.items()}
    states = airflow_api.wait_all(DAG_ID, list(run_ids.values()), timeout=1200)
    return {
        name: (
            run_id,
            states[run_id],
            {ti["task_id"]: ti["state"] for ti in airflow_api.task_instances(DAG_ID, run_id)},
        )
        for name, run_id in run_ids.items()
    }


@pytest.fixture(scope="module")
def successful_run(runs):
    return runs["success"]


def test_run_succeeds_with_every_task(successful_run) -> None:
    _, state, tasks = successful_run
    assert state == "success", tasks
    assert tasks.pop("watcher") == "skipped"  # it only runs, and fails the run, when a task failed
    # The local cluster's scheduler is Slurm: the jobs ran as Slurm jobs, not as PyTorchJobs or Batch jobs.
    off_slurm = [f"{job}{suffix}" for job in ("preflight.run_checks", "train.run_job") for suffix in (ON_EKS, ON_BATCH)]
    assert {tasks.pop(task) for task in off_slurm} == {"skipped"}
    assert all(s == "success" for s in tasks.values()), tasks


def test_loss_goes_down_and_gates_hold(airflow_api, successful_run) -> None:
    run_id, _, _ = successful_run
    metrics = airflow_api.xcom(DAG_ID, run_id, "collect_metrics")
    assert metrics["last_step"] == 300 and metrics["world_size"] == 2
    assert metrics["final_loss"] < metrics["first_loss"] - 2.0
    assert metrics["final_loss"] < FINAL_LOSS_MAX


def test_checkpoints_on_the_shared_filesystem(airflow_api, successful_run, stack: StackConfig) -> None:
    run_id, _, _ = successful_run
    run_key = airflow_api.xcom(DAG_ID, run_id, "validate_params")["names"]["run_key"]
    ckpt = stack.shared_dir / "runs" / run_key / "checkpoints"
    steps = sorted(int(p.name.split("_")[1]) for p in ckpt.glob("step_*") if (p / "meta.json").exists())
    assert steps[-1] == 300 and len(steps) == 2  # the trainer keeps the newest two
    assert list(ckpt.glob("tmp-*")) == []
    assert any(f.suffix == ".distcp" for f in (ckpt / "step_300").iterdir())


def test_the_newest_checkpoint_is_saved_to_the_artifacts_bucket(airflow_api, successful_run, aws) -> None:
    run_id, _, _ = successful_run
    saved = airflow_api.xcom(DAG_ID, run_id, "save_checkpoint")
    assert saved["saved"] and saved["step"] == 300
    bucket, prefix = saved["uri"].removeprefix("s3://").split("/", 1)
    manifest = json.loads(aws("s3").get_object(Bucket=bucket, Key=prefix + "MANIFEST.json")["Body"].read())
    assert manifest["step"] == 300 and {f["path"].split("/")[0] for f in manifest["files"]} == {"step_300"}
    assert any(f["path"].endswith(".distcp") for f in manifest["files"])
    report = airflow_api.xcom(DAG_ID, run_id, "report")
    bucket, key = report["uri"].removeprefix("s3://").split("/", 1)
    assert saved["uri"] in aws("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def test_the_run_is_recorded_in_the_history_with_its_verdict(airflow_api, successful_run, aws) -> None:
    run_id, _, _ = successful_run
    run_key = airflow_api.xcom(DAG_ID, run_id, "validate_params")["names"]["run_key"]
    bucket = airflow_api.xcom(DAG_ID, run_id, "collect_metrics")["metrics_uri"].removeprefix("s3://").split("/")[0]
    listed = aws("s3").list_objects_v2(Bucket=bucket, Prefix="history/tiny/local/local.cpu/")["Contents"]
    (key,) = [o["Key"] for o in listed if o["Key"].endswith(f"-{run_key}.json")]
    entry = json.loads(aws("s3").get_object(Bucket=bucket, Key=key)["Body"].read())
    assert (entry["passed"], entry["last_step"], entry["dataset_uri"], entry["profile_steps"]) == (True, 300, "", 2)


@pytest.fixture(scope="module")
def resumed_run(airflow_api, successful_run) -> tuple[str, dict[str, str]]:
    """A run resuming from the successful run's saved checkpoint (step 300) up to step 400."""
    saved = airflow_api.xcom(DAG_ID, successful_run[0], "save_checkpoint")
    run_id = airflow_api.trigger(DAG_ID, {"resume_from": saved["uri"], "max_steps": 400})
    airflow_api.wait(DAG_ID, run_id, timeout=900)
    return run_id, {ti["task_id"]: ti["state"] for ti in airflow_api.task_instances(DAG_ID, run_id)}


def test_a_run_resumes_from_the_checkpoint_an_earlier_run_saved(airflow_api, run_leftovers, resumed_run) -> None:
    run_id, tasks = resumed_run
    # Its gates judge 100 steps of an already trained model; what matters here is where training started.
    assert tasks["stage_data"] == tasks["train.run_job"] == tasks["collect_metrics"] == "success", tasks
    restored = airflow_api.xcom(DAG_ID, run_id, "stage_data")["checkpoint"]
    assert restored["step"] == 300 and restored["copied"] == restored["files"] >= 3
    assert '\\"resumed_from_step\\": 300' in _task_log(airflow_api, run_id, "train.run_job")
    metrics = airflow_api.xcom(DAG_ID, run_id, "collect_metrics")
    assert metrics["steps"][0] > 300 and metrics["last_step"] == 400
    assert metrics["final_loss"] < FINAL_LOSS_MAX
    assert airflow_api.xcom(DAG_ID, run_id, "save_checkpoint")["step"] == 400
    assert run_leftovers(DAG_ID, run_id) == {}


def test_a_run_names_its_resources_with_the_installations_id(airflow_api, resumed_run) -> None:
    # An earlier run (the first on this stack) set the id; this run, started after the module's others, names with it.
    installation = airflow_api.variable(INSTALLATION_VARIABLE)
    assert re.fullmatch("[0-9a-f]{8}", installation or ""), installation
    run_id, _ = resumed_run
    names = airflow_api.xcom(DAG_ID, run_id, "validate_params")["names"]
    assert names == RunNames(DAG_ID, run_id, 0, installation).as_dict()
    assert names["run_key"] != RunNames(DAG_ID, run_id).run_key


def test_report_in_s3_and_linked_from_the_ui(airflow_api, successful_run, aws) -> None:
    run_id, _, _ = successful_run
    report = airflow_api.xcom(DAG_ID, run_id, "report")
    bucket, key = report["uri"].removeprefix("s3://").split("/", 1)
    obj = aws("s3").get_object(Bucket=bucket, Key=key)
    html = obj["Body"].read().decode()
    assert obj["ContentType"].startswith("text/html")
    assert "PASSED" in html
    for plot in ("loss", "throughput", "busbw"):  # plus "trend" once comparable runs exist
        assert f'<img alt="{plot}" src="data:image/png;base64,' in html
    assert "PASSED" in report_through_link(airflow_api, DAG_ID, run_id, "Training report")


def test_profile_traces_are_uploaded_with_the_run(airflow_api, successful_run, aws) -> None:
    metrics = airflow_api.xcom(DAG_ID, successful_run[0], "collect_metrics")
    traces = metrics["profile"]["traces"]
    assert [t.rsplit("/", 1)[1] for t in traces] == ["trace-rank0.json", "trace-rank1.json"]
    bucket, key = traces[0].removeprefix("s3://").split("/", 1)
    assert b'"traceEvents"' in aws("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def test_training_log_streams_into_the_task_log(airflow_api, successful_run) -> None:
    run_id, _, _ = successful_run
    log = _task_log(airflow_api, run_id, "train.run_job")
    assert log.count("[slurm ") > 100 and '\\"event\\": \\"step\\"' in log


def test_nothing_of_the_run_is_left(run_leftovers, successful_run) -> None:
    assert run_leftovers(DAG_ID, successful_run[0]) == {}


def test_training_failure_still_tears_down(airflow_api, run_leftovers, runs) -> None:
    run_id, state, tasks = runs["training_failure"]
    assert state == "failed"
    assert tasks["train.run_job"] == "failed"
    assert tasks["save_checkpoint"] == "success"  # it looked, before teardown: the job failed before its first one
    assert airflow_api.xcom(DAG_ID, run_id, "save_checkpoint")["saved"] is False
    assert tasks["report"] == "skipped"  # no metrics to report on: it says so, and fails nothing
    assert tasks["teardown_cluster"] == "success" and tasks["teardown_network"] == "success"
    assert tasks["watcher"] == "failed"
    logs = _task_log(airflow_api, run_id, "train.run_job", 1) + _task_log(airflow_api, run_id, "train.run_job", 2)
    assert "injected failure at step 5" in logs
    assert run_leftovers(DAG_ID, run_id) == {}


def test_preflight_failure_stops_before_training_and_tears_down(airflow_api, run_leftovers, runs) -> None:
    run_id, state, tasks = runs["preflight_failure"]
    assert state == "failed"
    assert tasks["preflight.check_preflight"] == "failed"
    assert tasks["train.prepare_training"] == "upstream_failed" and tasks["train.run_job"] == "upstream_failed"
    assert tasks["teardown_cluster"] == "success" and tasks["teardown_network"] == "success"
    log = _task_log(airflow_api, run_id, "preflight.check_preflight")
    assert "(80% of the expected 1000.0 GB/s)" in log and "TOO LOW" in log
    assert run_leftovers(DAG_ID, run_id) == {}


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ("unknown_key", "num_nodse: unknown parameter"),
        ("missing_dataset", "dataset_uri: cannot list s3://dtp-no-such-dataset/corpus/: NoSuchBucket"),
    ],
)
def test_bad_input_is_refused_before_anything_exists(airflow_api, run_leftovers, runs, run: str, message: str) -> None:
    run_id, state, tasks = runs[run]
    assert state == "failed" and tasks["validate_params"] == "failed"
    assert message in _task_log(airflow_api, run_id, "validate_params")
    assert tasks["watcher"] == "failed" and "failed: validate_params;" in _task_log(airflow_api, run_id, "watcher")
    assert tasks["deploy_network.create_stack"] == "upstream_failed"
    assert tasks["teardown_network"] in ("upstream_failed", "skipped")
    assert run_leftovers(DAG_ID, run_id) == {}


def test_schema_violation_is_refused_at_trigger(airflow_api) -> None:
    airflow_api.wait_for_dag(DAG_ID)
    before = airflow_api.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?limit=1")[1]["total_entries"]
    status, body = airflow_api.request(
        "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {"num_nodes": 0}}
    )
    assert status == 400 and "num_nodes" in json.dumps(body)
    assert airflow_api.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?limit=1")[1]["total_entries"] == before


def test_hyperpod_run_creates_its_cluster_waits_for_it_and_deletes_it(airflow_api, run_leftovers, runs) -> None:
    run_id, state, tasks = runs["hyperpod"]
    assert state == "success", tasks
    cluster = airflow_api.xcom(DAG_ID, run_id, "deploy_cluster")
    run_key = airflow_api.xcom(DAG_ID, run_id, "validate_params")["names"]["run_key"]
    assert (cluster["platform"], cluster["cluster_name"]) == ("hyperpod", run_key)
    assert cluster["cluster_arn"].startswith("arn:aws:sagemaker:us-east-1:123456789012:cluster/")
    log = _task_log(airflow_api, run_id, "deploy_cluster")
    assert f"HyperPod cluster {run_key} is InService" in log  # the trigger's event, after the task deferred
    assert airflow_api.xcom(DAG_ID, run_id, "collect_metrics")["final_loss"] < FINAL_LOSS_MAX
    assert airflow_api.xcom(DAG_ID, run_id, "teardown_cluster")["deleted_cluster"] is True
    assert run_leftovers(DAG_ID, run_id) == {}
