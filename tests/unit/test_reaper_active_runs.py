"""The reaper never deletes what a DAG run still queued or running uses, whatever its ``dtp:expires-at``: a task
cleared days later (``train.run_job`` after the teardowns ran rebuilds the network and cluster) recreates its resources
with the expiry its run's ``validate_params`` fixed. How a run's state is asked (``run_is_active``, through the Task
SDK), how one active run keeps all of its resources, and where a Slurm job's comment names its run."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowRuntimeError, ErrorType
from airflow.sdk.execution_time.comms import ErrorResponse
from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

from dtp.naming import INSTALLATION_TAG, RunNames, expiry, parse_expiry, parse_slurm_comment, resource_tags
from dtp.pipeline import jobs
from dtp.reaper.active_runs import run_is_active, spare_active_runs, spare_other_installations
from dtp.reaper.cluster import find_expired_on_worker_mount
from dtp.reaper.expired import Expired

EXPIRED = "2026-12-01T00:00:00Z"
INSTALLATION = "0a1b2c3d"  # the reaper's
LIVE_RUN, DONE_RUN = "manual__2026-12-01T00:00:00+00:00", "manual__2026-11-30T00:00:00+00:00"


def live_only(dag_id: str, run_id: str) -> bool:
    return run_id == LIVE_RUN


def test_one_resource_naming_a_running_run_keeps_all_of_that_runs_resources(caplog) -> None:
    found = [
        Expired("stack", "dtp-a-network", "dtp-a", EXPIRED, "train_e2e", LIVE_RUN),
        Expired("vpc", "vpc-1", "dtp-a", EXPIRED),  # names no run: its run's network sweep would take it all the same
        Expired("stack", "dtp-b-network", "dtp-b", EXPIRED, "train_e2e", DONE_RUN),
        Expired("vpc", "vpc-2", "dtp-c", EXPIRED),
    ]
    with caplog.at_level(logging.INFO, logger="dtp.reaper.active_runs"):
        kept = spare_active_runs(found, live_only)
    assert [item.name for item in kept] == ["dtp-b-network", "vpc-2"]
    assert (
        f"keeping vpc vpc-1 of run dtp-a: expired {EXPIRED} but its run {LIVE_RUN} of train_e2e is still running"
        in (caplog.text)
    )


def test_another_installations_run_keeps_all_its_resources_for_a_day_past_their_expiry(caplog) -> None:
    now = parse_expiry(EXPIRED) + timedelta(hours=23)
    long_gone = expiry(-25, now)
    found = [
        Expired("stack", "dtp-a-network", "dtp-a", EXPIRED, "train_e2e", LIVE_RUN, "other"),
        Expired("vpc", "vpc-1", "dtp-a", long_gone, installation="other"),  # its run's other resource keeps it too
        Expired("stack", "dtp-b-network", "dtp-b", long_gone, "train_e2e", DONE_RUN, "other"),
        Expired("stack", "dtp-c-network", "dtp-c", EXPIRED, "train_e2e", DONE_RUN, "this"),
        Expired("stack", "dtp-d-network", "dtp-d", EXPIRED),  # made before resources named their installation
    ]
    with caplog.at_level(logging.INFO, logger="dtp.reaper.active_runs"):
        kept = spare_other_installations(found, "this", now)
    assert [item.name for item in kept] == ["dtp-b-network", "dtp-c-network", "dtp-d-network"]
    assert f"keeping vpc vpc-1 of run dtp-a: installation other's, expired {long_gone}; reaped 1 day" in caplog.text


def test_an_installation_whose_id_a_tag_cannot_hold_reaps_its_own_expired_resources() -> None:
    # Pinned ids may hold characters a tag cannot: the tag holds the id as tag_value wrote it.
    names = RunNames("train_e2e", DONE_RUN, installation="prod#eu")
    tagged = resource_tags(names, "tiny", EXPIRED)[INSTALLATION_TAG]
    found = [Expired("stack", "dtp-e-network", "dtp-e", EXPIRED, "train_e2e", DONE_RUN, tagged)]
    assert spare_other_installations(found, "prod#eu", parse_expiry(EXPIRED) + timedelta(hours=1)) == found


def test_a_run_directory_of_a_running_run_stays_on_the_worker_mount(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DTP_SHARED_DIR", str(tmp_path))
    monkeypatch.delenv("AIRFLOW_CONN_SLURM_DEFAULT", raising=False)
    for run_key, run_id in (("dtp-live", LIVE_RUN), ("dtp-done", DONE_RUN)):
        (tmp_path / "runs" / run_key).mkdir(parents=True)
        marker = {"run_key": run_key, "dag_id": "train_e2e", "run_id": run_id, "expires_at": EXPIRED}
        (tmp_path / "runs" / run_key / "run.json").write_text(json.dumps(marker))
    found = find_expired_on_worker_mount("slurm_default", active=live_only, installation=INSTALLATION)
    assert [(item.run_key, item.run_id) for item in found] == [("dtp-done", DONE_RUN)]


class Airflow:
    """What the API server answers a task about DAG runs: ``states`` by (dag, run id), 404 for any other run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, states: dict[tuple[str, str], str], error: int = 404):
        self.states, self.error = states, error
        self.paused: set[str] = set()
        monkeypatch.setattr(RuntimeTaskInstance, "get_dagrun_state", self.get_dagrun_state)
        monkeypatch.setattr(RuntimeTaskInstance, "get_dag", self.get_dag)

    def get_dagrun_state(self, dag_id: str, run_id: str) -> str:
        if (dag_id, run_id) not in self.states:
            detail = {"status_code": self.error, "message": "Dag run not found"}
            raise AirflowRuntimeError(ErrorResponse(error=ErrorType.API_SERVER_ERROR, detail=detail))
        return self.states[dag_id, run_id]

    def get_dag(self, dag_id: str) -> SimpleNamespace:
        return SimpleNamespace(dag_id=dag_id, is_paused=dag_id in self.paused)


