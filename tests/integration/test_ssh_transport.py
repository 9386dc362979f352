"""The Slurm connection over ssh (how DTP reaches the head node of a cluster it does not run on), against the stack's
real sshd and Slurm cluster: ``slurm_ssh`` is ``slurm_default``'s cluster reached through the ``slurm_head`` SSH
connection."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest
from paramiko.ssh_exception import SSHException
from slurm_support import job_script

from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.hooks.slurm import SlurmHook
from dtp.params import ParamsError
from dtp.pipeline.validation import connect
from dtp.triggers.slurm import SlurmJobTrigger

pytestmark = pytest.mark.stack

SSH = "slurm_ssh"


def test_the_shared_filesystem_over_ssh_is_the_clusters(workdir: Path) -> None:
    hook = SharedFilesystemHook(SSH)
    assert hook.transport == "ssh"
    path = workdir / "sub" / "notes.txt"
    hook.write_file(str(path), "from the worker, ü\n", mode=0o600)
    assert path.read_text() == "from the worker, ü\n" and path.stat().st_mode & 0o777 == 0o600
    (workdir / "sub" / "from-node.txt").write_text("x")
    hook.make_dirs(str(workdir / "sub" / "folder"))
    assert hook.list_files(str(workdir / "sub")) == ["from-node.txt", "notes.txt"]
    assert hook.list_files(str(workdir / "missing")) == []
    hook.remove_tree(str(workdir / "sub"))
    assert not (workdir / "sub").exists()


def test_a_character_the_end_of_the_log_cuts_is_read_whole_next_time(workdir: Path) -> None:
    hook = SharedFilesystemHook(SSH)
    log = workdir / "grow.log"
    log.write_bytes("step 1 é".encode()[:-1])  # the job has written the first byte of é so far
    assert hook.read_file(str(log)) == ("step 1 ", 7)
    with log.open("ab") as fh:
        fh.write("é\n".encode()[1:])
    assert hook.read_file(str(log), 7) == ("é\n", 10)
    assert hook.read_file(str(workdir / "missing"), 3) == ("", 3)


def test_a_failing_command_over_ssh_says_why(stack) -> None:
    with pytest.raises(Exception, match=r"scontrol show exited 1: .*Invalid job id"):
        SlurmHook(SSH).run(["scontrol", "show", "job", "99999999"])


def test_a_job_submitted_and_followed_over_ssh(workdir: Path, first_event) -> None:
    hook = SlurmHook(SSH)
    name = f"it-ssh-{uuid.uuid4().hex[:6]}"
    script = job_script(workdir, "for i in 1 2; do echo line-$i; sleep 1; done\nsrun hostname >/dev/null\n")
    job_id = hook.submit(script, job_name=name, output=str(workdir / "out-%j.log"))
    assert [job.job_id for job in hook.find_jobs(name)] == [job_id]
    trigger = SlurmJobTrigger(
        job_id=job_id, log_path=str(workdir / f"out-{job_id}.log"), slurm_conn_id=SSH, poll_interval=1
    )
    event = first_event(trigger)
    assert (event["status"], event["state"]) == ("success", "COMPLETED")
    assert [line for line in event["tail"] if line.startswith("line-")] == ["line-1", "line-2"]
    assert [job.job_id for job in hook.ended_jobs(name)] == [job_id]


def test_the_runs_head_node_replaces_the_ssh_connections_host(stack, monkeypatch) -> None:
    # A cluster created per run (ParallelCluster, HyperPod) has a head node no connection can name beforehand: the
    # SSH connection gives the login and key, the run's cluster its address.
    head = json.loads(stack.connections()["AIRFLOW_CONN_SLURM_HEAD"])
    monkeypatch.setenv("AIRFLOW_CONN_PER_RUN_HEAD", json.dumps({**head, "host": "no-head-node.invalid"}))
    slurm = {"conn_type": "generic", "extra": {"transport": "ssh", "ssh_conn_id": "per_run_head"}}
    monkeypatch.setenv("AIRFLOW_CONN_PER_RUN_SLURM", json.dumps(slurm))
    with pytest.raises((OSError, SSHException)):
        SlurmHook("per_run_slurm").node_count()
    cluster = {"slurm_conn_id": "per_run_slurm", "head_node": "127.0.0.1"}
    assert SlurmHook.of_cluster(cluster).node_count() == stack.slurm_nodes


def test_validation_counts_only_the_nodes_that_take_jobs(stack) -> None:
    hook = SlurmHook(SSH)
    spec = {
        "params": {
            "slurm_conn_id": SSH,
            "python": sys.executable,
            "instance_type": "c5.xlarge",
            "num_nodes": 2,
            "exclude_nodes": "",
        },
        "instance": {"platforms": ["parallelcluster"]},
    }
    assert connect(spec)["nodes"] == 2
    hook.run(["scontrol", "update", "NodeName=n2", "State=DRAIN", "Reason=dtp-drain-test"])
    try:
        assert hook.node_states()["n2"] in ("drain", "drng")
        with pytest.raises(ParamsError, match="has 1 nodes that take jobs \\(of 2"):
            connect(spec)
        assert connect({**spec, "params": {**spec["params"], "num_nodes": 1}})["nodes"] == 2
    finally:
        hook.run(["scontrol", "update", "NodeName=n2", "State=RESUME"])
    # Resumed, the node may show as not answering ("idle*") until slurmctld's next ping of it.
    deadline = time.monotonic() + 120
    while hook.node_states()["n2"] != "idle" and time.monotonic() < deadline:
        time.sleep(2)
    assert hook.node_states()["n2"] == "idle"
