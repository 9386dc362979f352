"""The Slurm connection over ssh (how DTP reaches the head node of a cluster it does not run on), against the stack's
real sshd and Slurm cluster: ``slurm_ssh`` is ``slurm_default``'s cluster reached through the ``slurm_head`` SSH
connection."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from paramiko.ssh_exception import SSHException
from slurm_support import job_script, resume_node

from dtp.form_params import ParamsError, parse_params
from dtp.hooks.head_node_ssh import HeadNodeHostKeyMismatch
from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.hooks.slurm import SlurmHook
from dtp.params import TrainParams
from dtp.pipeline.spec import run_spec
from dtp.pipeline.validation import connect
from dtp.platforms.parallelcluster import ParallelClusterPlatform
from dtp.triggers.slurm import SlurmJobTrigger

pytestmark = pytest.mark.stack

SSH = "slurm_ssh"


def test_the_shared_filesystem_over_ssh_is_the_clusters(workdir: Path) -> None:
    hook = SharedFilesystemHook(SSH)
    assert hook.transport == "ssh"
    path = workdir / "sub" / "notes.txt"
    hook.write_file(str(path), "from the worker, ü\n", mode=0o600)
    assert path.read_text() == "from the worker, ü\n" and path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    hook.write_file(str(path), "a secret\n", mode=0o700)  # over a file others could read
    assert path.read_text() == "a secret\n" and path.stat().st_mode & 0o777 == 0o700
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


def _connections_to(port: int) -> int:
    """How many established TCP connections go to ``port`` (the kernel's table: remote address, state 01)."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for row in rows if row[2].endswith(f":{port:04X}") and row[3] == "01")


def test_a_job_submitted_and_followed_over_ssh(stack, workdir: Path, first_event) -> None:
    hook = SlurmHook(SSH)
    name = f"it-ssh-{uuid.uuid4().hex[:6]}"
    script = job_script(workdir, "for i in 1 2; do echo line-$i; sleep 1; done\nsrun hostname >/dev/null\n")
    job_id = hook.submit(script, job_name=name, output=str(workdir / "out-%j.log"))
    assert [job.job_id for job in hook.find_jobs(name)] == [job_id]
    trigger = SlurmJobTrigger(
        job_id=job_id, log_path=str(workdir / f"out-{job_id}.log"), slurm_conn_id=SSH, poll_interval=1
    )
    before = _connections_to(stack.ports.sshd)
    event = first_event(trigger)
    deadline = time.monotonic() + 10  # the trigger's own connection is closed with it (paramiko's, on its thread)
    while _connections_to(stack.ports.sshd) > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _connections_to(stack.ports.sshd) == before
    assert (event["status"], event["state"]) == ("success", "COMPLETED")
    assert [line for line in event["tail"] if line.startswith("line-")] == ["line-1", "line-2"]
    assert [job.job_id for job in hook.ended_jobs(name)] == [job_id]


@pytest.fixture
def per_run_slurm(stack, monkeypatch) -> str:
    """A Slurm connection as the README sets one up for a cluster created per run (ParallelCluster, HyperPod): its
    SSH connection gives the login and key, a host that is no head node, and no host key (none of them can be known
    before the run's cluster exists; a later run's head node may have the same address and another key)."""
    head = json.loads(stack.connections()["AIRFLOW_CONN_SLURM_HEAD"])
    extra = {"key_file": head["extra"]["key_file"], "no_host_key_check": True, "allow_host_key_change": True}
    per_run = {**head, "host": "no-head-node.invalid", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_PER_RUN_HEAD", json.dumps(per_run))
    slurm = {"transport": "ssh", "ssh_conn_id": "per_run_head", "shared_dir": str(stack.shared_dir)}
    monkeypatch.setenv("AIRFLOW_CONN_PER_RUN_SLURM", json.dumps({"conn_type": "generic", "extra": slurm}))
    return "per_run_slurm"


def test_the_runs_head_node_replaces_the_ssh_connections_host(stack, per_run_slurm) -> None:
    with pytest.raises((OSError, SSHException)):
        SlurmHook(per_run_slurm).node_count()
    cluster = {"slurm_conn_id": per_run_slurm, "head_node": "127.0.0.1"}
    assert SlurmHook.of_cluster(cluster).node_count() == stack.slurm_nodes


def test_a_head_node_whose_host_key_is_pinned_is_reached_only_with_that_key(stack, per_run_slurm, tmp_path) -> None:
    # The keys deploy_cluster read from the head node's console output win over the SSH connection's
    # no_host_key_check: the stack's sshd with its own key runs the command, one that presents another is refused.
    host_key = stack.ssh_key("host").with_name("host.pub").read_text().strip()
    cluster = {"slurm_conn_id": per_run_slurm, "head_node": "127.0.0.1", "head_node_host_keys": [host_key]}
    assert SlurmHook.of_cluster(cluster).node_count() == stack.slurm_nodes
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    impostor = SlurmHook.of_cluster({**cluster, "head_node_host_keys": [other.with_name("other.pub").read_text()]})
    impostor.ssh.conn_retry_attempts = 1
    with pytest.raises(HeadNodeHostKeyMismatch, match=r"^head node 127\.0\.0\.1:\d+ presented the ssh-ed25519 host"):
        impostor.node_count()


def test_a_kept_parallelcluster_clusters_jobs_are_cancelled_on_its_head_node(
    workdir: Path, per_run_slurm, monkeypatch, tmp_path
) -> None:
    # keep_cluster's end of a ParallelCluster run: the head node is the one describe-cluster names (a stand-in
    # pcluster names this host's sshd: the ParallelCluster API cannot run here), reached with the SSH connection's key.
    described = {"clusterStatus": "CREATE_COMPLETE", "headNode": {"privateIpAddress": "127.0.0.1"}, "failures": []}
    pcluster = tmp_path / "pcluster"
    pcluster.write_text(f"#!/bin/sh\n[ \"$1\" = describe-cluster ] && echo '{json.dumps(described)}'\n")
    pcluster.chmod(0o755)
    extra = {
        "key_name": "k",
        "ssh_allowed_ips": "127.0.0.1/32",
        "pcluster": str(pcluster),
        "slurm_conn_id": per_run_slurm,
    }
    monkeypatch.setenv("AIRFLOW_CONN_DTP_PARALLELCLUSTER", json.dumps({"conn_type": "generic", "extra": extra}))
    conf = {"platform": "parallelcluster", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "num_nodes": 2}
    spec = run_spec(parse_params(TrainParams, conf), "it_parallelcluster", f"manual__{uuid.uuid4().hex}")
    job_id = SlurmHook().submit(
        job_script(workdir, "sleep 300\n"), job_name=spec["names"]["slurm_job"], output=str(workdir / "o-%j")
    )
    platform = ParallelClusterPlatform()
    assert platform.stop_jobs(spec) == {"cluster_name": platform.cluster_name(spec), "cancelled_jobs": [job_id]}
    assert SlurmHook().find_jobs(spec["names"]["slurm_job"]) == []


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
        # Named as Slurm names it: both local nodes have the host name localhost.
        assert hook.unavailable_nodes() == ["n2 dtp-drain-test"]
        with pytest.raises(ParamsError, match="has 1 nodes that take jobs \\(of 2"):
            connect(spec)
        assert connect({**spec, "params": {**spec["params"], "num_nodes": 1}})["nodes"] == 2
        with pytest.raises(ParamsError, match=r"has no node n3 \(its nodes: n1, n2\)"):
            connect({**spec, "params": {**spec["params"], "num_nodes": 1, "exclude_nodes": "n[2-3]"}})
    finally:
        resume_node(hook, "n2")


def test_a_hooks_commands_share_one_ssh_connection(stack) -> None:
    hook = SlurmHook(SSH)
    hook.run(["true"])
    transport = hook.ssh.get_conn().get_transport()
    hook.node_states()
    hook.read_file("/nonexistent")
    assert hook.ssh.get_conn().get_transport() is transport and transport.is_active()
    transport.close()  # the connection drops (sshd restarted, a network blip): the next command connects again
    assert hook.run(["echo", "again"]) == "again\n"
