"""The documented backfill command over two dates and two tiny sizes, through the real scheduler."""

from __future__ import annotations

import pytest

from dtp.local import backfill

pytestmark = [pytest.mark.stack, pytest.mark.e2e]
SIZES = ["tiny", "tiny_deep"]


def test_backfill_two_dates_two_sizes(airflow_api, aws) -> None:
    code = backfill.main(
        ["--sizes", *SIZES, "--from", "2026-11-20", "--to", "2026-11-21", "--conf", '{"max_steps": 200}']
    )
    assert code == 0
    for size in SIZES:
        dag_id = f"regression__{size}"
        runs = backfill.backfill_runs(airflow_api, dag_id, "2026-11-20", "2026-11-21")
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


def test_second_backfill_of_a_dag_is_left_alone_while_one_is_active(airflow_api) -> None:
    api = airflow_api
    first = backfill.start_backfills(api, ["tiny"], "2026-10-01", "2026-10-01", {"max_steps": 50})
    second = backfill.start_backfills(api, ["tiny"], "2026-10-02", "2026-10-02", {"max_steps": 50})
    try:
        assert list(first) == ["regression__tiny"] and second == {}
    finally:
        for backfill_id in first.values():
            api.request("PUT", f"/api/v2/backfills/{backfill_id}/cancel")
