"""A per-run head node's SSH host keys, read the way AWS documents: from the instance's console output.

cloud-init prints an instance's host public keys to its console once it has booted, between
``-----BEGIN SSH HOST KEY KEYS-----`` and ``-----END SSH HOST KEY KEYS-----``, one ``<type> <base64> [comment]``
line each. EC2 keeps that output, so the keys come from AWS, not over the network path they are meant to check.
The head node's ``SSHHook`` then pins them (``dtp.hooks.head_node_ssh``).
"""

from __future__ import annotations

import logging
import time

from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
from airflow.sdk import BaseHook
from botocore.exceptions import ClientError

from dtp.hooks.head_node_ssh import public_key
from dtp.hooks.shared_fs import SharedFilesystemHook

log = logging.getLogger(__name__)

BEGIN_KEYS = "-----BEGIN SSH HOST KEY KEYS-----"
END_KEYS = "-----END SSH HOST KEY KEYS-----"


class HostKeysUnknown(RuntimeError):
    """The head node's host keys are not in its console output (not yet: it lags the instance), and its SSH
    connection checks host keys; a retry reads the console output again."""


def parse_host_keys(console_output: str) -> list[str]:
    """The host public keys of the last complete keys block in ``console_output``, each ``<type> <base64>`` (the
    comment left out), in the order printed; lines of the block that are no key are left out. The last block: an
    instance prints it again at each boot."""
    keys: list[str] | None = None  # those of the block being read
    found: list[str] = []
    for line in console_output.splitlines():
        if BEGIN_KEYS in line:
            keys = []
        elif END_KEYS in line and keys is not None:
            found, keys = keys, None
        elif keys is not None:
            try:
                key = public_key(line)
            except ValueError:
                continue  # another line the console interleaved, or a key type DTP does not pin
            keys.append(f"{key.get_name()} {key.get_base64()}")
    return found


def console_host_keys(instance_id: str, aws_conn_id: str | None) -> list[str]:
    """The host keys in the instance's console output (``parse_host_keys``): the output buffered since its last
    boot, which keeps them however long the instance runs, else (not posted yet) its latest, where its instance type
    keeps one (Nitro: the last 64 KiB, which a long-running head node's kernel messages push the keys out of)."""
    ec2 = EC2Hook(aws_conn_id=aws_conn_id, api_type="client_type").conn
    # botocore decodes the base64 Output; an instance that printed nothing yet has none.
    if keys := parse_host_keys(ec2.get_console_output(InstanceId=instance_id).get("Output") or ""):
        return keys
    try:
        latest = ec2.get_console_output(InstanceId=instance_id, Latest=True)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "UnsupportedOperation":
            raise
        return []
    return parse_host_keys(latest.get("Output") or "")


def checks_host_keys(slurm_conn_id: str) -> bool:
    """Whether the Slurm connection's ssh checks host keys: it does, unless its SSH connection's extra says
    ``no_host_key_check`` (as the ssh provider reads it), or it is no ssh connection at all (``transport: local``)."""
    slurm = SharedFilesystemHook(slurm_conn_id)
    if slurm.transport != "ssh":
        return False
    extra = BaseHook.get_connection(slurm.extra["ssh_conn_id"]).extra_dejson
    return str(extra.get("no_host_key_check", False)).lower() != "true"


def head_node_host_keys(
    instance_id: str | None,
    head_node: str,
    slurm_conn_id: str,
    aws_conn_id: str | None,
    *,
    reads: int = 1,
    interval_s: float = 15.0,
) -> list[str]:
    """The host keys of the head node at ``head_node`` (EC2 instance ``instance_id``), read from its console output
    up to ``reads`` times, ``interval_s`` apart. None found: ``HostKeysUnknown``, unless the Slurm connection's ssh
    checks no host keys (``checks_host_keys``), which is logged (nothing is pinned)."""
    for read in range(1, reads + 1):
        try:
            keys = console_host_keys(instance_id, aws_conn_id) if instance_id else []
        except ClientError as err:  # no ec2:GetConsoleOutput, say: only a connection that checks keys must fail
            why = f"reading the console output of {instance_id} failed ({err}; the worker needs ec2:GetConsoleOutput)"
            return _unpinned(head_node, why, slurm_conn_id, err)
        if keys:
            log.info(
                "Host keys of head node %s (%s), from its console output: %s", head_node, instance_id, ", ".join(keys)
            )
            return keys
        if read < reads:
            time.sleep(interval_s)
    where = f"the console output of {instance_id}" if instance_id else "describe-cluster, which names no instance"
    return _unpinned(head_node, f"no SSH host key of it is in {where} yet", slurm_conn_id)


def _unpinned(head_node: str, why: str, slurm_conn_id: str, cause: Exception | None = None) -> list[str]:
    """No host key for ``head_node`` (``why``): none pinned where the Slurm connection's ssh checks none, logged;
    else ``HostKeysUnknown``."""
    if not checks_host_keys(slurm_conn_id):
        log.warning(
            "Head node %s: %s, and connection %r checks no host key: its host key is not pinned, so its ssh does "
            "not protect against a man in the middle",
            head_node,
            why,
            slurm_conn_id,
        )
        return []
    raise HostKeysUnknown(
        f"head node {head_node} is up, but {why}, so its ssh cannot be checked; a retry of the task reads it again "
        f'(to accept any host key instead, set "no_host_key_check": true in the extra of the SSH connection of '
        f"{slurm_conn_id!r})"
    ) from cause
