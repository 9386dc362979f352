"""Fixtures of the integration tests: the emulator's error rules, a run's network stack, a job folder on the
shared filesystem."""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

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


@pytest.fixture
def workdir(stack) -> Path:
    """A fresh folder on the cluster's shared filesystem, where every node sees a job's script and output."""
    path = stack.shared_dir / "it" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    return path
