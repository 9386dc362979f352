"""What sacct knows of ended jobs, on variants of the real local cluster: jobs that ended before midnight, a
failing slurmdbd, a cluster that keeps no record of ended jobs."""

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
from slurm_support import XComSink, job_operator, job_script

from dtp.hooks.slurm import SlurmCommandError, SlurmHook
from dtp.operators.slurm import SlurmJobOverTime, SlurmSubmitJobOperator
from dtp.triggers.slurm import SlurmJobTrigger

pytestmark = pytest.mark.stack


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
    operator = job_operator(workdir, name, "sleep 600\n", slurm_conn_id=conn_id)
    sink = XComSink()
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
# answers with the rows of the completion log the cluster configuration at ``jobcomp_conf`` names, whose job ended
# inside the time window that the real sacct makes of the same options (``-v`` prints it), as slurmdbd selects rows;
# anything else is the real sacct. The completion log itself cannot show the defect: jobcomp/filetxt ignores sacct's
# time window.
STANDIN_SACCT = """#!{python}
import os, subprocess, sys
from datetime import datetime

REAL = {real!r}
args = sys.argv[1:]
if "-X" not in args:
    os.execv(REAL, [REAL, *args])
env = {{**os.environ, "SLURM_CONF": {jobcomp_conf!r}}}
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
    real_id = hook.submit(job_script(workdir, "true\n"), job_name=real_name, output="/dev/null")
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
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(
        STANDIN_SACCT.format(
            python=sys.executable, real=shutil.which("sacct"), jobcomp_conf=str(tmp_path / "dbd_rows.conf")
        )
    )
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
        return job_operator(workdir, name, "sleep 600\n", slurm_conn_id=conn_id, **kwargs)

    sink = XComSink()
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
