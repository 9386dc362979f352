"""SlurmHook, SlurmJobTrigger and the staging step against the real local Slurm cluster and emulator."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from dtp.hooks.slurm import SlurmCommandError, SlurmHook
from dtp.operators.slurm import SlurmJobFailed, SlurmJobOverTime, SlurmSubmitJobOperator
from dtp.triggers.slurm import SlurmJobTrigger

pytestmark = pytest.mark.stack


@pytest.fixture
def workdir(stack) -> Path:
    path = stack.shared_dir / "it" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    return path


def _script(workdir: Path, body: str) -> str:
    path = workdir / "job.sh"
    path.write_text("#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n" + body)
    return str(path)


def test_submit_wait_and_stream_log(workdir: Path, first_event) -> None:
    hook = SlurmHook()
    script = _script(workdir, "for i in 1 2 3; do echo line-$i; sleep 1; done\nsrun hostname >/dev/null\n")
    name = f"it-{uuid.uuid4().hex[:6]}"
    job_id = hook.submit(script, job_name=name, output=str(workdir / "out-%j.log"))
    assert [j.job_id for j in hook.find_jobs(name)] == [job_id]
    trigger = SlurmJobTrigger(job_id=job_id, log_path=str(workdir / f"out-{job_id}.log"), poll_interval=1)
    event = first_event(trigger)
    assert event["status"] == "success" and event["state"] == "COMPLETED"
    assert [line for line in event["tail"] if line.startswith("line-")] == ["line-1", "line-2", "line-3"]
    assert hook.get_job(job_id).succeeded


def test_failed_job_reports_state_and_tail(workdir: Path, first_event) -> None:
    hook = SlurmHook()
    job_id = hook.submit(
        _script(workdir, "echo about-to-fail\nexit 3\n"), job_name="it-fail", output=str(workdir / "o-%j")
    )
    event = first_event(SlurmJobTrigger(job_id=job_id, log_path=str(workdir / f"o-{job_id}"), poll_interval=1))
    assert event["status"] == "failed" and event["state"] == "FAILED"
    assert event["exit_code"].startswith("3:")
    assert "about-to-fail" in event["tail"]


def test_silent_job_is_reported_hung(workdir: Path, first_event) -> None:
    hook = SlurmHook()
    name = f"it-hang-{uuid.uuid4().hex[:6]}"
    job_id = hook.submit(_script(workdir, "echo started\nsleep 300\n"), job_name=name, output=str(workdir / "h-%j"))
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
    # An id no job of this cluster had: scontrol calls it invalid and the completion log has no row, as for a job
    # slurmctld forgot on a cluster that keeps no record of ended jobs.
    job_id = "9999999"  # the local cluster's ids count up from 1
    assert SlurmHook().get_job(job_id).state == "UNKNOWN"
    trigger = SlurmJobTrigger(job_id=job_id, log_path=str(workdir / "lost"), poll_interval=1, lost_timeout=2)
    event = first_event(trigger)
    assert event["status"] == "lost" and "no record of the job for 2s" in event["message"]


@pytest.mark.timeout(120)  # without a pending timeout the trigger waits for ever
def test_a_job_that_can_never_start_fails_with_slurms_reason(workdir: Path, first_event) -> None:
    # Three nodes from a two-node partition: Slurm keeps the job PENDING (PartitionNodeLimit) for ever.
    hook = SlurmHook()
    name = f"it-pending-{uuid.uuid4().hex[:6]}"
    try:
        operator, sink, trigger = _submit(workdir, name, "echo never\n", sbatch_args=["--nodes=3"], pending_timeout=3)
        job_id = sink.pushed["job_id"]
        assert trigger.serialize()[1]["pending_timeout"] == 3
        started = time.monotonic()
        event = first_event(trigger)
        assert time.monotonic() - started >= 3
        assert (event["status"], event["state"], event["reason"]) == ("pending", "PENDING", "PartitionNodeLimit")
        message = (
            rf"^Slurm job {job_id} \({name}\) did not start within 3s: it is still PENDING, Slurm's reason: "
            "PartitionNodeLimit; cancelled it$"
        )
        with pytest.raises(SlurmJobFailed, match=message):
            operator.execute_complete({"ti": sink}, event)
        assert hook.find_jobs(name) == []
    finally:
        hook.cancel_and_wait(name)


def test_a_job_that_starts_is_not_reported_pending(workdir: Path, first_event) -> None:
    # Pending a moment, then running longer than the pending timeout: the clock stops once the job runs.
    hook = SlurmHook()
    job_id = hook.submit(
        _script(workdir, "for i in 1 2 3 4 5 6; do echo tick-$i; sleep 1; done\n"),
        job_name=f"it-starts-{uuid.uuid4().hex[:6]}",
        output=str(workdir / "s-%j"),
    )
    trigger = SlurmJobTrigger(job_id=job_id, log_path=str(workdir / f"s-{job_id}"), poll_interval=1, pending_timeout=3)
    event = first_event(trigger)
    assert (event["status"], event["state"]) == ("success", "COMPLETED")


def test_a_hung_job_is_gone_before_the_task_fails(workdir: Path, first_event) -> None:
    # The job ignores scancel's SIGTERM, as a rank stuck in a collective may: Slurm lists it (COMPLETING) until
    # KillWait passes and SIGKILL ends it. A retry that found it then would re-attach to it instead of resubmitting.
    hook = SlurmHook()
    name = f"it-hung-{uuid.uuid4().hex[:6]}"
    try:
        operator, sink, trigger = _submit(workdir, name, "trap '' TERM\necho started\nsleep 300\n", hang_timeout=3)
        job_id = sink.pushed["job_id"]
        event = first_event(trigger)
        assert event["status"] == "hung"
        with pytest.raises(SlurmJobFailed, match=rf"^Slurm job {job_id} hung \(no new log line for 3s\); cancelled it"):
            operator.execute_complete({"ti": sink}, event)
        assert hook.find_jobs(name) == []
        assert hook.get_job(job_id).state == "CANCELLED"
    finally:
        hook.cancel_and_wait(name)


class _XComSink:
    def __init__(self) -> None:
        self.pushed: dict[str, str] = {}

    def xcom_push(self, key: str, value: str) -> None:
        self.pushed[key] = value


def test_rerun_reuses_a_completed_job_and_resubmits_a_failed_one(workdir: Path, first_event) -> None:
    hook = SlurmHook()
    ok_name, bad_name = f"it-done-{uuid.uuid4().hex[:6]}", f"it-bad-{uuid.uuid4().hex[:6]}"
    ok_id = hook.submit(_script(workdir, "echo done\n"), job_name=ok_name, output=str(workdir / "d-%j"))
    bad_id = hook.submit(_script(workdir, "exit 1\n"), job_name=bad_name, output=str(workdir / "b-%j"))
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

    sink = _XComSink()
    result = operator(ok_name, "echo again").execute({"ti": sink})
    assert result == {"job_id": ok_id, "log_path": str(workdir / f"r-{ok_id}"), "state": "COMPLETED"}
    assert sink.pushed["job_id"] == ok_id
    with pytest.raises(TaskDeferred):
        operator(bad_name, "echo retried").execute({"ti": sink})
    retried = sink.pushed["job_id"]
    assert retried != bad_id and hook.get_job(retried).name == bad_name
    hook.cancel_and_wait(bad_name)


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


def test_platform_teardown_cancels_every_job_of_the_run(workdir: Path) -> None:
    from dtp.platforms.local import LocalSlurmPlatform

    hook = SlurmHook()
    run = f"dtp-it-{uuid.uuid4().hex[:6]}"
    for suffix in ("", "-preflight"):
        script = workdir / f"job{suffix}.sh"
        script.write_text("#!/bin/bash\nsleep 300\n")
        hook.submit(str(script), job_name=f"{run}{suffix}", output=str(workdir / "o-%j"))
    other = hook.submit(_script(workdir, "sleep 300\n"), job_name=f"x{run}", output=str(workdir / "x-%j"))
    assert len(hook.find_jobs(run, prefix=True)) == 2
    result = LocalSlurmPlatform().teardown({"names": {"slurm_job": run}})
    assert len(result["cancelled_jobs"]) == 2 and hook.find_jobs(run, prefix=True) == []
    assert [j.job_id for j in hook.find_jobs(f"x{run}")] == [other]
    hook.cancel_job_and_wait(other)


def _submit(workdir: Path, name: str, body: str, **options: Any) -> tuple[SlurmSubmitJobOperator, _XComSink, Any]:
    """Submit ``body`` through the operator (``options`` its arguments); return it, its XCom sink and its trigger."""
    operator = SlurmSubmitJobOperator(
        task_id="train",
        script_path=_script(workdir, body),
        job_name=name,
        output_path=str(workdir / f"{name}-%j"),
        poll_interval=1,
        **options,
    )
    sink = _XComSink()
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute({"ti": sink})
    return operator, sink, deferred.value.trigger


def test_a_job_past_its_time_limit_is_stopped_by_slurm_and_not_run_again(workdir: Path, first_event) -> None:
    # What budget_usd becomes for priced instances: sbatch --time; Slurm itself stops the job there.
    name = f"it-overtime-{uuid.uuid4().hex[:6]}"
    operator, sink, trigger = _submit(workdir, name, "echo started\nsleep 600\n", time_limit_minutes=1)
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


def test_a_retried_job_gets_what_is_left_of_the_time_limit(workdir: Path, first_event) -> None:
    name = f"it-retry-limit-{uuid.uuid4().hex[:6]}"
    operator, sink, trigger = _submit(workdir, name, "sleep 2\nexit 1\n", time_limit_minutes=2)
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
    try:
        assert retried != failed_id
        assert "TimeLimit=00:01:00" in SlurmHook().run(["scontrol", "show", "job", retried])
    finally:
        SlurmHook().cancel_and_wait(name)


# --- what sacct knows of ended jobs ------------------------------------------------------------------------------


def cluster_variant(stack, tmp_path: Path, monkeypatch, name: str, **settings: str) -> str:
    """A connection to the local cluster through a copy of its slurm.conf with ``settings`` changed (what client
    commands read: sacct's sources, slurmctld's port); return the connection's id."""
    original = stack.slurm_conf.read_text().splitlines()
    present = {line.split("=", 1)[0] for line in original}
    lines = []
    for line in original:
        key = line.split("=", 1)[0]
        if key == "NodeName":  # settings it lacks go before the nodes (once: then they are present)
            lines += [f"{k}={v}" for k, v in settings.items() if k not in present]
            present |= settings.keys()
        lines.append(f"{key}={settings[key]}" if key in settings else line)
    path = tmp_path / f"{name}.conf"
    path.write_text("\n".join(lines) + "\n")
    conn_id = f"slurm_{name}"
    extra = {"transport": "local", "slurm_conf": str(path)}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "generic", "extra": extra}))
    return conn_id


