"""Shared fixtures: the local stack (started once per session if it is not up) and its clients."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dtp.local import stack as stack_cli
from dtp.local.api import AirflowApi
from dtp.local.config import StackConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# A stack the session starts runs no scheduled runs: tests trigger and backfill their own, and a nightly run started
# by unpausing a DAG would compete with them for the machine (see dtp.local.config.StackConfig.schedules).
os.environ.setdefault("DTP_SCHEDULES", "off")


def _all_healthy(cfg: StackConfig) -> bool:
    return all(state.startswith("healthy") for state in stack_cli.status(cfg).values())


@pytest.fixture(scope="session")
def stack() -> Iterator[StackConfig]:
    """The running local stack; started here (and stopped at the end) when it was not already up."""
    cfg = StackConfig.from_env()
    if other := stack_cli.started_otherwise(cfg):  # scripts/demo's stack runs the schedules: not for the tests
        print(f"Restarting the local stack: it runs with {other}, the tests with {stack_cli.settings(cfg)}")
        stack_cli.down(cfg)
    started = [] if _all_healthy(cfg) else stack_cli.up(cfg)
    os.environ.update(cfg.airflow_env())
    yield cfg
    if started and os.environ.get("DTP_KEEP_STACK") != "1":
        stack_cli.down(cfg)


@pytest.fixture(scope="session")
def aws(stack: StackConfig):
    """boto3 clients against the local emulator."""
    import boto3

    session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    return lambda service: session.client(service, endpoint_url=stack.moto_url)


@pytest.fixture(scope="session")
def airflow_api(stack: StackConfig) -> AirflowApi:
    return AirflowApi(stack.airflow_url, "admin", stack.passwords()["admin"])


def _in_own_thread(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run(coroutine)`` in a thread of its own: the session's Playwright (tests/ui) keeps an event loop
    running in this one, where ``asyncio.run`` refuses to start."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.fixture
def run_coroutine() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """``run_coroutine(coroutine)``: run it to its end, as the triggerer would, and return its result."""
    return _in_own_thread


@pytest.fixture
def first_event() -> Callable[[Any], dict[str, Any]]:
    """``first_event(trigger)``: run a trigger as the triggerer does and return its first event's payload."""

    async def first(trigger: Any) -> dict[str, Any]:
        async for event in trigger.run():
            return dict(event.payload)
        raise AssertionError(f"{type(trigger).__name__} ended without an event")

    return lambda trigger: _in_own_thread(first(trigger))
