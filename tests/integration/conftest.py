"""Fixtures of the integration tests: the emulator's error rules, a run's network stack, a job folder on the
shared filesystem, Slurm jobs cancelled whatever the test's outcome, a Slurm connection that reaches no slurmctld."""

from __future__ import annotations

import json
import shutil
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dtp.hooks.slurm import SlurmHook
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
def workdir(stack) -> Iterator[Path]:
    """A fresh folder on the cluster's shared filesystem, where every node sees a job's script and output; removed
    after the test."""
    path = stack.shared_dir / "it" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def cancel_after(workdir: Path) -> Iterator[Callable[[str], str]]:
    """``cancel_after(name)``: ``name``, whose Slurm jobs still active when the test ends are cancelled then (and
    waited on), however it ended: a job an assertion left running would hold the cluster's two nodes from the next
    tests. Before ``workdir`` is removed: the jobs write into it."""
    names: list[str] = []

    def register(name: str) -> str:
        names.append(name)
        return name

    yield register
    hook = SlurmHook()
    for name in names:
        hook.cancel_and_wait(name)


@pytest.fixture
def unreachable_slurm(stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A Slurm connection on this host that reaches no slurmctld (a copy of slurm.conf with a dead SlurmctldPort)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "\n".join(
            "SlurmctldPort=9" if line.startswith("SlurmctldPort=") else line
            for line in stack.slurm_conf.read_text().splitlines()
        )
    )
    extra = {"transport": "local", "slurm_conf": str(conf)}
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_UNREACHABLE", json.dumps({"conn_type": "generic", "extra": extra}))
    return "slurm_unreachable"
