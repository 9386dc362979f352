"""scripts/backfill refuses bad sizes, dates and conf before its first request to Airflow, works out every size's
runs before it creates any, and backfills a size with a schedule through an Airflow backfill and one without by
triggering one run per date (against a fake API: no stack is contacted here; the real scheduler runs it in
tests/e2e/test_backfill.py)."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from parallelcluster_support import use_settings

from dtp.costs import estimate_cost_usd
from dtp.local import backfill
from dtp.local.api import AirflowApi
from dtp.params import validate_params
from dtp.recipes import get_recipe, instance_types

VALID = {"--sizes": ["tiny", "tiny_deep"], "--from": ["2026-01-20"], "--to": ["2026-01-21"], "--conf": ["{}"]}
VALID_ARGV = [arg for option, values in VALID.items() for arg in (option, *values)]
# A conf llama3_2_1b accepts: a short run, with the budget its setup and teardown on 2 x p5.48xlarge take.
SHORT = {"max_steps": 20, "checkpoint_interval": 10, "budget_usd": 500.0}
CREATED_AT = "2026-01-22T10:00:00.123456Z"


class FakeApi(AirflowApi):
    """Records every request; answers as Airflow does for backfills that start and end at once. ``runs`` are the
    backfill runs of a DAG's dates, ``existing`` the runs (of every type) the dates of a DAG without a schedule
    had before, both answered a page (``limit``, ``offset``) at a time; a triggered run ends in
    ``triggered_state``. ``dry_run`` answers a DAG's backfill dry run: its status and dates."""

    def __init__(
        self,
        backfill_status: int = 200,
        runs: list[dict[str, Any]] | None = None,
        dry_run: dict[str, tuple[int, list[str]]] | None = None,
        existing: list[dict[str, Any]] | None = None,
        triggered_state: str = "success",
    ) -> None:  # no login
        self.calls: list[tuple[str, str, Any]] = []
        self.backfill_status = backfill_status
        self.runs = [{"state": "success", "queued_at": "2026-01-22T10:00:01Z"}] if runs is None else runs
        self.dry_run = dry_run or {}
        self.existing = existing or []
        self.triggered: list[dict[str, Any]] = []
        self.triggered_state = triggered_state

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        self.calls.append(("WAIT", dag_id, None))

    def request(self, method: str, path: str, payload: Any = None, auth: bool = True) -> tuple[int, Any]:
        self.calls.append((method, path, payload))
        if path == "/api/v2/backfills/dry_run":
            status, dates = self.dry_run.get(payload["dag_id"], (200, ["2026-01-20"]))
            return status, {"backfills": [{"logical_date": f"{d}T00:00:00Z"} for d in dates], "detail": "refused"}
        if path == "/api/v2/backfills":
            return self.backfill_status, {"id": len(self.calls), "created_at": CREATED_AT, "detail": "refused"}
        if "/dagRuns?" in path:
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
            offset, limit = int(query.get("offset", 0)), min(int(query.get("limit", 50)), 100)
            listed = {"backfill": self.runs, "manual": self.triggered}.get(query.get("run_type", ""), self.existing)
            return 200, {"dag_runs": listed[offset : offset + limit], "total_entries": len(listed)}
        if method == "POST" and path.endswith("/dagRuns"):
            run = {"dag_run_id": payload["dag_run_id"], "state": self.triggered_state, **payload}
            self.triggered.append(run)
            return 200, run
        if path.startswith("/api/v2/backfills/"):
            return 200, {"created_at": CREATED_AT, "completed_at": "2026-01-22T11:00:00Z"}
        return 200, {}

    def paths(self, method: str) -> list[str]:
        return [path for m, path, _ in self.calls if m == method]


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The stack's config and API client, replaced: each use is recorded and fails the command."""
    used: list[str] = []

    def refuse(*_: Any) -> None:
        used.append("stack")
        raise AssertionError("the stack was contacted")

    monkeypatch.setattr(backfill.StackConfig, "from_env", refuse)
    monkeypatch.setattr(backfill, "AirflowApi", refuse)
    return used


