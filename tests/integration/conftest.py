"""Fixtures of the integration tests: the emulator's error rules."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from dtp.local.emulator import FAULTS_PATH


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
