"""A command on this host (transport ``local``) that does not finish in time: the cluster is out of reach, as over
ssh, so the Slurm trigger tries the poll again instead of failing the task."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from dtp.hooks.shared_fs import COMMAND_TIMEOUT_S, SharedFilesystemHook
from dtp.triggers.slurm import SlurmJobTrigger


class HangingOnce:
    """``subprocess.run`` whose first command hangs past its timeout; the next ones print ``answer``."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        self.calls.append(argv)
        if len(self.calls) == 1:
            raise subprocess.TimeoutExpired(argv, kwargs["timeout"])
        return subprocess.CompletedProcess(argv, 0, self.answer.encode(), b"")


@pytest.fixture(autouse=True)
def local_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_DEFAULT", json.dumps({"conn_type": "generic", "extra": {}}))


def test_a_command_that_does_not_finish_in_time_raises_timeout_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", HangingOnce(""))
    with pytest.raises(TimeoutError, match=f"scontrol did not finish in {COMMAND_TIMEOUT_S} s"):
        SharedFilesystemHook("slurm_default").run(["scontrol", "show", "job", "7"])


def test_the_slurm_trigger_tries_a_timed_out_scontrol_again(monkeypatch: pytest.MonkeyPatch, first_event: Any) -> None:
    hanging = HangingOnce("JobId=7 JobName=run JobState=COMPLETED ExitCode=0:0 NodeList=n1\n")
    monkeypatch.setattr(subprocess, "run", hanging)
    monkeypatch.setattr(SlurmJobTrigger, "_reconnect_delay", staticmethod(lambda attempt: 0))
    event = first_event(SlurmJobTrigger(job_id="7", log_path="/nonexistent/o-7", poll_interval=0))
    assert (event["status"], event["state"]) == ("success", "COMPLETED")
    assert [argv[0] for argv in hanging.calls] == ["scontrol", "scontrol"]