def test_a_failing_sacct_is_not_read_as_no_ended_jobs(stack, workdir: Path, tmp_path: Path, monkeypatch) -> None:
    # A cluster that keeps its ended jobs in slurmdbd only, while slurmdbd is down (nothing listens on port 9): the
    # real sacct fails ("Connection refused"). Read as "no job ended", a retry would submit training again.
    conn_id = cluster_variant(
        stack,
        tmp_path,
        monkeypatch,
        "dbd_down",
        JobCompType="jobcomp/none",
        AccountingStorageType="accounting_storage/slurmdbd",
        AccountingStorageHost="127.0.0.1",
        AccountingStoragePort="9",
    )
    name = f"it-dbd-down-{uuid.uuid4().hex[:6]}"
    with pytest.raises(SlurmCommandError, match=r"sacct -X: .*Connection refused"):
        SlurmHook(conn_id).ended_jobs(name)
    operator = SlurmSubmitJobOperator(
        task_id="train",
        script_path=_script(workdir, "sleep 600\n"),
        job_name=name,
        output_path=str(workdir / "o-%j"),
        slurm_conn_id=conn_id,
    )
    sink = _XComSink()
    try:
        with pytest.raises(SlurmCommandError):
            operator.execute({"ti": sink})
    finally:
        SlurmHook().cancel_and_wait(name)
    assert sink.pushed == {}


