"""A ParallelCluster head node's SSH host keys: read from its console output when the cluster is ready (through moto,
the emulator), recorded beside its address, carried to every ssh connection to it, and pinned there; the console
output's keys block parsed as cloud-init prints it."""

from __future__ import annotations

import json
import logging
from base64 import b64encode
from pathlib import Path
from typing import Any

import paramiko
import pytest
from airflow.providers.ssh.hooks.ssh import SSHHook
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from parallelcluster_support import make_spec, use_settings

from dtp.hooks.head_node_ssh import HeadNodeHostKeyMismatch, HeadNodeSSHHook, public_key
from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.hooks.slurm import SlurmHook
from dtp.operators.cluster import DeployClusterOperator
from dtp.operators.slurm import SlurmSubmitJobOperator
from dtp.pipeline import jobs
from dtp.platforms import host_keys
from dtp.platforms import parallelcluster as pc
from dtp.platforms.host_keys import HostKeysUnknown, parse_host_keys
from dtp.triggers.slurm import SlurmJobTrigger

ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGKu3VHhRSxAO8iGo4QFUQ6lmB/Sn6fomXYZgsLsB+/M"
OTHER_ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJx4vwkrNMn9HgvtgPuyzqS6BRlnuEQkMmfZnhYJDNKQ"
ECDSA = (
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBNMcixJA6gHQYbaMgYJGdIaSgiMT+NffoEAnQQL3"
    "Lg7sbrQ6FQlMmx1rqxVlJSkFm/5h91JLgUF5A60z/ZNkRss="
)
# A head node's console output as EC2 keeps it (a serial console: CRLF line ends), cloud-init's fingerprints and keys
# blocks among the kernel's and systemd's lines, a line of cloud-init's own inside the keys block.
CONSOLE_OUTPUT = "\r\n".join(
    [
        "[    0.000000] Linux version 6.8.0-1021-aws (buildd@lcy02-amd64-034) #23~22.04.1-Ubuntu SMP",
        "[  OK  ] Started OpenBSD Secure Shell server.",
        "<14>Jan  6 10:12:31 cloud-init: #############################################################",
        "<14>Jan  6 10:12:31 cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----",
        "<14>Jan  6 10:12:31 cloud-init: 256 SHA256:B/Gj/ppztKC2YNY3/f6+Kn7Oxrkx4XDMuy+MmwWKE00 root@ip (ED25519)",
        "<14>Jan  6 10:12:31 cloud-init: -----END SSH HOST KEY FINGERPRINTS-----",
        "<14>Jan  6 10:12:31 cloud-init: #############################################################",
        "-----BEGIN SSH HOST KEY KEYS-----",
        f"{ECDSA} root@ip-10-0-0-7",
        "[   41.530312] cloud-init[1187]: Cloud-init v. 24.4 finished",
        f"{ED25519} root@ip-10-0-0-7",
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP root@ip-10-0-0-7",
        "-----END SSH HOST KEY KEYS-----",
        "Cloud-init v. 24.4 finished at Mon, 06 Jan 2026 10:12:31 +0000. Datasource DataSourceEc2Local.",
        "",
        "Ubuntu 22.04.5 LTS ip-10-0-0-7 ttyS0",
    ]
)
SLURM_CONN = "dtp_parallelcluster_slurm"


# --- the console output --------------------------------------------------------------------------------------------
def test_the_keys_block_of_a_head_nodes_console_output_gives_its_host_keys() -> None:
    assert parse_host_keys(CONSOLE_OUTPUT) == [ECDSA, ED25519]
    assert parse_host_keys(CONSOLE_OUTPUT.replace("\r\n", "\n")) == [ECDSA, ED25519]


def test_a_console_output_without_a_whole_keys_block_gives_no_keys() -> None:
    assert parse_host_keys("[    0.000000] Linux version 6.8.0\r\nlogin: ") == []
    # The fingerprints alone, and a keys block the console has not finished printing, are no keys.
    cut = CONSOLE_OUTPUT[: CONSOLE_OUTPUT.index("ssh-dss")]
    assert parse_host_keys(cut) == []


