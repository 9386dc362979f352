"""``scripts/backfill``: backfill the regression DAGs of several model sizes over a date range.

    scripts/backfill --sizes tiny llama3_2_1b --from 2026-11-20 --to 2026-11-21 --conf '{"max_steps": 100}'

For a size whose ``regression__<size>`` DAG has a schedule, creates one Airflow
backfill through the REST API, one run at a time (Airflow 3 allows one active
backfill per DAG: a DAG that already has one is reported and left alone). A DAG
without a schedule, which Airflow refuses to backfill, gets one run per date
triggered through the REST API with that date as its logical date, run ids
``backfill_triggered__<time>__<date>`` and a note naming this command; its
``max_active_runs`` runs them one at a time. Dates that already have a run are
kept or run again as ``--reprocess`` says, as Airflow's backfill does (a DAG
without a schedule: the run is deleted and triggered anew with the conf). The
command prints progress until every run it queued ended, and exits non-zero
when any of them (created, or cleared to run again) failed: runs of the same
dates that it left alone do not count. The DAGs are unpaused, since a paused
DAG's runs stay queued; unpausing also lets a schedule create its next run,
which waits for the backfill's running run, and they for it (the DAGs'
``wait_for_other_runs``).

Every input is checked before the first request: each size must be a recipe
with a regression DAG, the dates ISO dates in order and not in the future, and
the conf a JSON object that the DAG's form and ``validate_params`` accept. Then
every size's runs are worked out (Airflow's backfill dry run, or the runs of
the dates) before the first backfill is created or run triggered.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from airflow.sdk import DAG
from airflow.serialization.encoders import coerce_to_core_timetable

from dtp.costs import RunFsx
from dtp.local.api import TERMINAL_RUN_STATES, AirflowApi
from dtp.local.config import StackConfig
from dtp.params import TrainParams, validate_params
from dtp.pipeline.factory import DAG_PREFIX, regression_dags
from dtp.pipeline.spec import TRIGGERED_RUN_PREFIX, run_fsx, sample_corpus_problem
from dtp.platforms.base import PlatformNotReady
from dtp.recipes import Recipe, get_recipe


def size_dags(sizes: list[str]) -> dict[str, DAG]:
    """The regression DAG of each size, by size; ``ValueError`` naming the sizes that have none."""
    known = {dag_id.removeprefix(DAG_PREFIX): dag for dag_id, dag in regression_dags().items()}
    unknown = [size for size in sizes if size not in known]
    if unknown:
        raise ValueError(
            f"--sizes: no regression DAG for {', '.join(map(repr, unknown))}; known sizes: {', '.join(sorted(known))}"
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


def run_fsx_if_known(params: TrainParams, recipe: Recipe) -> RunFsx | None:
    """The FSx for Lustre the run's platform makes for it, which its estimates count (``spec.run_fsx``), where the
    platform's connection is defined here; None where it is not: each run's validate_params checks its budget with
    the FSx again."""
    try:
        return run_fsx(params, recipe)
    except PlatformNotReady:
        return None


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
            validated = validate_params({**dag.params.dump(), **conf}, run_fsx_if_known)
        except ValueError as err:
            raise ValueError(f"--conf for {dag.dag_id}: {err}") from None
        # build_spec's check that needs no platform: a size the sample corpus cannot feed fails every run.
        if problem := sample_corpus_problem(validated, get_recipe(validated.recipe)):
            raise ValueError(f"--conf for {dag.dag_id}: {problem}")
        try:  # as Airflow checks a backfill's conf: each value against its param's JSON schema (the recipe's enum)
            copy.deepcopy(dag.params).update(conf)
        except ValueError as err:
            raise ValueError(f"--conf for {dag.dag_id}: {str(err).splitlines()[0]}") from None
    return conf


def first_moment(day: str) -> str:
    """The first moment of ``day`` (YYYY-MM-DD), as the REST API takes it."""
    return f"{day}T00:00:00Z"


def last_moment(day: str) -> str:
    """The last moment of ``day``: Airflow backfills the logical dates up to and including ``to_date``, and a
    schedule's run of that day may come at any time of it."""
    return f"{day}T23:59:59.999999Z"


