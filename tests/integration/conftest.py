"""Fixtures of the integration tests: the emulator's error rules, a run's network stack."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from dtp.local.emulator import FAULTS_PATH
from dtp.pipeline import network


@pytest.fixture
def set_rules(stack) -> Iterator[Callable[[list[dict]], list[dict]]]:
    """``set_rules(rules)``: make the emulator fail matching calls (see dtp.local.emulator); cleared after."""

    def put(rules: list[dict]) -> list[dict]:
        req = urllib.request.Request(
            stack.moto_url + FAULTS_PATH, data=json.dumps({"rules": rules}).encode(), method="PUT"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return list(json.loads(resp.read())["rules"])

    yield put
    put([])


@pytest.fixture
def outputs(spec: dict) -> Iterator[dict]:
    """The network stack of the module's ``spec`` (created in the emulator), its outputs; torn down after."""
    network.create_network_stack(spec, "aws_default")
    yield network.network_outputs(spec, "aws_default")
    network.teardown_network(spec, "aws_default")
