"""Every DAG file imports cleanly and every DAG carries what operators of this project rely on."""

from __future__ import annotations

import ast
import itertools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.models.dagrun import DagRun
from airflow.models.taskinstance import TaskInstance
from airflow.sdk.exceptions import AirflowFailException
from airflow.task.priority_strategy import validate_and_load_priority_weight_strategy
from airflow.utils.file import find_path_from_directory
from airflow.utils.state import State

from dtp.params import TrainParams
from dtp.pipeline.teardowns import judge_run

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
HEAVY_MODULES = {"torch", "pandas", "matplotlib", "boto3", "botocore", "numpy", "requests"}


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(dag_folder=str(DAGS_DIR))


def test_no_import_errors(dagbag: DagBag) -> None:
    assert dagbag.import_errors == {}


def test_expected_dags_present(dagbag: DagBag) -> None:
    assert {"train_e2e", "reaper", "validate_cluster", "ami_bake", "container_build"} <= set(dagbag.dags)


@pytest.mark.parametrize("dag_id", ["train_e2e"])
def test_dag_conventions(dagbag: DagBag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    assert dag.owner == "dtp"
    assert "dtp" in dag.tags
    assert dag.doc_md and len(dag.doc_md) > 40
    for t in dag.tasks:
        assert t.retries >= 1 or t.task_id in ("validate_params", "watcher"), f"{t.task_id} has no retries"


def test_every_dag_is_documented_and_owned(dagbag: DagBag) -> None:
    for dag_id, dag in dagbag.dags.items():
        assert dag.owner == "dtp", dag_id
        assert dag.tags, dag_id
        assert dag.doc_md, dag_id
        assert dag.default_args.get("retries", 0) >= 1, dag_id


def test_train_e2e_graph_order(dagbag: DagBag) -> None:
    dag = dagbag.dags["train_e2e"]
    order = [
        "validate_params",
        "resolve_images",
        "deploy_network.plan_stack",
        "deploy_network.create_stack",
        "deploy_network.wait_for_stack",
        "deploy_network.stack_outputs",
        "deploy_cluster",
        "stage_data",
        "preflight.prepare_preflight",
        "preflight.run_checks",
        "preflight.check_preflight",
        "train.prepare_training",
        "train.run_job",
        "collect_metrics",
        "evaluate_gates",
        "report",
    ]
    for upstream, downstream in itertools.pairwise(order):
        assert upstream in dag.get_task(downstream).get_flat_relative_ids(upstream=True), f"{upstream} !-> {downstream}"


@pytest.mark.parametrize("group, job", [("preflight", "run_checks"), ("train", "run_job")])
def test_the_clusters_scheduler_picks_who_runs_each_job(dagbag: DagBag, group: str, job: str) -> None:
    dag = dagbag.dags["train_e2e"]
    pick, done = dag.get_task(f"{group}.pick_{job}_scheduler"), dag.get_task(f"{group}.{job}_done")
    runners = {dag.get_task(f"{group}.{job}{suffix}").task_type for suffix in ("", "_on_eks", "_on_batch")}
    assert runners == {"SlurmSubmitJobOperator", "EksPyTorchJobOperator", "BatchJobOperator"}
    ids = {f"{group}.{job}{suffix}" for suffix in ("", "_on_eks", "_on_batch")}
    assert pick.downstream_task_ids == ids
    assert dag.get_task(f"{group}.{job}").queue == "training"
    assert dag.get_task(f"{group}.{job}_on_batch").deferrable
    # The ones skipped must not skip what follows; what reads the cluster's files waits on the join alone.
    assert done.upstream_task_ids == ids and done.trigger_rule == "none_failed_min_one_success"
    follower = dag.get_task("preflight.check_preflight" if group == "preflight" else "collect_metrics")
    assert done.task_id in follower.upstream_task_ids and not ids & follower.upstream_task_ids


def test_teardowns_are_teardowns_of_their_setups(dagbag: DagBag) -> None:
    dag = dagbag.dags["train_e2e"]
    cluster_down, network_down = dag.get_task("teardown_cluster"), dag.get_task("teardown_network")
    assert cluster_down.is_teardown and network_down.is_teardown
    plan, stack, cluster = (
        dag.get_task(t) for t in ("deploy_network.plan_stack", "deploy_network.create_stack", "deploy_cluster")
    )
    assert plan.is_setup and stack.is_setup and cluster.is_setup
    # plan_stack creates nothing, so the teardowns also run when a create task failed after creating something.
    assert {"deploy_network.plan_stack", "deploy_cluster"} <= cluster_down.upstream_task_ids
    assert {"deploy_network.plan_stack", "deploy_network.create_stack"} <= network_down.upstream_task_ids
    assert "teardown_cluster" in network_down.upstream_task_ids, "cluster must go before the network"


def _cleared_with(dag, task_id: str) -> set[str]:
    """The tasks Airflow clears with ``task_id`` (the UI's Clear with "downstream", the default)."""
    return set(dag.partial_subset(task_id, include_downstream=True, include_upstream=False).task_dict)


def test_a_cleared_task_rebuilds_everything_its_teardowns_deleted(dagbag: DagBag) -> None:
    # Once the teardowns ran, training again needs the whole chain that rebuilds the network and the cluster:
    # with only the tasks that create them, deploy_cluster would start on the deleted stack's subnets and the new
    # cluster would have neither the data nor the job script.
    dag = dagbag.dags["train_e2e"]
    rebuilt = {
        *("deploy_network.plan_stack", "deploy_network.create_stack", "deploy_network.wait_for_stack"),
        *("deploy_network.stack_outputs", "deploy_cluster", "stage_data", "train.prepare_training"),
        *("train.run_job", "collect_metrics", "save_checkpoint", "teardown_cluster", "teardown_network"),
        # The report shows the rebuilt cluster's ids, not the deleted one's.
        "record_resources",
    }
    assert rebuilt <= _cleared_with(dag, "train.run_job")
    assert {"preflight.prepare_preflight", "stage_data", "deploy_cluster", "record_resources"} <= _cleared_with(
        dag, "preflight.run_checks"
    )


@pytest.mark.parametrize("task_id", ["evaluate_gates", "report"])
def test_judging_or_reporting_again_rebuilds_nothing(dagbag: DagBag, task_id: str) -> None:
    dag = dagbag.dags["train_e2e"]
    assert _cleared_with(dag, task_id) <= {task_id, "report", "watcher", "judge_run"}


def test_the_checkpoint_is_saved_after_training_however_it_ended_and_before_the_cluster_goes(dagbag: DagBag) -> None:
    dag = dagbag.dags["train_e2e"]
    saved = dag.get_task("save_checkpoint")
    # A teardown of deploy_cluster alone: it runs when training failed, and is skipped when there is no cluster.
    assert saved.is_teardown and saved.trigger_rule == "all_done_setup_success"
    assert {"deploy_cluster", "train.run_job_done", "collect_metrics"} <= saved.upstream_task_ids
    assert "save_checkpoint" in dag.get_task("teardown_cluster").upstream_task_ids
    assert "save_checkpoint" in dag.get_task("report").upstream_task_ids
    assert saved.queue == "training"


def test_validate_cluster_fails_when_its_jobs_stay_and_touches_the_shared_filesystem_on_the_training_queue(
    dagbag: DagBag,
) -> None:
    dag = dagbag.dags["validate_cluster"]
    cancel = dag.get_task("cancel_jobs")
    assert cancel.is_teardown and cancel.on_failure_fail_dagrun
    assert {dag.get_task(t).queue for t in ("prepare_checks", "evaluate")} == {"training"}


def test_validate_cluster_judges_what_a_failed_check_job_left_and_its_verdict_waits_on_no_report(
    dagbag: DagBag,
) -> None:
    # A broken node can end the job: the other nodes' results still name it, in the report and the verdict. A
    # report that could not be published hides no verdict.
    dag = dagbag.dags["validate_cluster"]
    assert dag.get_task("checks_done").trigger_rule == "all_done"
    assert dag.get_task("checks_done").upstream_task_ids == {"run_checks"}
    assert {"checks_done", "prepare_checks"} <= dag.get_task("evaluate").upstream_task_ids
    assert dag.get_task("verdict").upstream_task_ids == {"evaluate"}
    assert dag.get_task("report").upstream_task_ids == {"validate_params", "evaluate"}
    assert "report" in dag.get_task("cancel_jobs").upstream_task_ids


def test_watcher_fails_the_run_when_any_task_fails(dagbag: DagBag) -> None:
    dag = dagbag.dags["train_e2e"]
    watcher = dag.get_task("watcher")
    assert watcher.trigger_rule == "one_failed"
    # A branch would skip the watcher; a failed pick reaches it as its job's upstream_failed.
    picks = {t.task_id for t in dag.tasks if t.task_id.endswith("_scheduler")}
    judged = {t.task_id for t in dag.tasks if not t.is_setup} - {"watcher", "judge_run"} - picks
    assert picks and watcher.upstream_task_ids == judged


def _dags_with_teardowns(dagbag: DagBag) -> list[str]:
    return sorted(dag_id for dag_id, dag in dagbag.dags.items() if any(t.is_teardown for t in dag.tasks))


@dataclass(frozen=True)
class _Ended:
    """A task instance as DagRun.update_state reads it."""

    task_id: str
    state: str


def _judged_by(dag, states: dict[str, str]) -> set[_Ended]:
    """The task instances Airflow judges a run of ``dag`` by once its tasks ended in ``states``
    (``DagRun.update_state``: the leaves, less the teardowns without on_failure_fail_dagrun)."""
    return DagRun()._tis_for_dagrun_state(dag=dag, tis=[_Ended(*item) for item in states.items()])


def _run_state(dag, states: dict[str, str]) -> str:
    """The state Airflow gives a run of ``dag`` whose tasks ended in ``states``: failed when one it judges the run by
    failed, else success."""
    return "failed" if any(ti.state in State.failed_states for ti in _judged_by(dag, states)) else "success"


def _marked_failed_while(dag, running: str) -> dict[str, str]:
    """How the tasks of ``dag`` end when its run is marked failed while ``running`` runs (mark_tasks'
    _set_dag_run_terminal_state): the running task fails, those after it are skipped but for the teardowns, which
    run (those of a setup that had succeeded; skipped where none had), judge_run last, on the states of the others."""
    before = dag.get_task(running).get_flat_relative_ids(upstream=True)
    states = {t.task_id: "success" if t.task_id in before else "skipped" for t in dag.tasks if not t.is_teardown}
    states[running] = "failed"
    for teardown in (t for t in dag.tasks if t.is_teardown and t.task_id != "judge_run"):
        setups = [u.task_id for u in teardown.upstream_list if u.is_setup]
        states[teardown.task_id] = "success" if any(states[s] == "success" for s in setups) else "skipped"

    class RunningJudge:
        dag_id, task_id, run_id = dag.dag_id, "judge_run", "manual__1"

        def get_task_states(self, *, dag_id: str, task_ids: list[str], run_ids: list[str]) -> dict:
            return {self.run_id: {task_id: states[task_id] for task_id in task_ids}}

    try:
        judge_run.function(ti=RunningJudge(), dag=dag)
        states["judge_run"] = "success"
    except AirflowFailException:
        states["judge_run"] = "failed"
    return states


def test_every_dag_with_teardowns_is_judged_by_a_teardown_that_fails_the_run(dagbag: DagBag) -> None:
    # Marking a run failed skips every task yet to run but the teardowns: only a teardown can judge it then.
    for dag_id in _dags_with_teardowns(dagbag):
        dag = dagbag.dags[dag_id]
        judges = {dag.get_task(ti.task_id) for ti in _judged_by(dag, dict.fromkeys(dag.task_ids, "success"))}
        assert any(t.is_teardown and t.on_failure_fail_dagrun for t in judges), dag_id


@pytest.mark.parametrize(
    "dag_id, running",
    [
        ("train_e2e", "validate_params"),
        ("train_e2e", "deploy_network.wait_for_stack"),
        ("train_e2e", "train.run_job"),
        ("regression__tiny", "train.run_job"),
        ("validate_cluster", "run_checks"),
    ],
)
def test_a_run_marked_failed_ends_failed(dagbag: DagBag, dag_id: str, running: str) -> None:
    dag = dagbag.dags[dag_id]
    assert _run_state(dag, _marked_failed_while(dag, running)) == "failed"


def test_a_run_whose_tasks_succeeded_ends_successful(dagbag: DagBag) -> None:
    dag = dagbag.dags["train_e2e"]
    # The jobs ran on Slurm (the other schedulers' tasks were skipped); no task failed, so the watcher was skipped.
    skipped = {t.task_id for t in dag.tasks if t.task_id.endswith(("_on_eks", "_on_batch"))} | {"watcher"}
    states = {t.task_id: "skipped" if t.task_id in skipped else "success" for t in dag.tasks}
    assert _run_state(dag, states) == "success"


def test_teardowns_go_first_in_the_queue(dagbag: DagBag) -> None:
    # Slots are few (core.parallelism): a teardown waiting behind other runs' tasks keeps a cluster up. Airflow
    # orders the tasks it queues by their weight, from the task's weight rule.
    def weight(task) -> int:
        as_scheduled = cast("TaskInstance", SimpleNamespace(task=task))  # all a weight rule reads of a task instance
        return validate_and_load_priority_weight_strategy(task.weight_rule).get_weight(as_scheduled)

    teardowns: list[tuple[int, str, str]] = []
    others: list[tuple[int, str, str]] = []
    for dag_id in sorted(dagbag.dags):
        for t in dagbag.dags[dag_id].tasks:
            (teardowns if t.is_teardown else others).append((weight(t), dag_id, t.task_id))
    assert {dag_id for _, dag_id, _ in teardowns} == set(_dags_with_teardowns(dagbag))
    assert min(teardowns) > max(others), (min(teardowns), max(others))
    train_e2e = {task_id: w for w, dag_id, task_id in others if dag_id == "train_e2e"}
    # The others keep the downstream rule's order: a run's first tasks before the last ones.
    assert train_e2e["validate_params"] > train_e2e["deploy_cluster"] > train_e2e["train.run_job"] > train_e2e["report"]


def test_train_e2e_form(dagbag: DagBag) -> None:
    params = dagbag.dags["train_e2e"].params
    assert set(params.keys()) == set(TrainParams.model_fields)
    for name in TrainParams.model_fields:
        param = params.get_param(name)
        assert param.schema.get("title") and param.description, name
    assert "tiny" in params.get_param("recipe").schema["enum"]
    assert params.get_param("platform").schema["enum"] == ["local", "parallelcluster", "hyperpod", "eks", "batch"]
    assert params.get_param("num_nodes").schema["minimum"] == 1


@pytest.mark.parametrize("path", sorted(DAGS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_dag_files_import_nothing_heavy_at_top_level(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in HEAVY_MODULES, f"{path.name} imports {name} at top level"


# What parsing a DAG file must not load: paramiko (the Slurm trigger's, 0.13 s: its tasks import it when they run),
# the ECR/SSM image lookups, and for validate_cluster the whole training graph. (boto3 still loads: the Batch
# operator subclasses the amazon provider's, and the report's module imports its S3Hook.)
NOT_AT_PARSE = {
    "train_e2e": {"paramiko", "dtp.triggers.slurm", "dtp.images.container"},
    "validate_cluster": {"paramiko", "dtp.triggers.slurm", "dtp.images.container", "dtp.pipeline.graph"},
}


@pytest.mark.parametrize("dag_file", sorted(NOT_AT_PARSE))
def test_parsing_a_dag_file_loads_only_what_its_tasks_need_to_be_declared(dag_file: str, tmp_path: Path) -> None:
    # In a fresh interpreter, as the DAG processor parses a file: this one has imported everything already.
    code = f"import sys; sys.path[:0] = {[str(DAGS_DIR.parent / 'plugins'), str(DAGS_DIR)]!r}; import {dag_file}; "
    code += "print(' '.join(sys.modules))"
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert NOT_AT_PARSE[dag_file] & set(loaded.stdout.split()) == set()


def test_airflow_runs_only_the_plugin_module_of_the_plugins_folder() -> None:
    # Airflow runs each .py file it finds there as a top-level module named after the file; the dtp package's
    # modules would be imported a second time, and shadow others of the same name (the standard library's trace).
    plugins = DAGS_DIR.parent / "plugins"
    found = find_path_from_directory(str(plugins), ".airflowignore", "glob")
    assert sorted(Path(f).relative_to(plugins).as_posix() for f in found if f.endswith(".py")) == ["dtp_plugin.py"]


def test_one_regression_dag_per_recipe(dagbag: DagBag) -> None:
    from dtp.recipes import catalogue

    recipes = catalogue()
    assert any(r.schedule for r in recipes.values()), "at least one recipe is scheduled"
    generated = {d.removeprefix("regression__") for d in dagbag.dags if d.startswith("regression__")}
    assert generated == set(recipes)  # a recipe without a schedule: its DAG runs on demand (scripts/backfill)
    for name, recipe in recipes.items():
        dag = dagbag.dags[f"regression__{name}"]
        assert dag.params.get_param("recipe").schema["enum"] == [name]
        assert dag.params["num_nodes"] == recipe.defaults.num_nodes
        assert dag.params["max_steps"] == recipe.defaults.max_steps
        assert dag.schedule == recipe.schedule
        assert not dag.catchup and dag.max_active_runs == 1
        assert {"watcher", "wait_for_other_runs"} <= set(dag.task_ids)


def test_a_broken_recipe_costs_only_its_own_dag(tmp_path, monkeypatch) -> None:
    import shutil

    from dtp.pipeline import factory

    for name in ("tiny.yaml", "tiny_deep.yaml"):
        shutil.copy(factory.RECIPE_DIR / name, tmp_path / name)
    (tmp_path / "tiny_deep.yaml").write_text("name: tiny_deep\nframework: [unclosed\n")
    # A recipe that validates, with a default the trigger form refuses (at most 512 nodes).
    wide = (factory.RECIPE_DIR / "tiny.yaml").read_text().replace("name: tiny\n", "name: tiny_wide\n")
    (tmp_path / "tiny_wide.yaml").write_text(wide.replace("  num_nodes: 2\n", "  num_nodes: 1000\n"))
    assert "num_nodes: 1000" in (tmp_path / "tiny_wide.yaml").read_text()
    nightly = (factory.RECIPE_DIR / "tiny.yaml").read_text().replace("name: tiny\n", "name: tiny_nightly\n")
    (tmp_path / "tiny_nightly.yaml").write_text(re.sub(r"(?m)^schedule: .*$", 'schedule: "nightly"', nightly))
    assert 'schedule: "nightly"' in (tmp_path / "tiny_nightly.yaml").read_text()
    monkeypatch.setattr(factory, "RECIPE_DIR", tmp_path)
    assert list(factory.regression_dags()) == ["regression__tiny"]
