"""The ssh provider's hook to a cluster's head node, checking the host keys DTP recorded for it.

A head node made per run (ParallelCluster's) has an address and host keys known only once it is up, so the SSH
connection can name neither. DTP reads the keys from the instance's console output when the cluster is ready
(``dtp.platforms.host_keys``) and pins them here: a head node that presents another key is refused, never trusted.
"""

from __future__ import annotations

from base64 import b64decode
from collections.abc import Sequence
from typing import Any

import paramiko
from airflow.providers.ssh.hooks.ssh import SSHHook

# The host key types DTP pins, in the order paramiko prefers them when it negotiates a host key algorithm.
HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)


class HeadNodeHostKeyMismatch(RuntimeError):
    """The head node presented a host key other than the one recorded for it: someone may stand between the worker
    and the head node. Not an ``SSHException``: nothing that retries a lost connection retries this."""


def public_key(line: str) -> paramiko.PKey:
    """The public key of an OpenSSH ``<type> <base64> [comment]`` line (``ValueError`` when it is none of
    ``HOST_KEY_TYPES``, or its data is not a key of its type)."""
    key_type, *fields = line.split() or [""]
    if key_type not in HOST_KEY_TYPES:
        raise ValueError(f"host key type {key_type!r} is not one of {', '.join(HOST_KEY_TYPES)}")
    if not fields:
        raise ValueError(f"{key_type} host key has no key data")
    try:
        key = paramiko.PKey.from_type_string(key_type, b64decode(fields[0], validate=True))
    except (ValueError, paramiko.SSHException) as err:
        raise ValueError(f"{key_type} host key {fields[0][:24]}... is no {key_type} key: {err}") from None
    if key.get_name() != key_type:  # an ecdsa key of another curve than its type says
        raise ValueError(f"{key_type} host key holds a {key.get_name()} key")
    return key


class HeadNodeSSHHook(SSHHook):
    """``SSHHook`` to a head node whose host keys are known (``host_keys``); without them, the provider's hook as the
    SSH connection says.

    With keys, the connection's ``no_host_key_check`` and ``allow_host_key_change`` give way: the hook pins one of
    them, the type paramiko prefers, and paramiko then asks the head node for a key of that type first, so the head
    node must prove it holds that key's private half (one key is as strong a check as all of them; the provider's
    hook takes one). A head node that presents another key fails with ``HeadNodeHostKeyMismatch``, naming it.

    :param host_keys: the head node's public host keys, each ``<type> <base64>``
    """

    def __init__(self, *, host_keys: Sequence[str] = (), **kwargs: Any) -> None:
        if host_keys:
            kwargs["no_host_key_check"] = False
        super().__init__(**kwargs)
        self.pinned_host_keys = list(host_keys)
        if host_keys:
            keys = [public_key(line) for line in host_keys]
            self.host_key = min(keys, key=lambda key: HOST_KEY_TYPES.index(key.get_name()))
            self.allow_host_key_change = False

    def get_conn(self) -> paramiko.SSHClient:
        try:
            return super().get_conn()
        except paramiko.BadHostKeyException as err:
            raise HeadNodeHostKeyMismatch(self._mismatch(err)) from None

    def _mismatch(self, err: paramiko.BadHostKeyException) -> str:
        """Which key the head node presented, which was expected, and where the expectation came from."""
        presented, expected = err.key, err.expected_key
        recorded = expected == self.host_key
        source = (
            "recorded from its console output when the cluster came up"
            if recorded
            else "named for it in the worker's ~/.ssh/known_hosts, which paramiko reads first: remove that entry "
            "if it is an earlier head node's at the same address"
        )
        return (
            f"head node {self.remote_host}:{self.port} presented the {presented.get_name()} host key "
            f"{presented.fingerprint}, not {expected.get_name()} {expected.fingerprint}, {source}; refusing to "
            "connect (someone may stand between this worker and the head node)"
        )