def use(monkeypatch: pytest.MonkeyPatch, api: FakeApi) -> FakeApi:
    """``api`` as the stack's API client for ``backfill.main``."""
    config = SimpleNamespace(airflow_url="http://127.0.0.1:9", passwords=lambda: {"admin": "x"})
    monkeypatch.setattr(backfill.StackConfig, "from_env", lambda: config)
    monkeypatch.setattr(backfill, "AirflowApi", lambda *_: api)
    return api


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"--sizes": ["tiny", "tni"]}, r"no regression DAG for 'tni'; known sizes: "),
        ({"--sizes": ["tiny?x=1"]}, r"no regression DAG for 'tiny\?x=1'"),
        ({"--from": ["2026-13-01"]}, r"dates must be YYYY-MM-DD \(month must be in 1\.\.12\)"),
        ({"--to": ["2026-01-21T00:00:00Z&x=1"]}, r"dates must be YYYY-MM-DD"),
        ({"--from": ["2026-01-22"]}, r"--from 2026-01-22 is after --to 2026-01-21"),
        ({"--from": ["2999-01-01"], "--to": ["2999-01-02"]}, r"--from 2999-01-01 is in the future"),
        ({"--conf": ["{max_steps: 1}"]}, r"--conf '\{max_steps: 1\}': not JSON"),
        ({"--conf": ["[1]"]}, r"--conf '\[1\]': must be a JSON object"),
        ({"--conf": ['{"max_step": 100}']}, r"regression__tiny: invalid parameters:\nmax_step: unknown parameter"),
        ({"--conf": ['{"max_steps": "100"}']}, r"max_steps: got '100'; Input should be a valid integer"),
        ({"--conf": ['{"checkpoint_interval": 500}']}, r"checkpoint_interval: got 500; must not exceed max_steps"),
        ({"--conf": ['{"recipe": "tiny_deep"}']}, r"regression__tiny: .*'tiny_deep' is not one of \['tiny'\]"),
        # A size without a schedule has its DAG, and its conf is checked against that DAG's form.
        ({"--sizes": ["llama3_2_1b"], "--conf": ['{"max_steps": 100}']}, r"regression__llama3_2_1b: .*budget_usd"),
        # One that validate_params would refuse for its dataset: the sample corpus cannot feed a 70B step.
        (
            {"--sizes": ["llama3_1_70b"], "--conf": ['{"budget_usd": 100000, "expiry_hours": 48}']},
            r"regression__llama3_1_70b: dataset_uri: empty, so recipe 'llama3_1_70b' would train on DTP's sample",
        ),
    ],
)
def test_bad_input_is_refused_before_any_request(
    stack: list[str], capsys: pytest.CaptureFixture[str], changes: dict[str, list[str]], message: str
) -> None:
    argv = [arg for option, values in (VALID | changes).items() for arg in (option, *values)]
    with pytest.raises(SystemExit) as exit_info:
        backfill.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err, re.DOTALL)
    assert stack == []


