"""What a person reads when a Slurm job fails or waits: the task's error (the job's error lines before its last
lines, its exit code, the node it failed with), the trigger's log while the job waits, and what it says when the job
never starts. Also how the trigger reads a long log, and that torchrun's output ends with a failed program's
exception. The hook is a stand-in for a cluster (slurm_job_support.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from slurm_job_support import Cluster, job, operator, trigger, use_cluster

from dtp.operators.slurm import SlurmJobFailed

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


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> type[Cluster]:
    return use_cluster(monkeypatch)


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