# Runs per page of the dagRuns listing: the API's default maximum_page_limit.
PAGE_SIZE = 100


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def list_runs(api: AirflowApi, dag_id: str, start: str, end: str, run_type: str | None = None) -> list[dict[str, Any]]:
    """Every run of ``dag_id`` (of ``run_type`` when given) whose logical date is on a day from ``start`` to
    ``end``, page by page."""
    filters = {"logical_date_gte": first_moment(start), "logical_date_lte": last_moment(end)}
    query = urllib.parse.urlencode(filters | ({"run_type": run_type} if run_type else {}) | {"order_by": "id"})
    runs: list[dict[str, Any]] = []
    while True:
        path = f"/api/v2/dags/{dag_id}/dagRuns?{query}&limit={PAGE_SIZE}&offset={len(runs)}"
        status, body = api.request("GET", path)
        if status != 200:
            raise RuntimeError(f"{dag_id}: listing its runs failed: HTTP {status} {body.get('detail', body)}")
        page, total = body["dag_runs"], body.get("total_entries")
        runs += page
        # A server whose maximum_page_limit is lower answers shorter pages: the total says when all were read.
        if not page or (len(page) < PAGE_SIZE and total is None) or (total is not None and len(runs) >= total):
            return runs


def backfill_runs(api: AirflowApi, dag_id: str, start: str, end: str, since: str) -> list[dict[str, Any]]:
    """The backfill runs of ``dag_id`` between the dates that were queued at or after ``since`` (the backfill's
    ``created_at``): those the backfill created or cleared, not an earlier backfill's runs of the same dates that
    it left alone. Every page of them."""
    created = _time(since)
    runs = list_runs(api, dag_id, start, end, run_type="backfill")
    return [r for r in runs if r.get("queued_at") and _time(r["queued_at"]) >= created]


@dataclass(frozen=True)
class Backfill:
    """The Airflow backfill of a DAG with a schedule: its runs are the backfill runs of the dates queued since it
    was created."""

    dag_id: str
    id: int
    created_at: str

    def runs(self, api: AirflowApi, start: str, end: str) -> list[dict[str, Any]]:
        return backfill_runs(api, self.dag_id, start, end, self.created_at)

    def completed(self, api: AirflowApi) -> bool:
        """Whether Airflow marked the backfill completed (all its runs ended)."""
        return bool(api.request("GET", f"/api/v2/backfills/{self.id}")[1].get("completed_at"))


@dataclass(frozen=True)
class TriggeredRuns:
    """The runs triggered for a DAG without a schedule, one per date, by their run ids."""

    dag_id: str
    run_ids: frozenset[str]

    def runs(self, api: AirflowApi, start: str, end: str) -> list[dict[str, Any]]:
        return [r for r in list_runs(api, self.dag_id, start, end, "manual") if r["dag_run_id"] in self.run_ids]

    def completed(self, api: AirflowApi) -> bool:
        """Always: the states of its runs say when they ended."""
        return True


@dataclass(frozen=True)
class Plan:
    """What backfilling one DAG takes, worked out before anything is created: an Airflow backfill of ``dates``
    (``replaced`` is empty), or, for a DAG without a schedule, a run to trigger for each of ``dates`` after the
    runs ``replaced`` (dates run again) are deleted."""

    dag_id: str
    scheduled: bool
    dates: tuple[str, ...]
    replaced: tuple[str, ...] = ()


def _backfill_body(dag_id: str, start: str, end: str, conf: dict[str, Any], reprocess: str) -> dict[str, Any]:
    # max_active_runs: Airflow holds a backfill's runs to the backfill's own limit (10 by default), not the DAG's.
    return {
        "dag_id": dag_id,
        "from_date": first_moment(start),
        "to_date": last_moment(end),
        "dag_run_conf": conf,
        "reprocess_behavior": reprocess,
        "max_active_runs": 1,
    }


def _rerun(run: dict[str, Any], reprocess: str) -> bool:
    """Whether a date's existing ``run`` is run again under ``reprocess``, as Airflow's backfill decides it (a run
    still in flight is left alone whatever ``reprocess`` says)."""
    if run["state"] not in TERMINAL_RUN_STATES:
        return False
    return reprocess == "completed" or (reprocess == "failed" and run["state"] == "failed")


