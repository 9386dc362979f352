"""scripts/backfill refuses bad sizes, dates and conf before its first request to Airflow, and starts a valid
backfill with the normalised inputs (against a fake API: no stack is contacted here; the real scheduler runs it in
tests/e2e/test_backfill.py)."""

from __future__ import annotations

import re
import urllib.parse
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from dtp.local import backfill

VALID = {"--sizes": ["tiny", "tiny_deep"], "--from": ["2026-01-20"], "--to": ["2026-01-21"], "--conf": ["{}"]}


CREATED_AT = "2026-01-22T10:00:00.123456Z"


class FakeApi:
    """Records every request; answers as Airflow does for backfills that start and end at once. ``runs`` are the
    DAG's backfill runs of the dates, answered a page (``limit``, ``offset``) at a time."""

    def __init__(self, backfill_status: int = 200, runs: list[dict[str, Any]] | None = None) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.backfill_status = backfill_status
        self.runs = [{"state": "success", "queued_at": "2026-01-22T10:00:01Z"}] if runs is None else runs

    def wait_for_dag(self, dag_id: str) -> None:
        self.calls.append(("WAIT", dag_id, None))

    def request(self, method: str, path: str, payload: dict | None = None) -> tuple[int, Any]:
        self.calls.append((method, path, payload))
        if path == "/api/v2/backfills":
            return self.backfill_status, {"id": len(self.calls), "detail": "refused"}
        if "/dagRuns?" in path:
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
            offset, limit = int(query.get("offset", 0)), min(int(query.get("limit", 50)), 100)
            return 200, {"dag_runs": self.runs[offset : offset + limit], "total_entries": len(self.runs)}
        if path.startswith("/api/v2/backfills/"):
            return 200, {"created_at": CREATED_AT, "completed_at": "2026-01-22T11:00:00Z"}
        return 200, {}


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


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"--sizes": ["tiny", "tni"]}, r"no regression DAG for 'tni'; known sizes \(recipes with a schedule\): "),
        ({"--sizes": ["tiny?x=1"]}, r"no regression DAG for 'tiny\?x=1'"),
        ({"--sizes": ["llama3_1_8b"]}, r"no regression DAG for 'llama3_1_8b'"),  # a recipe without a schedule
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
    ],
)
def test_bad_input_is_refused_before_any_request(
    stack: list[str], capsys: pytest.CaptureFixture[str], changes: dict[str, list[str]], message: str
) -> None:
    argv = [arg for option, values in (VALID | changes).items() for arg in (option, *values)]
    with pytest.raises(SystemExit) as exit_info:
        backfill.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert stack == []


def test_a_size_typo_lists_the_known_sizes(stack: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        backfill.main(["--sizes", "tiny_dep", "--from", "2026-01-20", "--to", "2026-01-20"])
    assert "known sizes (recipes with a schedule): tiny, tiny_deep" in capsys.readouterr().err


def test_valid_input_starts_one_backfill_per_size(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi()
    config = SimpleNamespace(airflow_url="http://127.0.0.1:9", passwords=lambda: {"admin": "x"})
    monkeypatch.setattr(backfill.StackConfig, "from_env", lambda: config)
    monkeypatch.setattr(backfill, "AirflowApi", lambda *_: api)
    argv = ["--sizes", "tiny", "tiny_deep", "--from", "20260120", "--to", "2026-01-21", "--conf", '{"max_steps": 200}']
    assert backfill.main(argv) == 0
    posts = [payload for method, path, payload in api.calls if path == "/api/v2/backfills"]
    assert [p["dag_id"] for p in posts] == ["regression__tiny", "regression__tiny_deep"]
    assert {(p["from_date"], p["to_date"]) for p in posts} == {("2026-01-20T00:00:00Z", "2026-01-21T00:00:00Z")}
    assert all(p["dag_run_conf"] == {"max_steps": 200} for p in posts)
    # Both DAGs are found parsed before the first backfill is created.
    assert [c[0] for c in api.calls[:3]] == ["WAIT", "WAIT", "POST"]


def test_a_dag_whose_backfill_is_refused_is_left_paused() -> None:
    api = FakeApi(backfill_status=409)
    assert backfill.start_backfills(api, ["tiny"], "2026-01-20", "2026-01-20", {}) == {}
    assert [method for method, _, _ in api.calls] == ["WAIT", "POST"]


def test_an_earlier_backfills_failed_run_of_the_same_dates_does_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # With --reprocess none, the new backfill leaves the date an earlier backfill failed alone: its run, queued
    # before this backfill was created, is not this backfill's failure.
    earlier = {"state": "failed", "queued_at": "2026-01-21T09:00:00Z"}
    ours = {"state": "success", "queued_at": "2026-01-22T10:00:00.200000Z"}
    api = FakeApi(runs=[earlier, ours])
    config = SimpleNamespace(airflow_url="http://127.0.0.1:9", passwords=lambda: {"admin": "x"})
    monkeypatch.setattr(backfill.StackConfig, "from_env", lambda: config)
    monkeypatch.setattr(backfill, "AirflowApi", lambda *_: api)
    argv = ["--sizes", "tiny", "--from", "2026-01-20", "--to", "2026-01-21", "--reprocess", "none"]
    assert backfill.main(argv) == 0
    # A run it cleared to run again (queued anew, after its creation) is its own.
    api.runs = [{**earlier, "queued_at": "2026-01-22T10:00:00.200000Z"}, ours]
    assert backfill.main(argv) == 1


def test_every_page_of_runs_is_read() -> None:
    runs = [{"state": "success", "queued_at": "2026-01-22T10:00:01Z"}] * 249 + [
        {"state": "failed", "queued_at": "2026-01-22T10:00:01Z"}
    ]
    states = backfill.follow(FakeApi(runs=runs), {"regression__tiny": 1}, "2026-01-01", "2026-09-07", timeout=5)
    assert states == {"regression__tiny": Counter({"success": 249, "failed": 1})}
