"""What a person reads when a Slurm job fails or waits: the task's error (the job's error lines before its last
lines, its exit code, the node it failed with), the trigger's log while the job waits, and what it says when the job
never starts. Also how the trigger reads a long log, which ended jobs the operator takes for its run's, and when the
trigger's ``on_kill`` cancels the job. The hooks are stand-ins for a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from dtp.hooks.slurm import SlurmHook, SlurmJob
from dtp.operators.slurm import SlurmJobFailed, SlurmSubmitJobOperator
from dtp.triggers.slurm import SlurmJobTrigger

# What torchrun (torch 2.x) prints after a rank's exception when the program's entry point is not ``@record``ed.
TORCHRUN_SUMMARY = """\
E0101 12:00:00.000000 123 torch/distributed/elastic/multiprocessing/api.py:869] failed (exitcode: 1) local_rank: 0
Traceback (most recent call last):
  File "/usr/bin/torchrun", line 8, in <module>
    sys.exit(main())
  File "torch/distributed/run.py", line 919, in main
    run(args)
  File "torch/distributed/launcher/api.py", line 263, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
train.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2025-01-01_12:00:00
  host      : n1
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 123)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
srun: error: n1: task 0: Exited with exit code 1""".splitlines()  # noqa: W291


class Cluster:
    """A ``SlurmHook`` stand-in: the job's log is ``log`` (its bytes as a poll finds them, ``reads`` by
    ``read_log``), ``states`` what successive polls of ``get_job`` find (the last one from then on), ``active`` what
    squeue lists, ``ended`` what sacct knows of ended jobs; it records the jobs it submits and cancels."""

    log = b""
    states: list[SlurmJob] = []
    active: list[SlurmJob] = []
    ended: list[SlurmJob] = []
    unavailable: list[str] = []
    made: list[Cluster] = []

    def __init__(self, slurm_conn_id: str = "", head_node: str | None = None) -> None:
        self.reads: list[tuple[int, int]] = []  # (offset, bytes read) of each read
        self.polls = 0
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.made.append(self)

    def read_log(self, path: str, offset: int, max_bytes: int) -> tuple[str, int]:
        data = self.log[offset : offset + max_bytes]
        self.reads.append((offset, len(data)))
        return data.decode(), offset + len(data)

    def get_job(self, job_id: str) -> SlurmJob:
        self.polls += 1
        return self.states[min(self.polls, len(self.states)) - 1]

    def unavailable_nodes(self) -> list[str]:
        return self.unavailable

    def find_jobs(self, name: str) -> list[SlurmJob]:
        return self.active

    def ended_jobs(self, name: str) -> list[SlurmJob]:
        return self.ended

    def submit(self, script_path: str, **options: Any) -> str:
        self.submitted.append(options["job_name"])
        return "99"

    def cancel_job(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def close(self) -> None:
        pass


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> type[Cluster]:
    monkeypatch.setattr("dtp.triggers.slurm.SlurmHook", Cluster)
    monkeypatch.setattr("dtp.operators.slurm.SlurmHook", Cluster)
    Cluster.log, Cluster.states, Cluster.active, Cluster.ended, Cluster.unavailable, Cluster.made = (
        b"",
        [],
        [],
        [],
        [],
        [],
    )
    return Cluster


def job(state: str, **fields: Any) -> SlurmJob:
    return SlurmJob(job_id="7", name="run-train", state=state, **fields)


def trigger(**kwargs: Any) -> SlurmJobTrigger:
    return SlurmJobTrigger(job_id="7", log_path="/fsx/o-7", poll_interval=0, **kwargs)


def operator(**kwargs: Any) -> SlurmSubmitJobOperator:
    return SlurmSubmitJobOperator(
        task_id="train", script_path="/s.sh", job_name="run-train", output_path="/o-%j", **kwargs
    )


def test_a_failed_jobs_exception_is_in_the_tasks_error_however_much_boilerplate_follows_it(
    cluster: type[Cluster], first_event: Any
) -> None:
    steps = [f'{{"step": {n}, "loss": 2.5}}' for n in range(40)]
    traceback = ["Traceback (most recent call last):", '  File "train.py", line 9, in main', "    raise RuntimeError"]
    lines = [*steps, *traceback, "RuntimeError: injected failure", *TORCHRUN_SUMMARY]
    assert len(TORCHRUN_SUMMARY) >= 25
    cluster.log = "".join(f"{line}\n" for line in lines).encode()
    cluster.states = [job("RUNNING", nodes="n1"), job("FAILED", exit_code="1:0", nodes="n1")]
    event = first_event(trigger())
    with pytest.raises(SlurmJobFailed) as failed:
        operator().execute_complete({}, event)
    message = str(failed.value)
    assert "injected failure" in message
    assert event["errors"] == [
        "RuntimeError: injected failure",
        "srun: error: n1: task 0: Exited with exit code 1",  # ChildFailedError's line says nothing: not one
    ]
    assert message.startswith(
        "Slurm job 7 ended FAILED (exit code 1:0). Error lines:\nRuntimeError: injected failure\nsrun: error: n1:"
    )
    assert message.endswith("Last lines:\n" + "\n".join(lines[-20:]))


@pytest.mark.parametrize(
    ("line", "is_error"),
    [
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", True),
        ("[rank3]: ValueError: bad shape", True),
        ("slurmstepd: error: Detected 1 oom_kill event in StepId=7.0", True),
        ("n1:1234:1234 [0] NCCL WARN NET/OFI Request completed with error", True),
        ("RuntimeError: CUDA error: an illegal memory access was encountered", True),
        ("Out Of Memory: Killed process 1234 (python)", True),
        ('{"step": 10, "loss": 2.1, "grad_norm_error": 0.0}', False),
        ("  error_file: <N/A>", False),
        ("Saved checkpoint to /fsx/ckpt/step_100", False),
    ],
)
def test_error_lines(cluster: type[Cluster], first_event: Any, line: str, is_error: bool) -> None:
    cluster.log = f"{line}\n{line}\n".encode()
    cluster.states = [job("FAILED", exit_code="1:0")]
    assert first_event(trigger())["errors"] == ([line.strip()] if is_error else [])  # each line once


@pytest.mark.parametrize("state", ["NODE_FAIL", "OUT_OF_MEMORY"])
def test_a_job_that_failed_with_its_node_names_it_and_how_to_train_without_it(
    cluster: type[Cluster], first_event: Any, state: str
) -> None:
    cluster.log = b"step 1\n"
    cluster.states = [job(state, exit_code="0:9", nodes="n2")]
    event = first_event(trigger())
    with pytest.raises(SlurmJobFailed, match=rf"^Slurm job 7 ended {state} \(exit code 0:9\) on n2; to train without "
                       r"them, trigger again with exclude_nodes=n2\. Last lines:\nstep 1$"):  # fmt: skip
        operator().execute_complete({}, event)
    # A cluster made for the run goes with it: no node to exclude next time.
    with pytest.raises(SlurmJobFailed, match=rf"^Slurm job 7 ended {state} \(exit code 0:9\) on n2\. Last lines:"):
        operator(head_node="10.0.0.7").execute_complete({}, event)


def logged(capsys: pytest.CaptureFixture[str], prefix: str) -> list[str]:
    """The trigger's log messages that start with ``prefix``, as structlog writes them to stdout."""
    out = capsys.readouterr().out.splitlines()
    return [prefix + line.split(prefix, 1)[1].split(" [dtp.")[0].rstrip() for line in out if prefix in line]


