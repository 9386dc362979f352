"""The metrics history (dtp.metrics.history) against moto's S3: which earlier runs a new run is compared with."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from airflow.providers.amazon.aws.hooks.s3 import S3Hook

from dtp.metrics import history

BUCKET = "dtp-artifacts-test"
PREFIX = "history/tiny/local/local.cpu/"


@pytest.fixture
def s3(moto_aws: Callable[[str], Any]) -> S3Hook:
    hook = S3Hook(aws_conn_id="aws_default")
    hook.create_bucket(BUCKET)
    return hook


def store(s3: S3Hook, entries: list[dict[str, Any]]) -> None:
    """``entries`` in the history, oldest first, keyed as ``history.record`` keys them (time, then run)."""
    for i, entry in enumerate(entries):
        s3.load_string(json.dumps({"run_key": f"r{i}", **entry}), f"{PREFIX}20261206T{i:06d}-r{i}.json", BUCKET)


def read(s3: S3Hook, **window: Any) -> list[dict[str, Any]]:
    return history.recent(s3, BUCKET, "tiny", "local", "local.cpu", **window)


def test_the_newest_comparable_runs_oldest_first(s3) -> None:
    store(s3, [{"num_nodes": 2, "passed": True}, {"num_nodes": 4, "passed": True}] * 5)
    found = read(s3, where=lambda e: e["num_nodes"] == 2, newest=3, passed=3)
    assert [e["run_key"] for e in found] == ["r4", "r6", "r8"]


def test_a_streak_of_failed_runs_does_not_push_the_passing_ones_out(s3) -> None:
    # The regression gates compare with passing runs only: 60 failed runs after 3 passing ones must leave the
    # baseline in reach, or a lasting regression would switch its own gate off.
    store(s3, [{"passed": True}] * 3 + [{"passed": False}] * 60)
    found = read(s3, where=lambda e: True, newest=50, passed=3)
    assert len(found) == 63 and [e["run_key"] for e in found if e["passed"]] == ["r0", "r1", "r2"]
    assert len(read(s3, where=lambda e: True, newest=50, passed=3, max_reads=20)) == 20


def test_runs_of_other_shapes_do_not_fill_the_window(s3) -> None:
    store(s3, [{"num_nodes": 2, "passed": True}] * 3 + [{"num_nodes": 1, "passed": True}] * 80)
    found = read(s3, where=lambda e: e["num_nodes"] == 2, newest=50, passed=10)
    assert [e["run_key"] for e in found] == ["r0", "r1", "r2"]