def plan_backfills(
    api: AirflowApi, dags: dict[str, DAG], start: str, end: str, conf: dict[str, Any], reprocess: str = "failed"
) -> list[Plan]:
    """Each DAG's plan, once every DAG is parsed, by asking Airflow (the backfill's dry run, or the runs the dates
    have); ``ValueError`` when Airflow refuses a DAG's backfill, before anything is created. A DAG with nothing to
    run is reported and left out."""
    for dag in dags.values():
        api.wait_for_dag(dag.dag_id)
    plans = []
    for dag in dags.values():
        dag_id = dag.dag_id
        if coerce_to_core_timetable(dag.timetable).periodic:  # what Airflow backfills
            status, body = api.request(
                "POST", "/api/v2/backfills/dry_run", _backfill_body(dag_id, start, end, conf, reprocess)
            )
            if status != 200:
                raise ValueError(f"{dag_id}: backfill refused: HTTP {status} {body.get('detail', body)}")
            plan = Plan(dag_id, True, tuple(b["logical_date"][:10] for b in body["backfills"]))
        else:
            latest: dict[str, dict[str, Any]] = {}
            for run in list_runs(api, dag_id, start, end):  # by id: the latest run of a date comes last
                latest[run["logical_date"][:10]] = run
            first, last = date.fromisoformat(start), min(date.fromisoformat(end), datetime.now(UTC).date())
            days = [(first + timedelta(n)).isoformat() for n in range((last - first).days + 1)]
            dates = [day for day in days if day not in latest or _rerun(latest[day], reprocess)]
            replaced = tuple(latest[d]["dag_run_id"] for d in dates if d in latest)
            plan = Plan(dag_id, False, tuple(dates), replaced)
        if plan.dates:
            plans.append(plan)
        else:
            print(f"{dag_id}: nothing to run from {start} to {end} (--reprocess {reprocess})", flush=True)
    return plans


def start_backfills(
    api: AirflowApi, plans: list[Plan], start: str, end: str, conf: dict[str, Any], reprocess: str = "failed"
) -> dict[str, Backfill | TriggeredRuns]:
    """Carry out each plan, and unpause its DAG; what was started, by DAG."""
    started: dict[str, Backfill | TriggeredRuns] = {}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    for plan in plans:
        dag_id = plan.dag_id
        if plan.scheduled:
            status, body = api.request("POST", "/api/v2/backfills", _backfill_body(dag_id, start, end, conf, reprocess))
            if status == 409:
                print(f"{dag_id}: a backfill is already active ({body.get('detail')}); left alone", flush=True)
                continue
            if status != 200:
                raise ValueError(f"{dag_id}: backfill refused: HTTP {status} {body.get('detail', body)}")
            started[dag_id] = Backfill(dag_id, body["id"], body["created_at"])
            print(f"{dag_id}: backfill {body['id']} from {start} to {end}", flush=True)
        else:
            started[dag_id] = trigger_runs(api, plan, conf, f"{TRIGGERED_RUN_PREFIX}{stamp}__")
            print(f"{dag_id}: triggered {len(plan.dates)} runs from {start} to {end} (no schedule)", flush=True)
        api.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
    return started


def trigger_runs(api: AirflowApi, plan: Plan, conf: dict[str, Any], run_id_prefix: str) -> TriggeredRuns:
    """Delete the runs the plan runs again, then trigger one run per date of the plan, queued for the DAG's
    ``max_active_runs`` to run one at a time."""
    dag_id = plan.dag_id
    for run_id in plan.replaced:
        status, body = api.request("DELETE", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}")
        if status not in (200, 204):
            raise RuntimeError(f"{dag_id}: deleting run {run_id} to run it again failed: HTTP {status} {body}")
    run_ids = []
    for day in plan.dates:
        payload = {
            "dag_run_id": f"{run_id_prefix}{day}",
            "logical_date": first_moment(day),
            "conf": conf,
            "note": f"scripts/backfill of {day}",
        }
        status, body = api.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", payload)
        if status != 200:
            raise RuntimeError(f"{dag_id}: trigger of the run of {day} refused: HTTP {status} {body.get('detail')}")
        run_ids.append(body["dag_run_id"])
    return TriggeredRuns(dag_id, frozenset(run_ids))


def follow(
    api: AirflowApi, started: Mapping[str, Backfill | TriggeredRuns], start: str, end: str, timeout: float = 3600
) -> dict[str, Counter]:
    """Print the states of each DAG's runs as they change until every backfill completed and every run ended; the
    last states, by DAG."""
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        states = {
            dag_id: Counter(r["state"] for r in queued.runs(api, start, end)) for dag_id, queued in started.items()
        }
        done = all(queued.completed(api) for queued in started.values()) and all(
            set(c) <= TERMINAL_RUN_STATES for c in states.values()
        )
        line = "  ".join(f"{d}: {dict(c)}" for d, c in states.items())
        if line != last:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last = line
        if done:
            return states
        time.sleep(5)
    raise TimeoutError(f"backfills {sorted(started)} still running after {timeout:.0f}s")


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
    try:
        plans = plan_backfills(api, dags, start, end, conf, args.reprocess)
    except ValueError as err:
        print(f"nothing created: {err}", file=sys.stderr)
        return 1
    if not plans:
        return 0
    started = start_backfills(api, plans, start, end, conf, args.reprocess)
    if not started:
        return 1
    states = follow(api, started, start, end, args.timeout)
    failed = sum(c["failed"] for c in states.values())
    print(f"backfill finished: {sum(sum(c.values()) for c in states.values())} runs, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
