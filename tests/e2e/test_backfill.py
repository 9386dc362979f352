"""The documented backfill command over two dates and two tiny sizes, and over two dates of a size without a
schedule, through the real scheduler."""

from __future__ import annotations

import json
import subprocess

import pytest

from dtp.local import backfill
from dtp.local.config import PROJECT_ROOT

pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(2700)]
SIZES = ["tiny", "tiny_deep"]


@pytest.fixture(autouse=True)
def no_active_backfills(airflow_api) -> None:
    """A persistent dev database may hold a backfill an interrupted session left active."""
    for size in SIZES:
        _, body = airflow_api.request("GET", f"/api/v2/backfills?dag_id=regression__{size}")
        for item in body.get("backfills", []):
            if not item["completed_at"]:
                airflow_api.request("PUT", f"/api/v2/backfills/{item['id']}/cancel")


def test_backfill_two_dates_two_sizes(airflow_api, aws) -> None:
    command = [
        str(PROJECT_ROOT / "scripts" / "backfill"),
        "--sizes",
        *SIZES,
        "--from",
        "2026-11-20",
        "--to",
        "2026-11-21",
        "--conf",
        '{"max_steps": 200}',
        "--reprocess",
        "completed",  # rerun dates an earlier session already ran: every test run trains for real
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in SIZES]
    assert all(": backfill " in line for line in lines), lines
    backfill_ids = {line.split(":")[0]: line.split()[2] for line in lines}  # "<dag_id>: backfill <id> from ..."
    # While those backfills are active, Airflow refuses a second one per DAG and the helper leaves it alone.
    plans = backfill.plan_backfills(airflow_api, backfill.size_dags(SIZES), "2026-11-22", "2026-11-22", {}, "completed")
    assert [plan.dates for plan in plans] == [("2026-11-22",)] * len(SIZES)
    assert backfill.start_backfills(airflow_api, plans, "2026-11-22", "2026-11-22", {}, "completed") == {}
    out, _ = proc.communicate(timeout=2400)
    assert proc.returncode == 0, out
    assert "backfill finished: 4 runs, 0 failed" in out
    for size in SIZES:
        dag_id = f"regression__{size}"
        created_at = airflow_api.request("GET", f"/api/v2/backfills/{backfill_ids[dag_id]}")[1]["created_at"]
        runs = backfill.backfill_runs(airflow_api, dag_id, "2026-11-20", "2026-11-21", created_at)
        assert sorted(r["logical_date"][:10] for r in runs) == ["2026-11-20", "2026-11-21"]
        assert {r["state"] for r in runs} == {"success"}
        assert all(r["conf"] == {"max_steps": 200} for r in runs)
        latest = max(runs, key=lambda r: r["end_date"])
        metrics = airflow_api.xcom(dag_id, latest["dag_run_id"], "collect_metrics")
        assert metrics["history"], "the second run of a size compares against the first"
        report = airflow_api.xcom(dag_id, latest["dag_run_id"], "report")
        bucket, key = report["uri"].removeprefix("s3://").split("/", 1)
        html = aws("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        assert 'alt="trend"' in html


def test_a_size_without_a_schedule_gets_one_run_per_date_one_at_a_time(airflow_api) -> None:
    # Airflow backfills no DAG without a schedule: the command triggers a run per date. A dataset that is not there
    # fails each run in validate_params, before it creates anything: the runs are quick, and the command says so.
    conf = {"max_steps": 20, "checkpoint_interval": 10, "budget_usd": 500.0, "dataset_uri": "s3://dtp-no-such/x/"}
    dag_id = "regression__llama3_2_1b"
    command = [str(PROJECT_ROOT / "scripts" / "backfill"), "--sizes", "llama3_2_1b", "--from", "2026-11-20"]
    command += ["--to", "2026-11-21", "--conf", json.dumps(conf), "--reprocess", "completed", "--timeout", "900"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{dag_id}: triggered 2 runs from 2026-11-20 to 2026-11-21 (no schedule)" in proc.stdout
    assert "backfill finished: 2 runs, 2 failed" in proc.stdout
    runs = backfill.list_runs(airflow_api, dag_id, "2026-11-20", "2026-11-21")
    assert sorted(r["logical_date"][:10] for r in runs) == ["2026-11-20", "2026-11-21"]  # run again, not added
    assert all(r["dag_run_id"].startswith(backfill.TRIGGERED_RUN_PREFIX) and r["conf"] == conf for r in runs)
    first, second = sorted(runs, key=lambda r: r["start_date"])
    assert first["end_date"] <= second["start_date"], "the DAG's max_active_runs runs them one at a time"
    for run in runs:
        states = {ti["task_id"]: ti["state"] for ti in airflow_api.task_instances(dag_id, run["dag_run_id"])}
        assert states["validate_params"] == "failed", states