def test_a_size_typo_lists_the_known_sizes(stack: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        backfill.main(["--sizes", "tiny_dep", "--from", "2026-01-20", "--to", "2026-01-20"])
    # Every recipe: the sizes without a schedule (the GPU ones) included.
    assert "known sizes: llama3_1_70b, llama3_1_70b_megatron, llama3_1_8b, " in capsys.readouterr().err


def test_valid_input_starts_one_backfill_per_size(monkeypatch: pytest.MonkeyPatch) -> None:
    api = use(monkeypatch, FakeApi())
    argv = ["--sizes", "tiny", "tiny_deep", "--from", "20260120", "--to", "2026-01-21", "--conf", '{"max_steps": 200}']
    assert backfill.main(argv) == 0
    posts = [payload for method, path, payload in api.calls if path == "/api/v2/backfills"]
    assert [p["dag_id"] for p in posts] == ["regression__tiny", "regression__tiny_deep"]
    # The whole last day: a schedule's run of it may come at any time of the day.
    assert {(p["from_date"], p["to_date"]) for p in posts} == {("2026-01-20T00:00:00Z", "2026-01-21T23:59:59.999999Z")}
    assert all(p["dag_run_conf"] == {"max_steps": 200} for p in posts)
    # One run at a time: Airflow holds a backfill's runs to its own max_active_runs, not the DAG's.
    assert all(p["max_active_runs"] == 1 for p in posts)
    # Both DAGs are found parsed and dry-run before the first backfill is created, each unpaused once it was.
    assert [(method, path.rsplit("/", 1)[-1]) for method, path, _ in api.calls[:8]] == [
        ("WAIT", "regression__tiny"),
        ("WAIT", "regression__tiny_deep"),
        ("POST", "dry_run"),
        ("POST", "dry_run"),
        ("POST", "backfills"),
        ("PATCH", "regression__tiny"),
        ("POST", "backfills"),
        ("PATCH", "regression__tiny_deep"),
    ]


def test_a_size_airflow_would_refuse_creates_nothing_for_any_size(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    api = use(monkeypatch, FakeApi(dry_run={"regression__tiny_deep": (422, [])}))
    assert backfill.main(VALID_ARGV) == 1
    assert "nothing created: regression__tiny_deep: backfill refused: HTTP 422 refused" in capsys.readouterr().err
    assert "/api/v2/backfills" not in api.paths("POST") and api.paths("PATCH") == []


def test_a_size_with_no_date_to_run_gets_no_backfill(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A weekly schedule with no run in the range, or every date already run under --reprocess none.
    api = use(monkeypatch, FakeApi(dry_run={"regression__tiny": (200, [])}))
    assert backfill.main(VALID_ARGV) == 0
    assert "regression__tiny: nothing to run from 2026-01-20 to 2026-01-21" in capsys.readouterr().out
    assert [p["dag_id"] for m, path, p in api.calls if path == "/api/v2/backfills"] == ["regression__tiny_deep"]
    assert api.paths("PATCH") == ["/api/v2/dags/regression__tiny_deep"]


def test_a_dag_whose_backfill_is_refused_is_left_paused() -> None:
    api = FakeApi(backfill_status=409)
    plans = backfill.plan_backfills(api, backfill.size_dags(["tiny"]), "2026-01-20", "2026-01-20", {})
    api.calls.clear()
    assert backfill.start_backfills(api, plans, "2026-01-20", "2026-01-20", {}) == {}
    assert [method for method, _, _ in api.calls] == ["POST"]


def test_a_size_without_a_schedule_gets_one_run_triggered_per_date(monkeypatch: pytest.MonkeyPatch) -> None:
    api = use(monkeypatch, FakeApi(triggered_state="failed"))
    argv = ["--sizes", "llama3_2_1b", "--from", "2026-01-20", "--to", "2026-01-22", "--conf", json.dumps(SHORT)]
    assert backfill.main(argv) == 1  # its runs failed
    assert "/api/v2/backfills" not in api.paths("POST")  # Airflow backfills no DAG without a schedule
    assert [run["logical_date"] for run in api.triggered] == [f"2026-01-{d}T00:00:00Z" for d in (20, 21, 22)]
    assert all(run["conf"] == SHORT for run in api.triggered)
    # Told apart from other manual runs by their run ids and note; the DAG is unpaused after they were queued.
    assert all(
        re.fullmatch(r"backfill_triggered__\d{8}T\d{6}__2026-01-2\d", run["dag_run_id"]) for run in api.triggered
    )
    assert {run["note"][:17] for run in api.triggered} == {"scripts/backfill "}
    methods = [method for method, _, _ in api.calls]
    assert methods.count("PATCH") == 1 and methods.index("PATCH") > max(i for i, m in enumerate(methods) if m == "POST")
    # Another manual run of the dates is not the backfill's: it neither counts nor keeps the command waiting.
    ours = frozenset(run["dag_run_id"] for run in api.triggered)
    api.triggered.append({"dag_run_id": "manual__x", "state": "running"})
    started = {"regression__llama3_2_1b": backfill.TriggeredRuns("regression__llama3_2_1b", ours)}
    states = backfill.follow(api, started, "2026-01-20", "2026-01-22", timeout=5)
    assert states == {"regression__llama3_2_1b": Counter({"failed": 3})}


@pytest.mark.parametrize(
    ("reprocess", "run_again"),
    [("none", []), ("failed", ["2026-01-21"]), ("completed", ["2026-01-20", "2026-01-21"])],
)
def test_dates_of_a_size_without_a_schedule_that_have_a_run_are_kept_or_run_again(
    reprocess: str, run_again: list[str]
) -> None:
    # As Airflow's backfill: a run in flight is left alone; an ended one runs again as --reprocess says, deleted
    # and triggered anew with this conf (the latest run of a date decides).
    existing = [
        {"dag_run_id": "old_failed", "logical_date": "2026-01-20T00:00:00Z", "state": "failed"},
        {"dag_run_id": "ok", "logical_date": "2026-01-20T00:00:00Z", "state": "success"},
        {"dag_run_id": "failed", "logical_date": "2026-01-21T00:00:00Z", "state": "failed"},
        {"dag_run_id": "running", "logical_date": "2026-01-22T00:00:00Z", "state": "running"},
    ]
    api = FakeApi(existing=existing)
    dags = backfill.size_dags(["llama3_2_1b"])
    [plan] = backfill.plan_backfills(api, dags, "2026-01-20", "2026-01-23", SHORT, reprocess)
    assert plan.dates == (*run_again, "2026-01-23")
    backfill.start_backfills(api, [plan], "2026-01-20", "2026-01-23", SHORT, reprocess)
    ids = {"2026-01-20": "ok", "2026-01-21": "failed"}
    assert api.paths("DELETE") == [f"/api/v2/dags/regression__llama3_2_1b/dagRuns/{ids[d]}" for d in run_again]
    assert [run["logical_date"][:10] for run in api.triggered] == [*run_again, "2026-01-23"]


def test_dates_after_today_get_no_triggered_run() -> None:
    api = FakeApi()
    today = backfill.datetime.now(backfill.UTC).date()
    end = (today + backfill.timedelta(days=3)).isoformat()
    [plan] = backfill.plan_backfills(api, backfill.size_dags(["llama3_2_1b"]), today.isoformat(), end, SHORT)
    assert plan.dates == (today.isoformat(),)


def test_an_earlier_backfills_failed_run_of_the_same_dates_does_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # With --reprocess none, the new backfill leaves the date an earlier backfill failed alone: its run, queued
    # before this backfill was created, is not this backfill's failure.
    earlier = {"state": "failed", "queued_at": "2026-01-21T09:00:00Z"}
    ours = {"state": "success", "queued_at": "2026-01-22T10:00:00.200000Z"}
    api = use(monkeypatch, FakeApi(runs=[earlier, ours]))
    argv = ["--sizes", "tiny", "--from", "2026-01-20", "--to", "2026-01-21", "--reprocess", "none"]
    assert backfill.main(argv) == 0
    # A run it cleared to run again (queued anew, after its creation) is its own.
    api.runs = [{**earlier, "queued_at": "2026-01-22T10:00:00.200000Z"}, ours]
    assert backfill.main(argv) == 1


def test_every_page_of_runs_is_read() -> None:
    runs = [{"state": "success", "queued_at": "2026-01-22T10:00:01Z"}] * 249 + [
        {"state": "failed", "queued_at": "2026-01-22T10:00:01Z"}
    ]
    started = {"regression__tiny": backfill.Backfill("regression__tiny", 1, CREATED_AT)}
    states = backfill.follow(FakeApi(runs=runs), started, "2026-01-01", "2026-09-07", timeout=5)
    assert states == {"regression__tiny": Counter({"success": 249, "failed": 1})}


def test_the_conf_is_checked_against_the_fsx_the_runs_platform_makes(monkeypatch: pytest.MonkeyPatch) -> None:
    dags = backfill.size_dags(["llama3_2_1b"])
    params = validate_params({**dags["llama3_2_1b"].params.dump(), **SHORT})
    assert params.platform == "parallelcluster"
    recipe = get_recipe("llama3_2_1b")
    nodes_alone = estimate_cost_usd(params, recipe, instance_types()[params.instance_type].price_usd_per_hour)
    conf = json.dumps({**SHORT, "budget_usd": nodes_alone})
    monkeypatch.delenv("AIRFLOW_CONN_DTP_PARALLELCLUSTER", raising=False)
    assert backfill.run_conf(conf, dags)["budget_usd"] == nodes_alone  # no connection here: each run checks again
    # With the platform's connection, the budget pays for the FSx for Lustre each run gets too, as build_spec counts.
    use_settings(monkeypatch, key_name="dtp-head")
    with pytest.raises(ValueError, match=r"budget_usd: got .* and a 1200 GiB FSx for Lustre"):
        backfill.run_conf(conf, dags)
