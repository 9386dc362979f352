"""SlurmJobTrigger when the cluster is out of reach for a while: a poll that cannot reach it is tried again on a new
connection, and only polls failing in a row, past a bound, end the trigger (the job left as it is). The hook is a
stand-in that fails the polls it is told to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from paramiko.ssh_exception import SSHException

from dtp.hooks.slurm import SlurmControllerUnreachable, SlurmJob
from dtp.triggers.slurm import SlurmJobTrigger


class FlakyCluster:
    """A ``SlurmHook`` on a cluster whose job logs a line each poll while it runs, for three answered polls, then
    completes; each poll's ``get_job`` raises the next of ``drops`` (None: it answers) while any are left. It counts
    ``close``, and has no ``cancel_job``: the trigger never cancels the job (``on_kill`` aside)."""

    drops: list[BaseException | None] = []
    made: list[FlakyCluster] = []

    def __init__(self, slurm_conn_id: str, head_node: str | None, head_node_host_keys: Sequence[str] = ()) -> None:
        self.answers, self.closed = 0, 0
        self.made.append(self)

    def read_log(self, path: str, offset: int, max_bytes: int) -> tuple[str, int]:
        return (f"step {offset}\n", offset + 1) if self.answers < 3 else ("", offset)

    def get_job(self, job_id: str) -> SlurmJob:
        if self.drops and (error := self.drops.pop(0)) is not None:
            raise error
        self.answers += 1
        return SlurmJob(job_id=job_id, name="run", state="RUNNING" if self.answers < 4 else "COMPLETED")

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> type[FlakyCluster]:
    monkeypatch.setattr("dtp.triggers.slurm.SlurmHook", FlakyCluster)
    monkeypatch.setattr(SlurmJobTrigger, "_reconnect_delay", staticmethod(lambda attempt: 0))
    FlakyCluster.drops, FlakyCluster.made = [], []
    return FlakyCluster


def trigger(**kwargs: Any) -> SlurmJobTrigger:
    return SlurmJobTrigger(job_id="7", log_path="/fsx/o-7", poll_interval=0, **kwargs)


def test_polls_that_cannot_reach_the_cluster_are_tried_again_on_a_new_connection(
    cluster: type[FlakyCluster], first_event: Any, run_coroutine: Any
) -> None:
    # Three drops in a row, an answer (which resets the count), then three more: never more than three in a row.
    cluster.drops = [SSHException("Connection reset"), EOFError(), TimeoutError("timed out"), None, OSError("No route"),
                     SSHException("SSH session not active"), EOFError()]  # fmt: skip
    waiting = trigger(max_reconnect_attempts=3)
    event = first_event(waiting)
    assert (event["status"], event["state"]) == ("success", "COMPLETED")
    # Each line once, in order: the lines a failed poll read before it failed were forwarded then.
    assert event["tail"] == [f"step {n}" for n in range(9)]
    (hook,) = cluster.made
    assert hook.closed == 6 + 1  # once per failed poll, so the next connects afresh, and once at the end
    run_coroutine(waiting.cleanup())  # the triggerer's, last, however the trigger ended (after on_kill's scancel)
    assert hook.closed == 6 + 2 and cluster.made == [hook]


def test_a_slurmctld_that_does_not_answer_is_waited_out_not_taken_for_a_lost_job(
    cluster: type[FlakyCluster], first_event: Any
) -> None:
    # A slurmctld restarting for longer than lost_timeout: the job runs on meanwhile, and completes.
    cluster.drops = [
        None,
        *[SlurmControllerUnreachable("slurm_load_jobs error: Unable to contact slurm controller")] * 3,
    ]
    event = first_event(trigger(max_reconnect_attempts=3, lost_timeout=0))
    assert (event["status"], event["state"]) == ("success", "COMPLETED")
    (hook,) = cluster.made
    assert cluster.drops == [] and hook.closed == 3 + 1


def test_a_cluster_out_of_reach_poll_after_poll_ends_the_trigger_leaving_the_job(
    cluster: type[FlakyCluster], first_event: Any
) -> None:
    cluster.drops = [None, *[OSError("Connection refused")] * 4]
    event = first_event(trigger(max_reconnect_attempts=3))
    assert (event["status"], event["state"]) == ("error", "RUNNING")  # as the last poll that answered found it
    assert event["message"] == (
        "could not reach the cluster in 4 polls in a row (OSError('Connection refused')); the job is left as it is"
    )
    (hook,) = cluster.made
    assert cluster.drops == [] and hook.closed == 4 + 1


def test_the_trigger_round_trips_its_reconnect_attempts() -> None:
    classpath, kwargs = trigger(max_reconnect_attempts=4).serialize()
    assert kwargs["max_reconnect_attempts"] == 4
    assert SlurmJobTrigger(**kwargs).serialize() == (classpath, kwargs)