def test_the_last_keys_block_is_the_one_that_counts() -> None:
    rebooted = CONSOLE_OUTPUT + "\r\n-----BEGIN SSH HOST KEY KEYS-----\r\n" + OTHER_ED25519 + "\r\n"
    assert parse_host_keys(rebooted) == [ECDSA, ED25519]  # the new block is not finished: the old one holds
    assert parse_host_keys(rebooted + "-----END SSH HOST KEY KEYS-----\r\n") == [OTHER_ED25519]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "'ssh-dss' is not one of ssh-ed25519"),
        ("ssh-ed25519", "has no key data"),
        ("ssh-ed25519 not*base64", "is no ssh-ed25519 key"),
        (ED25519.replace("ssh-ed25519", "ssh-rsa"), "is no ssh-rsa key"),
        (ECDSA.replace("nistp256 ", "nistp384 "), "holds a ecdsa-sha2-nistp256 key"),
    ],
)
def test_what_is_no_host_key_is_refused(line: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        public_key(line)


def test_the_console_output_is_read_through_ec2(moto_aws) -> None:
    # moto keeps one console output for every instance, a kernel's boot with no keys block.
    ec2 = moto_aws("ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    assert host_keys.console_host_keys(instance, "aws_default") == []
    with pytest.raises(ec2.exceptions.ClientError, match=r"InvalidInstanceID\.NotFound"):
        host_keys.console_host_keys("i-0123456789abcdef0", "aws_default")


class _StubbedEc2:
    """What ``host_keys`` makes of ``EC2Hook``: a hook whose client a Stubber answers."""

    def __init__(self, client: Any) -> None:
        self.conn = client


def test_the_output_buffered_since_boot_is_read_first_then_the_latest(monkeypatch, offline_aws) -> None:
    import boto3

    client = boto3.client("ec2", region_name="us-east-1")
    monkeypatch.setattr(host_keys, "EC2Hook", lambda **kwargs: _StubbedEc2(client))
    buffered, latest = {"InstanceId": "i-1"}, {"InstanceId": "i-1", "Latest": True}
    printed = b64encode(CONSOLE_OUTPUT.encode()).decode()  # as EC2 sends it: botocore decodes it
    with Stubber(client) as stub:
        # The boot's output keeps the keys however long the head node runs: no need for the latest.
        stub.add_response("get_console_output", {"Output": printed, "InstanceId": "i-1"}, buffered)
        assert host_keys.console_host_keys("i-1", "aws_default") == [ECDSA, ED25519]
        stub.assert_no_pending_responses()
        # Not posted yet: the latest output (Nitro), or none where the instance type keeps no latest one.
        stub.add_response("get_console_output", {"Output": "", "InstanceId": "i-1"}, buffered)
        stub.add_response("get_console_output", {"Output": printed, "InstanceId": "i-1"}, latest)
        assert host_keys.console_host_keys("i-1", "aws_default") == [ECDSA, ED25519]
        stub.add_response("get_console_output", {"Output": "", "InstanceId": "i-1"}, buffered)
        stub.add_client_error("get_console_output", "UnsupportedOperation", expected_params=latest)
        assert host_keys.console_host_keys("i-1", "aws_default") == []
        stub.add_client_error("get_console_output", "UnauthorizedOperation", expected_params=buffered)
        with pytest.raises(client.exceptions.ClientError, match="UnauthorizedOperation"):
            host_keys.console_host_keys("i-1", "aws_default")


# --- when the cluster is ready -------------------------------------------------------------------------------------
def use_slurm_connection(monkeypatch: pytest.MonkeyPatch, **ssh_extra: Any) -> None:
    """The ParallelCluster settings' Slurm connection over ssh, its SSH connection's extra ``ssh_extra``."""
    slurm = {"transport": "ssh", "ssh_conn_id": "pc_head"}
    monkeypatch.setenv(f"AIRFLOW_CONN_{SLURM_CONN.upper()}", json.dumps({"conn_type": "generic", "extra": slurm}))
    ssh = {"conn_type": "ssh", "host": "head.invalid", "login": "ubuntu", "extra": ssh_extra}
    monkeypatch.setenv("AIRFLOW_CONN_PC_HEAD", json.dumps(ssh))


def ready_pcluster(tmp_path: Path, instance_id: str) -> str:
    """A pcluster executable that describes every cluster as CREATE_COMPLETE, its head node ``instance_id`` at
    10.0.0.7 (the ParallelCluster API cannot run here)."""
    head = {"instanceId": instance_id, "privateIpAddress": "10.0.0.7"}
    answer = json.dumps({"clusterStatus": "CREATE_COMPLETE", "headNode": head, "failures": []})
    executable = tmp_path / "pcluster"
    executable.write_text(f"#!/bin/sh\n[ \"$1\" = describe-cluster ] && echo '{answer}'\n")
    executable.chmod(0o755)
    return str(executable)


@pytest.fixture
def head_node(moto_aws, monkeypatch, tmp_path) -> str:
    """An instance in moto standing in for the head node, which the ParallelCluster settings' pcluster describes;
    deploy_cluster reads its console output at once, with no wait between reads."""
    ec2 = moto_aws("ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    instance: str = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    use_settings(monkeypatch, region="us-east-1", key_name="k", pcluster=ready_pcluster(tmp_path, instance))
    monkeypatch.setattr(pc, "HOST_KEY_READ_INTERVAL_S", 0.0)
    return instance


def deployed(spec: dict[str, Any]) -> dict[str, Any]:
    """What deploy_cluster returns once the create trigger found the run's cluster ready."""
    operator = DeployClusterOperator(task_id="deploy_cluster", spec=spec, network={})
    cluster = {"platform": "parallelcluster", "cluster_name": pc.ParallelClusterPlatform().cluster_name(spec)}
    ready = {"status": "success", "message": "up", "cluster": {"head_node": "10.0.0.7"}}
    return operator.execute_complete({}, ready, cluster)


def test_a_ready_head_node_whose_keys_are_not_in_its_console_output_fails_deploy_cluster(
    head_node, monkeypatch
) -> None:
    use_slurm_connection(monkeypatch)
    with pytest.raises(HostKeysUnknown) as unknown:
        deployed(make_spec("llama3_1_8b", "p5.48xlarge", 2))
    message = str(unknown.value)
    assert f"head node 10.0.0.7 is up, but no SSH host key of it is in the console output of {head_node}" in message
    assert f'set "no_host_key_check": true in the extra of the SSH connection of {SLURM_CONN!r}' in message


def test_an_ssh_connection_that_checks_no_host_keys_goes_on_unpinned_with_a_warning(
    head_node, monkeypatch, caplog
) -> None:
    use_slurm_connection(monkeypatch, no_host_key_check="true")
    with caplog.at_level(logging.WARNING, logger=host_keys.__name__):
        cluster = deployed(make_spec("llama3_1_8b", "p5.48xlarge", 2))
    assert (cluster["head_node"], cluster["head_node_host_keys"]) == ("10.0.0.7", [])
    assert "its host key is not pinned" in caplog.text and head_node in caplog.text


def _unauthorized(instance_id: str, aws_conn_id: str) -> list[str]:
    error = {"Error": {"Code": "UnauthorizedOperation", "Message": "not authorized"}}
    raise ClientError(error, "GetConsoleOutput")


def test_a_console_output_the_worker_may_not_read_fails_only_a_connection_that_checks_keys(
    head_node, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(host_keys, "console_host_keys", _unauthorized)
    use_slurm_connection(monkeypatch)
    with pytest.raises(HostKeysUnknown, match="the worker needs ec2:GetConsoleOutput") as unknown:
        deployed(make_spec("llama3_1_8b", "p5.48xlarge", 2))
    assert isinstance(unknown.value.__cause__, ClientError)
    use_slurm_connection(monkeypatch, no_host_key_check="true")
    with caplog.at_level(logging.WARNING, logger=host_keys.__name__):
        assert deployed(make_spec("llama3_1_8b", "p5.48xlarge", 2))["head_node_host_keys"] == []
    assert "UnauthorizedOperation" in caplog.text and "its host key is not pinned" in caplog.text


def test_keys_that_show_in_the_console_output_late_are_read_again_and_recorded(head_node, monkeypatch) -> None:
    use_slurm_connection(monkeypatch, no_host_key_check="true")  # found keys are pinned whatever it says
    outputs = iter([[], [], [ED25519]])
    reads: list[str] = []
    monkeypatch.setattr(host_keys, "console_host_keys", lambda i, c: reads.append(i) or next(outputs))
    cluster = deployed(make_spec("llama3_1_8b", "p5.48xlarge", 2))
    assert cluster["head_node_host_keys"] == [ED25519] and reads == [head_node] * 3


def test_keys_still_missing_after_the_last_read_fail(head_node, monkeypatch) -> None:
    use_slurm_connection(monkeypatch)
    reads: list[str] = []
    monkeypatch.setattr(host_keys, "console_host_keys", lambda i, c: reads.append(i) or [])
    with pytest.raises(HostKeysUnknown):
        deployed(make_spec("llama3_1_8b", "p5.48xlarge", 2))
    assert len(reads) == pc.HOST_KEY_READS


class RecordingSlurmHook:
    """A ``SlurmHook`` stand-in that records what it was made with and cancels nothing."""

    made: list[tuple[str, str | None, list[str]]] = []

    def __init__(self, slurm_conn_id: str, head_node: str | None = None, head_node_host_keys: Any = ()) -> None:
        self.made.append((slurm_conn_id, head_node, list(head_node_host_keys)))

    def cancel_and_wait(self, name: str, prefix: bool = False) -> list[str]:
        return []


def test_a_kept_clusters_jobs_are_cancelled_over_an_ssh_that_checks_the_head_nodes_keys(head_node, monkeypatch) -> None:
    use_slurm_connection(monkeypatch)
    monkeypatch.setattr(host_keys, "console_host_keys", lambda i, c: [ED25519] if i == head_node else [])
    monkeypatch.setattr("dtp.hooks.slurm.SlurmHook", RecordingSlurmHook)
    RecordingSlurmHook.made = []
    pc.ParallelClusterPlatform().stop_jobs(make_spec("llama3_1_8b", "p5.48xlarge", 2))
    assert RecordingSlurmHook.made == [(SLURM_CONN, "10.0.0.7", [ED25519])]


# --- where the keys go ---------------------------------------------------------------------------------------------
def test_the_keys_go_from_the_cluster_to_the_job_its_operator_and_its_trigger(monkeypatch, tmp_path) -> None:
    slurm = {"transport": "local", "shared_dir": str(tmp_path)}
    monkeypatch.setenv("AIRFLOW_CONN_LOCAL_SLURM", json.dumps({"conn_type": "generic", "extra": slurm}))
    hook = SlurmHook.of_cluster(
        {"slurm_conn_id": "local_slurm", "head_node": "10.0.0.7", "head_node_host_keys": [ECDSA]}
    )
    job = jobs._write_job(hook, make_spec("llama3_1_8b", "p5.48xlarge", 2), tmp_path, "train", "#!/bin/sh\n", "job")
    assert (job["head_node"], job["head_node_host_keys"]) == ("10.0.0.7", [ECDSA])
    operator = SlurmSubmitJobOperator(
        task_id="run_job",
        script_path=job["script_path"],
        job_name="job",
        output_path=job["output_path"],
        slurm_conn_id="local_slurm",
        head_node=job["head_node"],
        head_node_host_keys=job["head_node_host_keys"],
    )
    assert operator._hook().head_node_host_keys == [ECDSA]
    trigger = SlurmJobTrigger(job_id="7", log_path="/fsx/o-7", head_node="10.0.0.7", head_node_host_keys=[ECDSA])
    _, kwargs = trigger.serialize()
    assert SlurmJobTrigger(**kwargs).hook.head_node_host_keys == [ECDSA]
    # A trigger deferred before DTP pinned keys has none: its ssh checks the host key as the SSH connection says.
    older = {key: value for key, value in kwargs.items() if key != "head_node_host_keys"}
    assert SlurmJobTrigger(**older).hook.head_node_host_keys == []


# --- the pinned ssh ------------------------------------------------------------------------------------------------
def test_pinned_keys_override_an_ssh_connection_that_checks_none(monkeypatch) -> None:
    use_slurm_connection(monkeypatch, no_host_key_check="true", allow_host_key_change="true")
    cluster = {"slurm_conn_id": SLURM_CONN, "head_node": "10.0.0.7", "head_node_host_keys": [ECDSA, ED25519]}
    ssh = SharedFilesystemHook.of_cluster(cluster).ssh
    assert (ssh.remote_host, ssh.no_host_key_check, ssh.allow_host_key_change) == ("10.0.0.7", False, False)
    assert ssh.host_key == public_key(ED25519)  # the type paramiko asks for first
    unpinned = SharedFilesystemHook.of_cluster({**cluster, "head_node_host_keys": []}).ssh
    assert (unpinned.no_host_key_check, unpinned.allow_host_key_change, unpinned.host_key) == (True, True, None)


@pytest.mark.parametrize(
    ("expected", "where"),
    [
        (ED25519, "recorded from its console output when the cluster came up"),
        (OTHER_ED25519, "named for it in the worker's ~/.ssh/known_hosts"),
    ],
)
def test_a_head_node_presenting_another_key_is_refused_naming_it(monkeypatch, expected: str, where: str) -> None:
    use_slurm_connection(monkeypatch)
    presented = public_key(ECDSA)

    def bad_host_key(self: SSHHook) -> paramiko.SSHClient:
        raise paramiko.BadHostKeyException(self.remote_host, presented, public_key(expected))

    monkeypatch.setattr(SSHHook, "get_conn", bad_host_key)
    hook = HeadNodeSSHHook(ssh_conn_id="pc_head", remote_host="10.0.0.7", host_keys=[ED25519])
    with pytest.raises(HeadNodeHostKeyMismatch) as refused:
        hook.get_conn()
    message = str(refused.value)
    assert message.startswith(
        f"head node 10.0.0.7:22 presented the ecdsa-sha2-nistp256 host key {presented.fingerprint}, not ssh-ed25519 "
        f"{public_key(expected).fingerprint}, {where}"
    )
    assert not isinstance(refused.value, paramiko.SSHException)  # the Slurm trigger does not retry it
