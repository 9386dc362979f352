"""The reaper's sweep of the Prometheus Pushgateway: which groups it reads from the gateway's answer, which of them it
deletes (DTP's run groups a retention past their last push, never another job's), and how a missing connection, a
gateway that cannot be asked and a dry run go. The gateway itself (Debian's) is in tests/integration/test_prometheus.py.
"""

from __future__ import annotations

import json
import re
import socket
from datetime import UTC, datetime, timedelta

import pytest

from dtp.metrics.prometheus import PUSHGATEWAY_CONN_ID, PushedGroup, Pushgateway, pushed_groups, run_group_path
from dtp.reaper.deletion import ReapIncomplete, reap
from dtp.reaper.expired import Expired
from dtp.reaper.pushgateway import KIND, RETENTION, expired_groups, find_expired_pushgateway_groups

PUSHED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CONN_ENV = f"AIRFLOW_CONN_{PUSHGATEWAY_CONN_ID.upper()}"


def _meta(seconds: str, labels: dict[str, str]) -> dict:
    return {"type": "GAUGE", "metrics": [{"labels": {"instance": "", **labels}, "value": seconds}]}


# The shape of prometheus-pushgateway 1.5.1's GET /api/v1/metrics (trimmed: one sample of each group's gauges).
API_ANSWER = {
    "status": "success",
    "data": [
        {
            "labels": {"job": "dtp", "run": "dtp-train-e2e-0123456789"},
            "last_push_successful": True,
            "dtp_run_final_loss": _meta("1.8", {"job": "dtp", "run": "dtp-train-e2e-0123456789", "dag_id": "t"}),
            "push_failure_time_seconds": _meta("0", {"job": "dtp", "run": "dtp-train-e2e-0123456789"}),
            "push_time_seconds": _meta("1.7966622011346285e+09", {"job": "dtp", "run": "dtp-train-e2e-0123456789"}),
        },
        {
            "labels": {"job": "other", "run": "r1"},
            "last_push_successful": True,
            "push_time_seconds": _meta("1.7966640553574667e+09", {"job": "other", "run": "r1"}),
        },
    ],
}


def group(pushed_at: datetime | None = PUSHED, **labels: str) -> PushedGroup:
    return PushedGroup(labels or {"job": "dtp", "run": "dtp-old"}, pushed_at)


def unreachable_url() -> str:
    with socket.socket() as closed:  # a port nothing listens on once it is closed
        closed.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{closed.getsockname()[1]}"


def test_the_gateways_answer_gives_each_groups_labels_and_last_push() -> None:
    assert pushed_groups(API_ANSWER) == [
        PushedGroup({"job": "dtp", "run": "dtp-train-e2e-0123456789"}, datetime.fromtimestamp(1796662201.1346285, UTC)),
        PushedGroup({"job": "other", "run": "r1"}, datetime.fromtimestamp(1796664055.3574667, UTC)),
    ]
    assert pushed_groups({"status": "success", "data": [{"labels": {"job": "dtp", "run": "x"}}]}) == [
        PushedGroup({"job": "dtp", "run": "x"}, None)
    ]


def test_a_run_group_expires_its_retention_after_its_last_push() -> None:
    at_expiry = PUSHED + RETENTION
    assert expired_groups([group()], at_expiry) == []
    assert expired_groups([group()], at_expiry + timedelta(seconds=1)) == [
        Expired(KIND, "dtp-old", "dtp-old", "2026-12-08T12:00:00Z")
    ]


def test_only_dtps_run_groups_are_ever_found() -> None:
    long_after = PUSHED + RETENTION * 10
    groups = [
        group(job="dtp", run="dtp-old"),
        group(job="other", run="dtp-old"),  # another job's group, whatever its labels
        group(job="dtp"),  # no run: not a run's group
        group(job="dtp", run="dtp-old", instance="n1"),  # a DELETE of the run's path would not remove it
        group(None, job="dtp", run="dtp-unknown"),  # the gateway gave no push time
        group(long_after - timedelta(days=1), job="dtp", run="dtp-recent"),
    ]
    assert [item.name for item in expired_groups(groups, long_after)] == ["dtp-old"]


def test_a_run_group_path_is_plain_and_any_other_run_value_base64() -> None:
    assert run_group_path("dtp-train-e2e-0123456789") == "/metrics/job/dtp/run/dtp-train-e2e-0123456789"
    assert run_group_path("a/b") == "/metrics/job/dtp/run@base64/YS9i"


def test_only_an_http_gateway_is_talked_to() -> None:
    with pytest.raises(ValueError, match=re.escape("Pushgateway URL must be http(s): 'file:///etc'")):
        Pushgateway("file:///etc")


def test_without_the_connection_there_is_nothing_to_sweep(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(CONN_ENV, raising=False)
    with caplog.at_level("INFO", logger="dtp.reaper.pushgateway"):
        findings = find_expired_pushgateway_groups()
    assert (findings.found, findings.unsearched) == ([], {})
    assert "No prometheus_pushgateway connection is defined" in caplog.text


def test_a_gateway_that_cannot_be_asked_is_named_unsearched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONN_ENV, unreachable_url())
    findings = find_expired_pushgateway_groups()
    where = f"{KIND} ({PUSHGATEWAY_CONN_ID})"
    assert findings.found == [] and list(findings.unsearched) == [where]
    assert findings.unsearched[where].startswith("URLError:")


def test_a_connection_naming_no_http_gateway_is_named_unsearched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONN_ENV, json.dumps({"conn_type": "http", "host": "gateway", "schema": "ftp"}))
    findings = find_expired_pushgateway_groups()
    assert findings.unsearched == {
        f"{KIND} ({PUSHGATEWAY_CONN_ID})": "ValueError: Pushgateway URL must be http(s): 'ftp://gateway'"
    }


def test_a_dry_run_asks_no_gateway(monkeypatch: pytest.MonkeyPatch, offline_aws: None) -> None:
    monkeypatch.setenv(CONN_ENV, unreachable_url())  # any request would fail the reap
    found = expired_groups([group()], PUSHED + RETENTION * 2)
    result = reap(found, "aws_default", None, dry_run=True)
    assert [item["name"] for item in result["found"]] == ["dtp-old"] and result["deleted"] == []


def test_a_group_that_cannot_be_deleted_fails_the_reap_naming_it(
    monkeypatch: pytest.MonkeyPatch, offline_aws: None
) -> None:
    monkeypatch.setenv(CONN_ENV, unreachable_url())
    found = expired_groups([group()], PUSHED + RETENTION * 2)
    with pytest.raises(ReapIncomplete, match=r"deleted 0 of 1 .*\nrun dtp-old: pushgateway_group dtp-old: .*refused"):
        reap(found, "aws_default", None, dry_run=False)