def test_a_cluster_that_keeps_no_record_of_ended_jobs_has_none(stack, tmp_path: Path, monkeypatch) -> None:
    # Neither a completion log nor slurmdbd: sacct calls both sources disabled. That is no failure (the trigger
    # reports such a job lost once slurmctld forgets it), nor is a completion log no job has ended into yet.
    hook = SlurmHook(cluster_variant(stack, tmp_path, monkeypatch, "no_record", JobCompType="jobcomp/none"))
    assert hook.ended_jobs("it-anything") == [] and hook.get_job("9999999").state == "UNKNOWN"
    fresh = cluster_variant(stack, tmp_path, monkeypatch, "fresh", JobCompLoc=str(tmp_path / "none-yet.log"))
    assert SlurmHook(fresh).ended_jobs("it-anything") == []


# ``sacct`` for a cluster whose ended jobs are in slurmdbd, which does not run here. ``-X`` (the accounting database)
# answers with the rows of the completion log at $STANDIN_JOBCOMP_CONF whose job ended inside the time window that
# the real sacct makes of the same options (``-v`` prints it), as slurmdbd selects rows; anything else is the real
# sacct. The completion log itself cannot show the defect: jobcomp/filetxt ignores sacct's time window.
STANDIN_SACCT = """#!{python}
import os, subprocess, sys
from datetime import datetime

REAL = {real!r}
args = sys.argv[1:]
if "-X" not in args:
    os.execv(REAL, [REAL, *args])
env = {{**os.environ, "SLURM_CONF": os.environ["STANDIN_JOBCOMP_CONF"]}}
args = ["-c" if arg == "-X" else arg for arg in args]
rows = subprocess.run([REAL, "-v", *args], env=env, capture_output=True, text=True, check=True)
window = next(line for line in rows.stderr.splitlines() if " time window from " in line)
start = datetime.strptime(window.split(" from ")[1].split(" to ")[0], "%a %b %d %H:%M:%S %Y")
ends = subprocess.run([REAL, "-c", "-n", "-P", "-o", "JobID,End"], env=env, capture_output=True, text=True, check=True)
inside = {{job for job, _, end in (row.partition("|") for row in ends.stdout.splitlines())
          if datetime.strptime(end, "%Y-%m-%dT%H:%M:%S") >= start}}
sys.stdout.write("".join(row + "\\n" for row in rows.stdout.splitlines() if row.split("|")[0] in inside))
"""


