"""Shared fixtures: the local stack (started once per session if it is not up) and its clients."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dtp.local.config import StackConfig
from dtp.local import stack as stack_cli

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _all_healthy(cfg: StackConfig) -> bool:
    return all(state.startswith("healthy") for state in stack_cli.status(cfg).values())


@pytest.fixture(scope="session")
def stack() -> Iterator[StackConfig]:
    """The running local stack; started here (and stopped at the end) when it was not already up."""
    cfg = StackConfig.from_env()
    started = False
    if not _all_healthy(cfg):
        stack_cli.up(cfg)
        started = True
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


class AirflowApi:
    """A minimal REST v2 client for the tests: token login, JSON in and out."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url
        self.token = self._login(username, password)

    def _login(self, username: str, password: str) -> str:
        status, body = self.request("POST", "/auth/token", {"username": username, "password": password}, auth=False)
        assert status in (200, 201), body
        return body["access_token"]

    def request(self, method: str, path: str, payload: dict | None = None, auth: bool = True) -> tuple[int, dict]:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except json.JSONDecodeError:
                return err.code, {"detail": raw.decode(errors="replace")}


@pytest.fixture(scope="session")
def airflow_api(stack: StackConfig) -> AirflowApi:
    return AirflowApi(stack.airflow_url, "admin", stack.passwords()["admin"])
