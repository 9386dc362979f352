"""SlurmHook, SlurmJobTrigger and the staging step against the real local Slurm cluster and emulator."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from airflow.sdk.exceptions import TaskDeferred
from slurm_support import XComSink, job_script, submit

from dtp.form_params import ParamsError
from dtp.hooks.slurm import SlurmControllerUnreachable, SlurmHook
from dtp.hostlist import expand_hostlist
from dtp.naming import RunNames
from dtp.operators.slurm import SlurmJobFailed, SlurmJobOverTime, SlurmSubmitJobOperator
from dtp.pipeline.spec import build_spec
from dtp.triggers.slurm import SlurmJobTrigger

pytestmark = pytest.mark.stack
Cancel = Callable[[str], str]  # the ``cancel_after`` fixture


def test_submit_wait_and_stream_log(workdir: Path, cancel_after: Cancel, first_event) -> None:
    hook = SlurmHook()
    script = job_script(workdir, "for i in 1 2 3; do echo line-$i; sleep 1; done\nsrun hostname >/dev/null\n")
    name = cancel_after(f"it-{uuid.uuid4().hex[:6]}")
    job_id = hook.submit(script, job_name=name, output=str(workdir / "out-%j.log"))
    assert [j.job_id for j in hook.find_jobs(name)] == [job_id]
    trigger = SlurmJobTrigger(job_id=job_id, log_path=str(workdir / f"out-{job_id}.log"), poll_interval=1)
    event = first_event(trigger)
    assert event["status"] == "success" and event["state"] == "COMPLETED"
    assert [line for line in event["tail"] if line.startswith("line-")] == ["line-1", "line-2", "line-3"]
    assert hook.get_job(job_id).succeeded


def test_failed_job_reports_state_and_tail(workdir: Path, cancel_after: Cancel, first_event) -> None:
    hook = SlurmHook()
    name = cancel_after(f"it-fail-{uuid.uuid4().hex[:6]}")
    job_id = hook.submit(
        job_script(workdir, "echo about-to-fail\nexit 3\n"), job_name=name, output=str(workdir / "o-%j")
    )
    event = first_event(SlurmJobTrigger(job_id=job_id, log_path=str(workdir / f"o-{job_id}"), poll_interval=1))
    assert event["status"] == "failed" and event["state"] == "FAILED"
    assert event["exit_code"].startswith("3:")
    assert "about-to-fail" in event["tail"]


def test_silent_job_is_reported_hung(workdir: Path, cancel_after: Cancel, first_event) -> None:
    hook = SlurmHook()
    name = cancel_after(f"it-hang-{uuid.uuid4().hex[:6]}")
    job_id = hook.submit(job_script(workdir, "echo started\nsleep 300\n"), job_name=name, output=str(workdir / "h-%j"))
    trigger = SlurmJobTrigger(job_id=job_id, log_path=str(workdir / f"h-{job_id}"), poll_interval=1, hang_timeout=4)
    event = first_event(trigger)
    assert event["status"] == "hung" and "no new log line" in event["message"]
    assert hook.cancel_by_name(name) == [job_id]
    for _ in range(30):
        if not hook.find_jobs(name):
            break
        time.sleep(1)
    assert hook.find_jobs(name) == []


def test_a_job_slurm_has_no_record_of_is_reported_lost(workdir: Path, first_event) -> None:
    # An id no job of this cluster had: scontrol calls it invalid (an answer, unlike a slurmctld out of reach) and
    # the completion log has no row, as for a job slurmctld forgot on a cluster that keeps no record of ended jobs.
    job_id = "9999999"  # the local cluster's ids count up from 1
    assert SlurmHook().get_job(job_id).state == "UNKNOWN"
    trigger = SlurmJobTrigger(job_id=job_id, log_path=str(workdir / "lost"), poll_interval=1, lost_timeout=2)
    event = first_event(trigger)
    assert event["status"] == "lost" and "no record of the job for 2s" in event["message"]
    operator = SlurmSubmitJobOperator(task_id="train", script_path="/s.sh", job_name="it-lost", output_path="/o-%j")
    with pytest.raises(SlurmJobFailed, match=r"^Slurm job 9999999 is lost: Slurm has had no record of the job"):
        operator.execute_complete({}, event)


@pytest.mark.timeout(180)  # each scontrol to the dead port takes about 18 s to give up
def test_a_slurmctld_that_cannot_be_reached_is_not_taken_for_a_lost_job(
    workdir: Path, cancel_after: Cancel, unreachable_slurm: str, first_event
) -> None:
    # A running job followed while slurmctld does not answer (restarting, say) for longer than lost_timeout: the
    # trigger tries again, then reports the cluster out of reach, and the job runs on. Not "lost", which fails the
    # task as if Slurm had forgotten the job.
    hook = SlurmHook()
    name = cancel_after(f"it-noctld-{uuid.uuid4().hex[:6]}")
    job_id = hook.submit(job_script(workdir, "echo started\nsleep 300\n"), job_name=name, output=str(workdir / "c-%j"))
    trigger = SlurmJobTrigger(
        job_id=job_id,
        log_path=str(workdir / f"c-{job_id}"),
        slurm_conn_id=unreachable_slurm,
        poll_interval=1,
        lost_timeout=1,
        max_reconnect_attempts=1,
    )
    event = first_event(trigger)
    assert event["status"] == "error", event
    assert event["message"].startswith("could not reach the cluster in 2 polls in a row (SlurmControllerUnreachable(")
    assert "Unable to contact slurm controller" in event["message"]
    assert [job.job_id for job in hook.find_jobs(name)] == [job_id]  # left as it is
    with pytest.raises(SlurmControllerUnreachable, match=rf"slurmctld did not answer for job {job_id}: scontrol show"):
        SlurmHook(unreachable_slurm).get_job(job_id)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("conn_id", ["slurm_default", "slurm_ssh"])  # over ssh, on_kill connects again to scancel
def test_a_user_killing_the_deferred_task_cancels_its_job(
    workdir: Path, cancel_after: Cancel, run_coroutine, conn_id: str
) -> None:
    hook = SlurmHook()
    name = cancel_after(f"it-killed-{uuid.uuid4().hex[:6]}")
    job_id = hook.submit(job_script(workdir, "echo started\nsleep 300\n"), job_name=name, output=str(workdir / "k-%j"))
    trigger = SlurmJobTrigger(
        job_id=job_id, log_path=str(workdir / f"k-{job_id}"), slurm_conn_id=conn_id, poll_interval=1
    )

    async def killed_once_running() -> None:
        """What the triggerer does when a user marks the deferred task failed: cancel the trigger's run, then call
        its ``on_kill`` and ``cleanup``."""
        following = asyncio.ensure_future(anext(trigger.run()))
        while (await asyncio.to_thread(hook.get_job, job_id)).state != "RUNNING":
            await asyncio.sleep(0.5)
        assert not following.done()
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        await trigger.on_kill()
        await trigger.cleanup()

    run_coroutine(killed_once_running())
    assert getattr(trigger.hook.__dict__.get("ssh"), "client", None) is None  # cleanup closed on_kill's connection
    deadline = time.monotonic() + 60
    while hook.find_jobs(name):
        assert time.monotonic() < deadline, f"job {job_id} still active after on_kill"
        time.sleep(1)
    assert hook.get_job(job_id).state == "CANCELLED"


@pytest.mark.timeout(120)  # without a pending timeout the trigger waits for ever
def test_a_job_that_can_never_start_fails_with_slurms_reason(workdir: Path, cancel_after: Cancel, first_event) -> None:
    # Three nodes from a two-node partition: Slurm keeps the job PENDING (PartitionNodeLimit) for ever.
    hook = SlurmHook()
    name = cancel_after(f"it-pending-{uuid.uuid4().hex[:6]}")
    operator, sink, trigger = submit(workdir, name, "echo never\n", sbatch_args=["--nodes=3"], pending_timeout=3)
    job_id = sink.pushed["job_id"]
    assert trigger.serialize()[1]["pending_timeout"] == 3
    assert hook.get_job(job_id).state == "PENDING"  # before the trigger looks, and still once it has reported
    event = first_event(trigger)
    assert (event["status"], event["state"], event["reason"]) == ("pending", "PENDING", "PartitionNodeLimit")
    assert "not started it in 3s: still PENDING" in event["message"]  # reported for the pending timeout
    assert hook.get_job(job_id).state == "PENDING"
    message = (
        rf"^Slurm job {job_id} \({name}\) did not start within 3s: it is still PENDING, Slurm's reason: "
        "PartitionNodeLimit; cancelled it$"
    )
    with pytest.raises(SlurmJobFailed, match=message):
        operator.execute_complete({"ti": sink}, event)
    assert hook.find_jobs(name) == []


def test_a_job_that_starts_is_not_reported_pending(workdir: Path, cancel_after: Cancel, first_event) -> None:
    # Held PENDING for 3 s of the trigger's polls, then released and running for longer than the pending timeout:
    # the clock stops once the job runs. Held, not --begin: slurmctld looks at begin times only every 30 s or so,
    # and starts a released job within seconds.
    hook = SlurmHook()
    job_id = hook.submit(
        job_script(workdir, "for i in $(seq 12); do echo tick-$i; sleep 1; done\n"),
        job_name=cancel_after(f"it-starts-{uuid.uuid4().hex[:6]}"),
        output=str(workdir / "s-%j"),
        extra_args=["--hold"],
    )
    assert (hook.get_job(job_id).state, hook.get_job(job_id).reason) == ("PENDING", "JobHeldUser")
    trigger = SlurmJobTrigger(job_id=job_id, log_path=str(workdir / f"s-{job_id}"), poll_interval=1, pending_timeout=10)
    release = threading.Timer(3, hook.run, [["scontrol", "release", job_id]])
    release.start()
    try:
        event = first_event(trigger)
    finally:
        release.cancel()
        release.join()
    assert (event["status"], event["state"]) == ("success", "COMPLETED")
    assert event["tail"][-1] == "tick-12"  # it ran its 12 s, past the pending timeout


def test_a_hung_job_is_gone_before_the_task_fails(workdir: Path, cancel_after: Cancel, first_event) -> None:
    # The job ignores scancel's SIGTERM, as a rank stuck in a collective may: Slurm lists it (COMPLETING) until
    # KillWait passes and SIGKILL ends it. A retry that found it then would re-attach to it instead of resubmitting.
    hook = SlurmHook()
    name = cancel_after(f"it-hung-{uuid.uuid4().hex[:6]}")
    operator, sink, trigger = submit(workdir, name, "trap '' TERM\necho started\nsleep 300\n", hang_timeout=3)
    job_id = sink.pushed["job_id"]
    event = first_event(trigger)
    assert event["status"] == "hung"
    with pytest.raises(SlurmJobFailed, match=rf"^Slurm job {job_id} hung \(no new log line for 3s\); cancelled it"):
        operator.execute_complete({"ti": sink}, event)
    assert hook.find_jobs(name) == []
    assert hook.get_job(job_id).state == "CANCELLED"


def test_a_try_that_finds_its_job_completing_waits_for_its_end_and_submits_anew(
    workdir: Path, cancel_after: Cancel
) -> None:
    # What a cleared task's next try finds: the trigger's on_kill cancelled the job and waited for nothing, and the
    # job (ignoring SIGTERM, as a rank stuck in a collective may) is COMPLETING until KillWait's SIGKILL.
    hook = SlurmHook()
    name = cancel_after(f"it-ending-{uuid.uuid4().hex[:6]}")
    operator, sink, _ = submit(workdir, name, "trap '' TERM\necho started\nsleep 300\n")
    job_id = sink.pushed["job_id"]
    deadline = time.monotonic() + 60
    while hook.get_job(job_id).state != "RUNNING":
        assert time.monotonic() < deadline, f"job {job_id} never ran"
        time.sleep(1)
    hook.cancel_job(job_id)
    assert [job.state for job in hook.find_jobs(name)] == ["COMPLETING"]

    with pytest.raises(TaskDeferred):
        operator.execute({"ti": sink})
    retried = sink.pushed["job_id"]
    assert retried != job_id and hook.get_job(job_id).state == "CANCELLED"
    assert [job.job_id for job in hook.find_jobs(name)] == [retried]


def test_rerun_reuses_a_completed_job_and_resubmits_a_failed_one(
    workdir: Path, cancel_after: Cancel, first_event
) -> None:
    hook = SlurmHook()
    ok_name, bad_name = cancel_after(f"it-done-{uuid.uuid4().hex[:6]}"), cancel_after(f"it-bad-{uuid.uuid4().hex[:6]}")
    ok_id = hook.submit(job_script(workdir, "echo done\n"), job_name=ok_name, output=str(workdir / "d-%j"))
    bad_id = hook.submit(job_script(workdir, "exit 1\n"), job_name=bad_name, output=str(workdir / "b-%j"))
    for job_id in (ok_id, bad_id):
        first_event(SlurmJobTrigger(job_id=job_id, log_path="/dev/null", poll_interval=1))
    assert [(j.job_id, j.state) for j in hook.ended_jobs(ok_name)] == [(ok_id, "COMPLETED")]
    assert [(j.job_id, j.state) for j in hook.ended_jobs(bad_name)] == [(bad_id, "FAILED")]

    def operator(name: str, body: str) -> SlurmSubmitJobOperator:
        script = workdir / f"{name}.sh"
        script.write_text(f"#!/bin/bash\n{body}\n")
        return SlurmSubmitJobOperator(
            task_id=name, script_path=str(script), job_name=name, output_path=str(workdir / "r-%j")
        )

    sink = XComSink()
    result = operator(ok_name, "echo again").execute({"ti": sink})
    assert result == {"job_id": ok_id, "log_path": str(workdir / f"r-{ok_id}"), "state": "COMPLETED"}
    assert sink.pushed["job_id"] == ok_id
    with pytest.raises(TaskDeferred):
        operator(bad_name, "echo retried").execute({"ti": sink})
    retried = sink.pushed["job_id"]
    assert retried != bad_id and hook.get_job(retried).name == bad_name


def test_read_file_continues_from_offset(workdir: Path) -> None:
    hook = SlurmHook()
    path = workdir / "grow.log"
    path.write_text("a\n")
    text, offset = hook.read_file(str(path))
    with path.open("a") as fh:
        fh.write("b\n")
    more, _ = hook.read_file(str(path), offset)
    assert (text, more) == ("a\n", "b\n")
    assert hook.read_file(str(workdir / "missing"), 7) == ("", 7)


def test_node_count(stack) -> None:
    assert SlurmHook().node_count() == stack.slurm_nodes


@pytest.mark.parametrize("expression", ["n1", "n[1-3]", "n[01-03],gpu-7", "node[9-11],n[2,4-5]", "n[1-2],n1"])
def test_hostlists_expand_as_slurm_expands_them(stack, expression: str) -> None:
    assert expand_hostlist(expression) == SlurmHook().run(["scontrol", "show", "hostnames", expression]).split()


def test_excluded_nodes_count_once_against_the_cluster_and_must_be_its_own(stack) -> None:
    conf = {"platform": "local", "recipe": "tiny", "num_nodes": 1}
    names = RunNames("train_e2e", "manual__1")
    spec = build_spec({}, {**conf, "exclude_nodes": "n2,n2,n[2-2]"}, names)
    assert spec["params"]["exclude_nodes"] == "n2,n2,n[2-2]"
    with pytest.raises(ParamsError, match=r"has at most 0 nodes once 2 are excluded"):
        build_spec({}, {**conf, "exclude_nodes": "n[1-2],n1"}, names)
    with pytest.raises(ParamsError, match=r"got 'n\[2-3\]'; the cluster has no node n3 \(its nodes: n1, n2\)"):
        build_spec({}, {**conf, "exclude_nodes": "n[2-3]"}, names)


def test_platform_teardown_cancels_every_job_of_the_run(workdir: Path, cancel_after: Cancel) -> None:
    from dtp.platforms.local import LocalSlurmPlatform

    hook = SlurmHook()
    run = f"dtp-it-{uuid.uuid4().hex[:6]}"
    for suffix in ("", "-preflight"):
        script = workdir / f"job{suffix}.sh"
        script.write_text("#!/bin/bash\nsleep 300\n")
        hook.submit(str(script), job_name=cancel_after(f"{run}{suffix}"), output=str(workdir / "o-%j"))
    other_name = cancel_after(f"x{run}")
    other = hook.submit(job_script(workdir, "sleep 300\n"), job_name=other_name, output=str(workdir / "x-%j"))
    assert len(hook.find_jobs(run, prefix=True)) == 2
    result = LocalSlurmPlatform().teardown({"names": {"slurm_job": run}})
    assert len(result["cancelled_jobs"]) == 2 and hook.find_jobs(run, prefix=True) == []
    assert [j.job_id for j in hook.find_jobs(other_name)] == [other]


def test_a_kept_cluster_keeps_no_job_of_the_run_running(workdir: Path, cancel_after: Cancel) -> None:
    # keep_cluster: teardown_cluster deletes nothing, but the run is over, so its jobs must not hold the nodes.
    from dtp.naming import EXPIRES_TAG
    from dtp.operators.cluster import TeardownClusterOperator

    hook = SlurmHook()
    run = cancel_after(f"dtp-it-{uuid.uuid4().hex[:6]}")
    hook.submit(job_script(workdir, "sleep 300\n"), job_name=run, output=str(workdir / "o-%j"))
    spec = {
        "params": {"platform": "local", "keep_cluster": True},
        "names": {"slurm_job": run},
        "tags": {EXPIRES_TAG: "2026-12-31T00:00:00Z"},
    }
    result = TeardownClusterOperator(task_id="teardown_cluster", spec=spec).execute(context={})
    assert result["kept"] is True and len(result["cancelled_jobs"]) == 1
    assert hook.find_jobs(run, prefix=True) == []


def test_a_job_past_its_time_limit_is_stopped_by_slurm_and_not_run_again(
    workdir: Path, cancel_after: Cancel, first_event
) -> None:
    # What budget_usd becomes for priced instances: sbatch --time; Slurm itself stops the job there.
    name = cancel_after(f"it-overtime-{uuid.uuid4().hex[:6]}")
    operator, sink, trigger = submit(workdir, name, "echo started\nsleep 600\n", time_limit_minutes=1)
    job_id = sink.pushed["job_id"]
    assert "TimeLimit=00:01:00" in SlurmHook().run(["scontrol", "show", "job", job_id])
    event = first_event(trigger)
    assert event["state"] == "TIMEOUT"
    with pytest.raises(SlurmJobOverTime, match=f"Slurm job {job_id} ran past its time limit of 1 min"):
        operator.execute_complete({"ti": sink}, event)
    # A retry (or a cleared task) finds the job that ran out of time and does not submit it again.
    with pytest.raises(SlurmJobOverTime, match="already ran past its time limit; not submitting it again"):
        operator.execute({"ti": sink})
    assert [job.job_id for job in SlurmHook().ended_jobs(name)] == [job_id]


def test_a_retried_job_gets_what_is_left_of_the_time_limit(workdir: Path, cancel_after: Cancel, first_event) -> None:
    name = cancel_after(f"it-retry-limit-{uuid.uuid4().hex[:6]}")
    operator, sink, trigger = submit(workdir, name, "sleep 2\nexit 1\n", time_limit_minutes=2)
    failed_id = sink.pushed["job_id"]
    assert "TimeLimit=00:02:00" in SlurmHook().run(["scontrol", "show", "job", failed_id])
    event = first_event(trigger)
    with pytest.raises(SlurmJobFailed):
        operator.execute_complete({"ti": sink}, event)
    # The retry's job may run what the failed one left: 2 min less its (rounded up) minute.
    Path(operator.script_path).write_text(Path(operator.script_path).read_text().replace("exit 1", "sleep 600"))
    with pytest.raises(TaskDeferred):
        operator.execute({"ti": sink})
    retried = sink.pushed["job_id"]
    assert retried != failed_id
    assert "TimeLimit=00:01:00" in SlurmHook().run(["scontrol", "show", "job", retried])


def test_a_failed_jobs_exception_is_in_the_tasks_error_however_much_boilerplate_follows_it(
    workdir: Path, cancel_after: Cancel, first_event
) -> None:
    # The exception, then more lines than the error quotes of the log's end (torchrun's summary runs to some 20).
    name = cancel_after(f"it-raised-{uuid.uuid4().hex[:6]}")
    body = 'echo "RuntimeError: injected failure"\nfor i in $(seq 25); do echo boilerplate-$i; done\nexit 1\n'
    operator, sink, trigger = submit(workdir, name, body)
    job_id = sink.pushed["job_id"]
    event = first_event(trigger)
    assert (event["state"], event["exit_code"]) == ("FAILED", "1:0")
    message = (
        rf"^Slurm job {job_id} ended FAILED \(exit code 1:0\)\. Error lines:\nRuntimeError: injected failure\n"
        r"Last lines:\n(boilerplate-\d+\n){19}boilerplate-25$"
    )
    with pytest.raises(SlurmJobFailed, match=message):
        operator.execute_complete({"ti": sink}, event)
    # Its exit code and nodes, and when it was submitted (sacct's time, in UTC).
    hook = SlurmHook()
    job = hook.get_job(job_id)
    assert (job.exit_code, expand_hostlist(job.nodes)) == ("1:0", ["n1", "n2"])
    (ended,) = hook.ended_jobs(name)
    assert ended.submitted_at is not None and abs((datetime.now(UTC) - ended.submitted_at).total_seconds()) < 120


@pytest.mark.parametrize("conn_id", ["slurm_default", "slurm_ssh"])
def test_read_log_reads_a_piece_at_a_time(workdir: Path, conn_id: str) -> None:
    path = workdir / "long.log"
    path.write_text("".join(f"line-{n:03d}\n" for n in range(100)))  # 9 bytes a line
    hook = SlurmHook(conn_id)
    text, offset = hook.read_log(str(path), 0, 500)
    rest, end = hook.read_log(str(path), offset, 500)
    assert (len(text), offset, end) == (500, 500, 900) and text + rest == path.read_text()
    assert hook.read_log(str(path), end, 500) == ("", 900)
    assert hook.read_log(str(workdir / "missing"), 7, 500) == ("", 7)


def test_unavailable_nodes_are_listed_with_slurms_reasons(stack) -> None:
    # The stack's nodes are up (draining one would take it from the other tests): sinfo answers, with no node.
    assert SlurmHook().unavailable_nodes() == []
