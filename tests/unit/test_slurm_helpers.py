"""dtp.hooks.slurm pure helpers (no Slurm needed) and dtp.platforms.get_platform."""

from __future__ import annotations

import sys

import pytest

from dtp.hooks.slurm import TERMINAL_STATES, SlurmJob, _scontrol_fields
from dtp.operators.slurm import SlurmJobFailed, SlurmJobOverTime, SlurmSubmitJobOperator
from dtp.platforms import get_platform
from dtp.platforms.local import LocalSlurmPlatform
from dtp.triggers.slurm import SlurmJobTrigger

# squeue's states of a job that is still waiting or running.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}

SCONTROL = (
    "JobId=42 JobName=dtp-train-e2e-0123456789 UserId=dtp(1000) GroupId=dtp(1000) Priority=1 "
    "JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 ExitCode=0:0 "
    "NodeList=n[1-2] Comment=a=b Command=/fsx/runs/r/train.sbatch\n"
)


def test_scontrol_fields() -> None:
    fields = _scontrol_fields(SCONTROL)
    assert fields["JobId"] == "42"
    assert fields["JobName"] == "dtp-train-e2e-0123456789"
    assert fields["JobState"] == "RUNNING"
    assert fields["ExitCode"] == "0:0"
    assert fields["NodeList"] == "n[1-2]"
    assert fields["Reason"] == "None"
    assert fields["UserId"] == "dtp(1000)"
    assert fields["Comment"] == "a=b"  # only the first '=' separates key and value
    assert fields["Command"] == "/fsx/runs/r/train.sbatch"


def test_scontrol_fields_skip_tokens_without_equals() -> None:
    assert _scontrol_fields("no fields here") == {}
    assert _scontrol_fields("") == {}
    assert _scontrol_fields("A=1 stray B= C=3") == {"A": "1", "B": "", "C": "3"}


def test_scontrol_fields_multiline_output() -> None:
    # scontrol without -o prints one job over several indented lines.
    fields = _scontrol_fields("JobId=7 JobName=x\n   JobState=COMPLETED Reason=None\n   ExitCode=0:0\n")
    assert (fields["JobId"], fields["JobState"], fields["ExitCode"]) == ("7", "COMPLETED", "0:0")


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
def test_terminal_states_are_finished(state: str) -> None:
    job = SlurmJob(job_id="1", name="n", state=state)
    assert job.finished
    assert job.succeeded == (state == "COMPLETED")


@pytest.mark.parametrize("state", [*sorted(ACTIVE_STATES), "UNKNOWN", ""])
def test_active_and_unknown_states_are_not_finished(state: str) -> None:
    job = SlurmJob(job_id="1", name="n", state=state)
    assert not job.finished
    assert not job.succeeded


def test_states_are_disjoint_and_job_is_frozen() -> None:
    assert not TERMINAL_STATES & ACTIVE_STATES
    job = SlurmJob(job_id="1", name="n", state="RUNNING")
    assert (job.exit_code, job.reason, job.nodes) == ("", "", "")
    with pytest.raises(AttributeError):
        job.state = "COMPLETED"  # type: ignore[misc]


def test_get_platform_local() -> None:
    platform = get_platform("local")
    assert isinstance(platform, LocalSlurmPlatform)
    assert platform.name == "local"
    assert platform.slurm_conn_id == "slurm_default"
    assert platform.default_image() == {"source": "project virtualenv", "python": sys.executable}


@pytest.mark.parametrize("name", ["slurm", "", "LOCAL"])
def test_get_platform_unknown_names_the_available_ones(name: str) -> None:
    available = "batch, eks, hyperpod, local, parallelcluster"
    with pytest.raises(ValueError, match=rf"^platform {name!r} is not available; available: {available}$"):
        get_platform(name)


def test_trigger_round_trips_its_pending_timeout_and_reads_older_kwargs() -> None:
    trigger = SlurmJobTrigger(job_id="7", log_path="/fsx/o-7", pending_timeout=90)
    classpath, kwargs = trigger.serialize()
    assert classpath == "dtp.triggers.slurm.SlurmJobTrigger" and kwargs["pending_timeout"] == 90
    assert SlurmJobTrigger(**kwargs).serialize() == (classpath, kwargs)
    # A trigger deferred before pending_timeout existed comes back from the database with the default hour.
    older = {key: value for key, value in kwargs.items() if key not in ("pending_timeout", "head_node")}
    assert SlurmJobTrigger(**older).pending_timeout == 3600
    # One deferred by a version that serialized log_offset (always 0) comes back too, on the connection's own host.
    restored = SlurmJobTrigger(**older, log_offset=0)
    assert restored.head_node is None and restored.serialize() == (classpath, {**kwargs, "pending_timeout": 3600})
    head = SlurmJobTrigger(job_id="7", log_path="/fsx/o-7", head_node="10.0.0.7")
    assert SlurmJobTrigger(**head.serialize()[1]).head_node == "10.0.0.7"


def test_a_job_stopped_at_a_limit_the_operator_did_not_set_says_so_rather_than_none_min() -> None:
    # A job the operator submits without --time runs up to its script's --time (the preflight's), else its
    # partition's MaxTime.
    operator = SlurmSubmitJobOperator(task_id="t", script_path="/s.sh", job_name="j", output_path="/o-%j")
    event = {"status": "failed", "state": "TIMEOUT", "job_id": "7", "tail": ["step 9"]}
    with pytest.raises(SlurmJobOverTime, match=r"^Slurm job 7 ran past its script's or its partition's time limit"):
        operator.execute_complete({}, event)


def test_a_cluster_out_of_reach_fails_the_task_with_the_triggers_reason_and_cancels_nothing() -> None:
    operator = SlurmSubmitJobOperator(task_id="t", script_path="/s.sh", job_name="j", output_path="/o-%j")
    message = "could not reach the cluster in 11 polls in a row (EOFError()); the job is left as it is"
    event = {"status": "error", "state": "RUNNING", "job_id": "7", "tail": ["step 9"], "message": message}
    # No hook is reachable here: a cancel would raise something else.
    with pytest.raises(SlurmJobFailed, match=r"^Slurm job 7 \(j\), last seen RUNNING: could not reach .*\nstep 9$"):
        operator.execute_complete({}, event)


def test_a_retried_job_gets_what_is_left_of_the_time_limit_in_whole_minutes() -> None:
    def operator(minutes: int) -> SlurmSubmitJobOperator:
        return SlurmSubmitJobOperator(
            task_id="t", script_path="/s.sh", job_name="j", output_path="/o-%j", time_limit_minutes=minutes
        )

    ended = [SlurmJob("7", "j", "FAILED", elapsed_s=61), SlurmJob("8", "j", "NODE_FAIL", elapsed_s=30)]
    assert operator(5)._time_limit_args([]) == ["--time=5"]
    assert operator(5)._time_limit_args(ended) == ["--time=3"]  # 91 s count as 2 min
    assert operator(0)._time_limit_args(ended) == []
    used_up = r"^earlier j jobs ran 2 min of the 2 min time limit\b.*; not submitting another$"
    with pytest.raises(SlurmJobOverTime, match=used_up):
        operator(2)._time_limit_args(ended)