@pytest.mark.parametrize(
    ("state", "active"), [("queued", True), ("running", True), ("success", False), ("failed", False)]
)
def test_a_run_is_active_while_queued_or_running(monkeypatch, state: str, active: bool) -> None:
    Airflow(monkeypatch, {("train_e2e", LIVE_RUN): state})
    assert run_is_active("train_e2e", LIVE_RUN) is active


def test_a_deleted_run_is_not_active_whatever_else_its_dag_runs(monkeypatch) -> None:
    Airflow(monkeypatch, {("train_e2e", LIVE_RUN): "running"})
    assert run_is_active("train_e2e", "manual__deleted") is False
    assert run_is_active("other_dag", "manual__deleted") is False


def test_a_running_run_of_a_paused_dag_is_not_active(monkeypatch) -> None:
    # The scheduler leaves it "running" while its DAG is paused, and its teardowns do not run: the expiry decides.
    airflow = Airflow(monkeypatch, {("train_e2e", LIVE_RUN): "running"})
    airflow.paused.add("train_e2e")
    assert run_is_active("train_e2e", LIVE_RUN) is False


def test_a_run_state_the_api_server_cannot_give_is_an_error_not_a_deletion(monkeypatch) -> None:
    Airflow(monkeypatch, {}, error=503)
    with pytest.raises(AirflowRuntimeError, match="503"):
        run_is_active("train_e2e", LIVE_RUN)


class Cluster:
    """The Slurm hook _write_job writes a job's script and log folder through."""

    slurm_conn_id, head_node, head_node_host_keys = "slurm_default", None, []

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        pass

    def make_dirs(self, path: str) -> None:
        pass


def test_a_slurm_jobs_comment_names_its_dag_run(tmp_path: Path) -> None:
    tags = {"dtp:expires-at": EXPIRED, INSTALLATION_TAG: INSTALLATION}
    spec = {"dag_id": "train_e2e", "run_id": LIVE_RUN, "tags": tags}
    job = jobs._write_job(Cluster(), spec, tmp_path, "train", "#!/bin/bash\n", "dtp-train-e2e-0123456789")  # type: ignore[arg-type]
    assert parse_slurm_comment(job["comment"] or "") == (EXPIRED, "train_e2e", LIVE_RUN, INSTALLATION)
