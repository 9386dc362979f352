"""SlurmHook, SlurmJobTrigger and the staging step against the real local Slurm cluster and emulator."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from dtp.hooks.slurm import SlurmHook
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


async def _first_event(trigger: SlurmJobTrigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("trigger ended without an event")


def test_submit_wait_and_stream_log(workdir: Path) -> None:
    hook = SlurmHook()
    script = _script(workdir, "for i in 1 2 3; do echo line-$i; sleep 1; done\nsrun hostname >/dev/null\n")
    name = f"it-{uuid.uuid4().hex[:6]}"
    job_id = hook.submit(script, job_name=name, output=str(workdir / "out-%j.log"))
    assert [j.job_id for j in hook.find_jobs(name)] == [job_id]
    trigger = SlurmJobTrigger(job_id=job_id, log_path=str(workdir / f"out-{job_id}.log"), poll_interval=1)
    event = asyncio.run(_first_event(trigger))
    assert event["status"] == "success" and event["state"] == "COMPLETED"
    assert [line for line in event["tail"] if line.startswith("line-")] == ["line-1", "line-2", "line-3"]
    assert hook.get_job(job_id).succeeded


def test_failed_job_reports_state_and_tail(workdir: Path) -> None:
    hook = SlurmHook()
    job_id = hook.submit(
        _script(workdir, "echo about-to-fail\nexit 3\n"), job_name="it-fail", output=str(workdir / "o-%j")
    )
    event = asyncio.run(
        _first_event(SlurmJobTrigger(job_id=job_id, log_path=str(workdir / f"o-{job_id}"), poll_interval=1))
    )
    assert event["status"] == "failed" and event["state"] == "FAILED"
    assert event["exit_code"].startswith("3:")
    assert "about-to-fail" in event["tail"]


def test_silent_job_is_reported_hung(workdir: Path) -> None:
    hook = SlurmHook()
    name = f"it-hang-{uuid.uuid4().hex[:6]}"
    job_id = hook.submit(_script(workdir, "echo started\nsleep 300\n"), job_name=name, output=str(workdir / "h-%j"))
    trigger = SlurmJobTrigger(job_id=job_id, log_path=str(workdir / f"h-{job_id}"), poll_interval=1, hang_timeout=4)
    event = asyncio.run(_first_event(trigger))
    assert event["status"] == "hung" and "no new log line" in event["message"]
    assert hook.cancel_by_name(name) == [job_id]
    for _ in range(30):
        if not hook.find_jobs(name):
            break
        asyncio.run(asyncio.sleep(1))
    assert hook.find_jobs(name) == []


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
    hook.cancel(other)