def test_a_waiting_job_logs_each_change_of_its_state_and_reason_once(
    cluster: type[Cluster], first_event: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.states = [
        job("PENDING", reason="Resources"),
        job("PENDING", reason="Resources"),
        job("PENDING", reason="Resources"),
        job("CONFIGURING", reason="None", nodes="n[1-2]"),
        job("RUNNING", reason="None", nodes="n[1-2]"),
        job("RUNNING", reason="None", nodes="n[1-2]"),
        job("COMPLETED", exit_code="0:0", nodes="n[1-2]"),
    ]
    assert first_event(trigger())["status"] == "success"
    assert logged(capsys, "Slurm job 7 is") == [
        "Slurm job 7 is PENDING, reason: Resources",
        "Slurm job 7 is CONFIGURING on n[1-2]",
        "Slurm job 7 is RUNNING on n[1-2]",
    ]


def test_a_job_that_never_starts_says_which_nodes_are_down_and_why(cluster: type[Cluster], first_event: Any) -> None:
    cluster.states = [job("PENDING", reason="ReqNodeNotAvail,_UnavailableNodes:queue1-dy-p5-1")]
    cluster.unavailable = [
        "queue1-dy-p5-1 (Code:InsufficientInstanceCapacity)Failure when resuming nodes",
        "queue1-st-p5-2 Not responding",
    ]
    event = first_event(trigger(pending_timeout=1e-9))
    assert event["unavailable_nodes"] == cluster.unavailable
    op = operator(pending_timeout=60)
    op._cancel = lambda job_id: "cancelled it"  # type: ignore[method-assign]
    with pytest.raises(SlurmJobFailed) as failed:
        op.execute_complete({}, event)
    assert str(failed.value) == (
        "Slurm job 7 (run-train) did not start within 60s: it is still PENDING, Slurm's reason: "
        "ReqNodeNotAvail,_UnavailableNodes:queue1-dy-p5-1; cancelled it. Nodes down or drained, and why:\n"
        "queue1-dy-p5-1 (Code:InsufficientInstanceCapacity)Failure when resuming nodes\n"
        "queue1-st-p5-2 Not responding"
    )


def test_a_log_longer_than_a_read_is_forwarded_over_several_polls_each_line_once_in_order(
    cluster: type[Cluster], first_event: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dtp.triggers.slurm.MAX_READ_BYTES", 100)
    lines = [f"line {n:04d}" for n in range(60)]  # 10 bytes each with its newline: 600 bytes
    cluster.log = "".join(f"{line}\n" for line in lines).encode() + b"unfinished"
    cluster.states = [*[job("RUNNING")] * 3, job("COMPLETED", exit_code="0:0")]
    event = first_event(trigger())
    (hook,) = cluster.made
    assert all(size <= 100 for _, size in hook.reads)
    # One read a poll while the job runs (three, then the one that finds it ended), then the rest.
    assert [offset for offset, _ in hook.reads] == [0, 100, 200, 300, 400, 500, 600, 610]
    assert event["tail"] == [*lines[-29:], "unfinished"]


def test_the_trigger_forwards_every_line_of_a_long_log_once_in_order(
    cluster: type[Cluster], first_event: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("dtp.triggers.slurm.MAX_READ_BYTES", 1000)
    lines = [f"line {n:05d}" for n in range(3000)]
    cluster.log = "".join(f"{line}\n" for line in lines).encode()
    cluster.states = [job("RUNNING"), job("COMPLETED", exit_code="0:0")]
    first_event(trigger())
    assert logged(capsys, "[slurm 7] ") == [f"[slurm 7] {line}" for line in lines]


def ended(job_id: str, state: str, submitted: str) -> SlurmJob:
    return SlurmJob(job_id, "run-train", state, elapsed_s=60, submitted_at=datetime.fromisoformat(submitted))


def test_a_completed_job_of_a_run_deleted_and_made_again_is_not_reused(cluster: type[Cluster]) -> None:
    # A scheduled run deleted and triggered again has the same run id, so its jobs have the same names.
    cluster.ended = [ended("5", "COMPLETED", "2025-03-01T10:00:00+00:00")]
    spec_made = "2025-03-02T08:00:00+00:00"
    with pytest.raises(TaskDeferred) as deferred:
        operator(submitted_after=spec_made, time_limit_minutes=2).execute({"ti": XCom()})
    assert deferred.value.trigger.job_id == "99"
    assert cluster.made[-1].submitted == ["run-train"]
    # Its own job, submitted after its spec was made, is.
    cluster.ended.append(ended("6", "COMPLETED", "2025-03-02T08:05:00+00:00"))
    reused = {"job_id": "6", "log_path": "/o-6", "state": "COMPLETED"}
    assert operator(submitted_after=spec_made).execute({"ti": XCom()}) == reused
    # A spec from before the operator knew when it was made: every job of the name is the run's, as before.
    assert operator().execute({"ti": XCom()}) == reused


def test_a_running_job_of_a_run_deleted_and_made_again_is_not_re_attached_to(cluster: type[Cluster]) -> None:
    spec_made = "2025-03-02T08:00:00+00:00"
    cluster.active = [SlurmJob("5", "run-train", "RUNNING", submitted_at=datetime(2025, 3, 1, 10, tzinfo=UTC))]
    with pytest.raises(TaskDeferred) as deferred:
        operator(submitted_after=spec_made).execute({"ti": XCom()})
    assert deferred.value.trigger.job_id == "99" and cluster.made[-1].submitted == ["run-train"]
    # Its own running job is.
    cluster.active = [SlurmJob("6", "run-train", "RUNNING", submitted_at=datetime(2025, 3, 2, 8, 5, tzinfo=UTC))]
    with pytest.raises(TaskDeferred) as deferred:
        operator(submitted_after=spec_made).execute({"ti": XCom()})
    assert deferred.value.trigger.job_id == "6" and cluster.made[-1].submitted == []


def test_squeue_tells_an_active_jobs_submit_time_in_utc() -> None:
    squeue = ("env", "TZ=UTC", "squeue", "-h", "-o", "%i|%j|%T|%V|%R", "-n", "run-train")
    hook = Commands({squeue: "7|run-train|PENDING|2025-03-01T10:00:00|(Resources|Priority)\n"})
    assert hook.find_jobs("run-train") == [
        SlurmJob(
            "7",
            "run-train",
            "PENDING",
            reason="(Resources|Priority)",
            submitted_at=datetime(2025, 3, 1, 10, tzinfo=UTC),
        )
    ]


def test_a_spec_records_when_it_was_made(monkeypatch: pytest.MonkeyPatch) -> None:
    from dtp.params import validate_params
    from dtp.pipeline.spec import run_spec

    before = datetime.now(UTC).replace(microsecond=0)
    spec = run_spec(validate_params({"platform": "local", "recipe": "tiny"}), "train_e2e", "scheduled__x")
    assert before <= datetime.fromisoformat(spec["created_at"]) <= datetime.now(UTC)


class XCom:
    def xcom_push(self, key: str, value: str) -> None:
        pass


class TaskInstance:
    dag_id, run_id, task_id, map_index = "train_e2e", "manual__1", "train", -1


@pytest.mark.parametrize(
    ("task_states", "cancelled"),
    [
        ({"manual__1": {"train": "deferred"}}, []),  # the trigger moved to another triggerer
        ({"manual__1": {"train": "failed"}}, ["7"]),  # a user marked the task failed
        ({"manual__1": {"train": None}}, ["7"]),  # ... or cleared it
        ({}, ["7"]),  # the run was deleted
    ],
)
def test_on_kill_cancels_the_job_unless_the_task_still_waits_on_its_trigger(
    cluster: type[Cluster], run_coroutine: Any, monkeypatch: pytest.MonkeyPatch, task_states: dict, cancelled: list
) -> None:
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    asked: list[dict[str, Any]] = []

    def get_task_states(**query: Any) -> dict:
        asked.append(query)
        return task_states

    monkeypatch.setattr(RuntimeTaskInstance, "get_task_states", staticmethod(get_task_states))
    waiting = trigger()
    waiting.task_instance = TaskInstance()  # type: ignore[assignment]
    run_coroutine(waiting.on_kill())
    assert asked == [{"dag_id": "train_e2e", "map_index": -1, "task_ids": ["train"], "run_ids": ["manual__1"]}]
    assert [job_id for hook in cluster.made for job_id in hook.cancelled] == cancelled


def test_on_kill_cancels_the_job_when_the_tasks_state_cannot_be_read(
    cluster: type[Cluster], run_coroutine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    def unreachable(**query: Any) -> dict:
        raise ConnectionError("the API server is restarting")

    monkeypatch.setattr(RuntimeTaskInstance, "get_task_states", staticmethod(unreachable))
    waiting = trigger()
    waiting.task_instance = TaskInstance()  # type: ignore[assignment]
    run_coroutine(waiting.on_kill())
    assert cluster.made[-1].cancelled == ["7"]


class Commands(SlurmHook):
    """A ``SlurmHook`` on this host whose commands answer from ``answers`` (by argv), recorded in ``ran``."""

    def __init__(self, answers: dict[tuple[str, ...], str]) -> None:
        super().__init__()
        self.__dict__["extra"] = {}
        self.answers = answers
        self.ran: list[list[str]] = []

    def run(self, argv: list[str], *, check: bool = True, input_text: str | None = None) -> str:
        self.ran.append(argv)
        return self.answers.get(tuple(argv), "")


def test_sacct_tells_an_ended_jobs_exit_code_nodes_and_submit_time_in_utc() -> None:
    sacct = ("env", "TZ=UTC", "sacct", "-c", "-n", "-P")
    since = "--starttime=2000-01-01T00:00:00"
    hook = Commands(
        {
            ("scontrol", "show", "job", "-o", "7"): "",
            (*sacct, "-j", "7", "-o", "JobID,JobName,State,ExitCode,NodeList"): "7|run-train|NODE_FAIL|0:9|n[1-2]\n",
            (*sacct, "--name=run-train", since, "-o", "JobID,JobName,State,ElapsedRaw,Submit"): (
                "5|run-train|COMPLETED|61|2025-03-01T10:00:00\n6|run-train|CANCELLED by 0|3|Unknown\n"
            ),
        }
    )  # fmt: skip
    assert hook.get_job("7") == SlurmJob("7", "run-train", "NODE_FAIL", exit_code="0:9", nodes="n[1-2]")
    assert hook.ended_jobs("run-train") == [
        SlurmJob("5", "run-train", "COMPLETED", elapsed_s=61, submitted_at=datetime(2025, 3, 1, 10, tzinfo=UTC)),
        SlurmJob("6", "run-train", "CANCELLED", elapsed_s=3),
    ]


def test_unavailable_nodes_are_sinfos_reasons_for_the_partition() -> None:
    hook = Commands({("sinfo", "-R", "-h", "-o", "%N %E", "--partition=gpu"): "n1 Not responding\n\nn2 maint\n"})
    hook.__dict__["extra"] = {"partition": "gpu"}
    assert hook.unavailable_nodes() == ["n1 Not responding", "n2 maint"]


def test_read_log_reads_at_most_max_bytes_and_no_cut_character(tmp_path: Path) -> None:
    path = tmp_path / "o-7"
    path.write_bytes("ab\né\n".encode())  # é is two bytes: 3 and 4
    hook = Commands({})
    assert hook.read_log(str(path), 0, 4) == ("ab\n", 3)
    assert hook.read_log(str(path), 3, 4) == ("é\n", 6)
    assert hook.read_log(str(path), 6, 4) == ("", 6)
    assert hook.read_log(str(tmp_path / "missing"), 5, 4) == ("", 5)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("program", "arguments", "exception"),
    [
        ("train.py", ["--config", "/nonexistent/config.json"], "FileNotFoundError: "),
        ("preflight.py", ["--results", "/nonexistent/preflight.json", "--no-busbw"], "FileNotFoundError: "),
    ],
)
def test_torchrun_ends_a_failed_programs_output_with_its_exception(
    tmp_path: Path, program: str, arguments: list[str], exception: str
) -> None:
    # What the job's log ends with: torchrun's summary of the failed rank, which names the exception only for an
    # entry point decorated with torch's ``record``.
    script = Path(__file__).resolve().parents[2] / "include" / "training" / program
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    env = {**os.environ, "TORCHELASTIC_ERROR_FILE": "", "OMP_NUM_THREADS": "1"}
    ran = subprocess.run([*launch, str(script), *arguments], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ran.returncode != 0
    last_lines = (ran.stdout + ran.stderr).splitlines()[-20:]
    assert any(exception in line for line in last_lines), "\n".join(last_lines)
