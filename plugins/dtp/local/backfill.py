"""``scripts/backfill``: backfill the regression DAGs of several model sizes over a date range.

    scripts/backfill --sizes tiny tiny_deep --from 2026-11-20 --to 2026-11-21 --conf '{"max_steps": 100}'

Creates one Airflow backfill per ``regression__<size>`` DAG through the REST
API (Airflow 3 allows one active backfill per DAG: a DAG that already has one
is reported and left alone), prints progress until every backfill run ended,
and exits non-zero when any run failed. The DAGs are unpaused, since a paused
DAG's backfill runs stay queued; unpausing also lets the schedule create its
next run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any

from dtp.local.api import AirflowApi
from dtp.local.config import StackConfig
from dtp.pipeline.factory import DAG_PREFIX


def start_backfills(
    api: AirflowApi, sizes: list[str], start: str, end: str, conf: dict[str, Any], reprocess: str = "failed"
) -> dict[str, int]:
    started = {}
    for size in sizes:
        dag_id = f"{DAG_PREFIX}{size}"
        api.wait_for_dag(dag_id)
        api.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        status, body = api.request(
            "POST",
            "/api/v2/backfills",
            {
                "dag_id": dag_id,
                "from_date": f"{start}T00:00:00Z",
                "to_date": f"{end}T00:00:00Z",
                "dag_run_conf": conf,
                "reprocess_behavior": reprocess,
                "max_active_runs": 1,
            },
        )
        if status == 409:
            print(f"{dag_id}: a backfill is already active ({body.get('detail')}); left alone", flush=True)
            continue
        if status != 200:
            raise ValueError(f"{dag_id}: backfill refused: HTTP {status} {body.get('detail', body)}")
        started[dag_id] = body["id"]
        print(f"{dag_id}: backfill {body['id']} from {start} to {end}", flush=True)
    return started


def backfill_runs(api: AirflowApi, dag_id: str, start: str, end: str) -> list[dict[str, Any]]:
    query = f"run_type=backfill&logical_date_gte={start}T00:00:00Z&logical_date_lte={end}T00:00:00Z&limit=100"
    _, body = api.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?{query}")
    return body["dag_runs"]


def follow(api: AirflowApi, started: dict[str, int], start: str, end: str, timeout: float = 3600) -> dict[str, Counter]:
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        states = {dag_id: Counter(r["state"] for r in backfill_runs(api, dag_id, start, end)) for dag_id in started}
        done = all(
            api.request("GET", f"/api/v2/backfills/{bid}")[1].get("completed_at") for bid in started.values()
        ) and all(set(c) <= {"success", "failed"} for c in states.values())
        line = "  ".join(f"{d}: {dict(c)}" for d, c in states.items())
        if line != last:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last = line
        if done:
            return states
        time.sleep(5)
    raise TimeoutError(f"backfills {started} still running after {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", required=True, help="recipe names, e.g. tiny tiny_deep")
    parser.add_argument("--from", dest="start", required=True, help="first date, YYYY-MM-DD")
    parser.add_argument("--to", dest="end", required=True, help="last date, YYYY-MM-DD")
    parser.add_argument("--conf", default="{}", help="dag_run conf for every run (JSON)")
    parser.add_argument(
        "--reprocess",
        choices=["none", "failed", "completed"],
        default="failed",
        help="dates that already have a run: keep them (none), rerun failed ones (failed), rerun all (completed)",
    )
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    cfg = StackConfig.from_env()
    api = AirflowApi(cfg.airflow_url, "admin", cfg.passwords()["admin"])
    started = start_backfills(api, args.sizes, args.start, args.end, json.loads(args.conf), args.reprocess)
    if not started:
        return 1
    states = follow(api, started, args.start, args.end, args.timeout)
    failed = sum(c["failed"] for c in states.values())
    print(f"backfill finished: {sum(sum(c.values()) for c in states.values())} runs, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
