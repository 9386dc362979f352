"""``scripts/backfill``: backfill the regression DAGs of several model sizes over a date range.

    scripts/backfill --sizes tiny tiny_deep --from 2026-11-20 --to 2026-11-21 --conf '{"max_steps": 100}'

Creates one Airflow backfill per ``regression__<size>`` DAG through the REST
API (Airflow 3 allows one active backfill per DAG: a DAG that already has one
is reported and left alone), prints progress until every backfill run ended,
and exits non-zero when any run it queued (created, or cleared to run again)
failed: the runs an earlier backfill made of the same dates and this one left
alone do not count. The DAGs are unpaused, since a paused
DAG's backfill runs stay queued; unpausing also lets the schedule create its
next run.

Every input is checked before the first request: each size must be a recipe
with a regression DAG, the dates ISO dates in order and not in the future, and
the conf a JSON object that the DAG's form and ``validate_params`` accept.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import Counter
from datetime import UTC, date, datetime
from typing import Any

from airflow.sdk import DAG

from dtp.local.api import AirflowApi
from dtp.local.config import StackConfig
from dtp.params import validate_params
from dtp.pipeline.factory import DAG_PREFIX, regression_dags


def size_dags(sizes: list[str]) -> dict[str, DAG]:
    """The regression DAG of each size, by size; ``ValueError`` naming the sizes that have none."""
    known = {dag_id.removeprefix(DAG_PREFIX): dag for dag_id, dag in regression_dags().items()}
    unknown = [size for size in sizes if size not in known]
    if unknown:
        raise ValueError(
            f"--sizes: no regression DAG for {', '.join(map(repr, unknown))}; "
            f"known sizes (recipes with a schedule): {', '.join(sorted(known))}"
        )
    return {size: known[size] for size in sizes}


def date_range(start: str, end: str) -> tuple[str, str]:
    """``start`` and ``end`` as YYYY-MM-DD; ``ValueError`` unless both are dates, in order, from a past start."""
    try:
        first, last = date.fromisoformat(start), date.fromisoformat(end)
    except ValueError as err:
        raise ValueError(f"--from {start!r} / --to {end!r}: dates must be YYYY-MM-DD ({err})") from None
    if first > last:
        raise ValueError(f"--from {first} is after --to {last}")
    if first > datetime.now(UTC).date():
        raise ValueError(f"--from {first} is in the future; Airflow backfills past dates only")
    return first.isoformat(), last.isoformat()


def run_conf(text: str, dags: dict[str, DAG]) -> dict[str, Any]:
    """``--conf`` as a dict, checked as each DAG's form and its ``validate_params`` task would check it."""
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--conf {text!r}: not JSON ({err})") from None
    if not isinstance(conf, dict):
        raise ValueError(f"--conf {text!r}: must be a JSON object, e.g. '{{\"max_steps\": 100}}'")
    for dag in dags.values():
        try:
            validate_params({**dag.params.dump(), **conf})
        except ValueError as err:
            raise ValueError(f"--conf for {dag.dag_id}: {err}") from None
        try:  # as Airflow checks a backfill's conf: each value against its param's JSON schema (the recipe's enum)
            copy.deepcopy(dag.params).update(conf)
        except ValueError as err:
            raise ValueError(f"--conf for {dag.dag_id}: {str(err).splitlines()[0]}") from None
    return conf


def start_backfills(
    api: AirflowApi, sizes: list[str], start: str, end: str, conf: dict[str, Any], reprocess: str = "failed"
) -> dict[str, int]:
    """Create one backfill per size's DAG, once every DAG is parsed; the ids of those created, by DAG."""
    dag_ids = [f"{DAG_PREFIX}{size}" for size in sizes]
    for dag_id in dag_ids:
        api.wait_for_dag(dag_id)
    started = {}
    for dag_id in dag_ids:
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
        api.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        started[dag_id] = body["id"]
        print(f"{dag_id}: backfill {body['id']} from {start} to {end}", flush=True)
    return started


# Runs per page of the dagRuns listing: the API's default maximum_page_limit.
PAGE_SIZE = 100


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def backfill_runs(api: AirflowApi, dag_id: str, start: str, end: str, since: str) -> list[dict[str, Any]]:
    """The backfill runs of ``dag_id`` between the dates that were queued at or after ``since`` (the backfill's
    ``created_at``): those the backfill created or cleared, not an earlier backfill's runs of the same dates that
    it left alone. Every page of them."""
    query = (
        f"run_type=backfill&logical_date_gte={start}T00:00:00Z&logical_date_lte={end}T00:00:00Z"
        f"&order_by=id&limit={PAGE_SIZE}"
    )
    runs: list[dict[str, Any]] = []
    while True:
        status, body = api.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?{query}&offset={len(runs)}")
        if status != 200:
            raise RuntimeError(f"{dag_id}: listing its backfill runs failed: HTTP {status} {body.get('detail', body)}")
        page, total = body["dag_runs"], body.get("total_entries")
        runs += page
        # A server whose maximum_page_limit is lower answers shorter pages: the total says when all were read.
        if not page or (len(page) < PAGE_SIZE and total is None) or (total is not None and len(runs) >= total):
            break
    created = _time(since)
    return [r for r in runs if r.get("queued_at") and _time(r["queued_at"]) >= created]


def follow(api: AirflowApi, started: dict[str, int], start: str, end: str, timeout: float = 3600) -> dict[str, Counter]:
    """Print the states of each backfill's runs as they change until every backfill completed and its runs ended;
    the last states, by DAG."""
    backfills = {dag_id: api.request("GET", f"/api/v2/backfills/{bid}")[1] for dag_id, bid in started.items()}
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        states = {
            dag_id: Counter(r["state"] for r in backfill_runs(api, dag_id, start, end, backfills[dag_id]["created_at"]))
            for dag_id in started
        }
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
    try:  # every input is checked before the first request
        dags = size_dags(args.sizes)
        start, end = date_range(args.start, args.end)
        conf = run_conf(args.conf, dags)
    except ValueError as err:
        parser.error(str(err))
    cfg = StackConfig.from_env()
    api = AirflowApi(cfg.airflow_url, "admin", cfg.passwords()["admin"])
    started = start_backfills(api, list(dags), start, end, conf, args.reprocess)
    if not started:
        return 1
    states = follow(api, started, start, end, args.timeout)
    failed = sum(c["failed"] for c in states.values())
    print(f"backfill finished: {sum(sum(c.values()) for c in states.values())} runs, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