def _record(template: str, job_id: int, name: str, state: str, ended: datetime, ran_s: int) -> str:
    """``template``, a real job's completion-log line, made the record of another job."""
    started = ended - timedelta(seconds=ran_s)
    fields = {
        "JobId": str(job_id),
        "Name": name,
        "JobState": state,
        "StartTime": started.strftime("%Y-%m-%dT%H:%M:%S"),
        "EndTime": ended.strftime("%Y-%m-%dT%H:%M:%S"),
        "SubmitTime": started.strftime("%Y-%m-%dT%H:%M:%S"),
        "EligibleTime": started.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for key, value in fields.items():
        template = re.sub(rf"(?<![A-Za-z]){key}=\S*", f"{key}={value}", template)
    return template


def test_jobs_that_ended_before_midnight_still_count(
    stack, workdir: Path, tmp_path: Path, monkeypatch, first_event
) -> None:
    # The record of a real job of this cluster, as its completion log keeps it.
    hook = SlurmHook()
    real_name = f"it-template-{uuid.uuid4().hex[:6]}"
    real_id = hook.submit(_script(workdir, "true\n"), job_name=real_name, output="/dev/null")
    first_event(SlurmJobTrigger(job_id=real_id, log_path="/dev/null", poll_interval=1))
    jobcomp_log = Path(re.findall(r"^JobCompLoc=(.*)$", stack.slurm_conf.read_text(), re.M)[0])
    for _ in range(20):
        lines = [line for line in jobcomp_log.read_text().splitlines() if f" Name={real_name} " in line]
        if lines:
            break
        time.sleep(0.5)
    template = lines[0]
    # Jobs of three runs that ended a day ago: one completed, one ran out of its time limit, one failed after 30 min.
    run = uuid.uuid4().hex[:6]
    done, over, failed = f"it-done-{run}", f"it-over-{run}", f"it-failed-{run}"
    yesterday = datetime.now() - timedelta(days=1)  # sacct's times are local ones
    ids = {done: 90_000_001, over: 90_000_002, failed: 90_000_003}  # above the cluster's MaxJobId: never real
    log = tmp_path / "dbd-jobs.log"
    log.write_text(
        _record(template, ids[done], done, "COMPLETED", yesterday, 60)
        + "\n"
        + _record(template, ids[over], over, "TIMEOUT", yesterday, 600)
        + "\n"
        + _record(template, ids[failed], failed, "FAILED", yesterday, 1800)
        + "\n"
    )
    # A cluster that keeps no completion log and answers from slurmdbd, over the same controller.
    conn_id = cluster_variant(stack, tmp_path, monkeypatch, "dbd", JobCompType="jobcomp/none")
    cluster_variant(stack, tmp_path, monkeypatch, "dbd_rows", JobCompLoc=str(log))
    monkeypatch.setenv("STANDIN_JOBCOMP_CONF", str(tmp_path / "dbd_rows.conf"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(STANDIN_SACCT.format(python=sys.executable, real=shutil.which("sacct")))
    (bin_dir / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    dbd = SlurmHook(conn_id)
    # What slurmdbd does with sacct's default window, from midnight today: yesterday's jobs are not there.
    assert dbd.run(["sacct", "-X", "-n", "-P", "-o", "JobID"]).split() == []
    assert dbd.run(["sacct", "-X", "-n", "-P", "-S", "now-2days", "-o", "JobID"]).split() == [
        str(ids[done]),
        str(ids[over]),
        str(ids[failed]),
    ]

    assert [(j.job_id, j.state, j.elapsed_s) for j in dbd.ended_jobs(done)] == [(str(ids[done]), "COMPLETED", 60)]
    assert [j.name for j in dbd.ended_jobs(f"it-over-{run}", prefix=True)] == [over]

    def operator(name: str, **kwargs: Any) -> SlurmSubmitJobOperator:
        return SlurmSubmitJobOperator(
            task_id="train",
            script_path=_script(workdir, "sleep 600\n"),
            job_name=name,
            output_path=str(workdir / "y-%j"),
            slurm_conn_id=conn_id,
            **kwargs,
        )

    sink = _XComSink()
    # A cleared task reuses the job that completed yesterday rather than training again...
    assert operator(done).execute({"ti": sink})["job_id"] == str(ids[done])
    # ... refuses to run again a job that ran out of its time limit yesterday...
    with pytest.raises(SlurmJobOverTime, match=f"Slurm job {ids[over]} .* already ran past its time limit"):
        operator(over, time_limit_minutes=10).execute({"ti": sink})
    # ... and gives a retried job what yesterday's failed one left of the limit.
    try:
        with pytest.raises(TaskDeferred):
            operator(failed, time_limit_minutes=60).execute({"ti": sink})
        retried = sink.pushed["job_id"]
        assert "TimeLimit=00:30:00" in hook.run(["scontrol", "show", "job", retried])
    finally:
        hook.cancel_and_wait(failed)
