"""A cluster's shared filesystem (FSx for Lustre on AWS, the stack's fsx/ locally), and its shell.

The connection says how they are reached. ``transport: local`` runs commands and opens files on this host:
the local profile, an Airflow worker on a ParallelCluster head node, or a worker pod that mounts the EKS
cluster's FSx claim (no connection at all). ``transport: ssh`` runs them on the head node through the ssh
provider's ``SSHHook`` (``ssh_conn_id`` in the extra): the SSH connection's login and key, and its host unless the
cluster names its own head node (a cluster created per run: its address is known only once it is up, and so are
its host keys, which the hook then checks: ``dtp.hooks.head_node_ssh``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING, Any, Self

from airflow.sdk import BaseHook

if TYPE_CHECKING:
    from dtp.hooks.head_node_ssh import HeadNodeSSHHook

# What a command run on this host gets of the worker's environment: where its programs are, who runs them, their
# locale, Slurm's configuration, and the proxy a node may need to reach a registry (pyxis's enroot imports the job's
# image in the environment sbatch exports to the job). Nothing else: the worker's environment holds Airflow's
# secrets (its fernet key, JWT secret, database URL, connections), which sbatch would export into every job.
COMMAND_ENVIRONMENT = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "SLURM_CONF",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)

# Seconds a command may take: one that takes longer raises TimeoutError, on this host as over ssh.
COMMAND_TIMEOUT_S = 120


class ClusterCommandError(RuntimeError):
    """A command on the cluster failed; carries its stderr."""


class SharedFilesystemHook(BaseHook):
    """Read and write the cluster's shared filesystem, and run commands where it is mounted.

    :param conn_id: a connection whose extra holds ``transport``, ``ssh_conn_id``, ``shared_dir``; None: the
        filesystem is mounted on this worker at ``DTP_SHARED_DIR`` (default ``/fsx``)
    :param head_node: over ssh, the host to reach instead of the SSH connection's own (the head node of a cluster
        created for the run: an address, or a name the worker's ``~/.ssh/config`` gives a ProxyCommand)
    :param head_node_host_keys: over ssh, the head node's public host keys (``<type> <base64>``), which its ssh
        then checks whatever the SSH connection says (none: the SSH connection says how its host key is checked)
    """

    conn_name_attr = "conn_id"
    conn_type = "generic"
    hook_name = "Shared filesystem"

    def __init__(
        self, conn_id: str | None = None, head_node: str | None = None, head_node_host_keys: Sequence[str] = ()
    ) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.head_node = head_node
        self.head_node_host_keys = list(head_node_host_keys)

    @classmethod
    def of_cluster(cls, cluster: dict[str, Any]) -> Self:
        """The filesystem of a cluster ``provision`` described: through its Slurm connection (and head node, where
        the platform created one, with its host keys where they were read), or mounted here where the cluster has
        none (EKS: the training queue's worker pods mount its FSx claim)."""
        return cls(cluster.get("slurm_conn_id"), cluster.get("head_node"), cluster.get("head_node_host_keys") or ())

    @cached_property
    def extra(self) -> dict[str, Any]:
        return self.get_connection(self.conn_id).extra_dejson if self.conn_id else {}

    @property
    def transport(self) -> str:
        return self.extra.get("transport", "local")

    @property
    def shared_dir(self) -> str:
        """The directory all nodes mount."""
        return self.extra.get("shared_dir") or os.environ.get("DTP_SHARED_DIR", "/fsx")

    def run(self, argv: list[str], *, check: bool = True, input_text: str | None = None) -> str:
        """Run ``argv`` where the filesystem is mounted; its stdout (``ClusterCommandError`` when it fails and
        ``check``; ``TimeoutError`` when it takes longer than ``COMMAND_TIMEOUT_S``). On this host it gets
        ``COMMAND_ENVIRONMENT`` of the worker's environment, no more."""
        return self._execute(argv, check=check, input_text=input_text).decode(errors="replace")

    def _execute(self, argv: list[str], *, check: bool = True, input_text: str | None = None) -> bytes:
        if self.transport == "local":
            env = {name: os.environ[name] for name in COMMAND_ENVIRONMENT if name in os.environ}
            if self.extra.get("slurm_conf"):
                env["SLURM_CONF"] = self.extra["slurm_conf"]
            stdin = None if input_text is None else input_text.encode()
            try:
                proc = subprocess.run(argv, capture_output=True, env=env, input=stdin, timeout=COMMAND_TIMEOUT_S)
            except subprocess.TimeoutExpired as timeout:
                # As over ssh, where the channel's socket.timeout (a TimeoutError) says the same: callers that wait
                # out a cluster out of reach (the Slurm trigger) try again.
                raise TimeoutError(f"{argv[0]} did not finish in {COMMAND_TIMEOUT_S} s") from timeout
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        elif self.transport == "ssh":
            rc, out, err = self._run_ssh(argv, input_text)
        else:
            raise ValueError(f"connection {self.conn_id!r}: transport {self.transport!r} is not local or ssh")
        if check and rc != 0:
            message = (err.strip() or out.strip()).decode(errors="replace")
            raise ClusterCommandError(f"{' '.join(argv[:2])} exited {rc}: {message}")
        return out

    @cached_property
    def ssh(self) -> HeadNodeSSHHook:
        """The ssh provider's hook to the head node, checking its host keys where they are known. It keeps its
        connection open, so the commands of one hook (a trigger's every poll) share it; it connects again when the
        connection dropped."""
        from dtp.hooks.head_node_ssh import HeadNodeSSHHook

        return HeadNodeSSHHook(
            ssh_conn_id=self.extra["ssh_conn_id"], remote_host=self.head_node or "", host_keys=self.head_node_host_keys
        )

    def close(self) -> None:
        """Close the ssh connection, if one is open (a trigger's, when it ends: paramiko's would live on)."""
        if "ssh" in self.__dict__ and self.ssh.client is not None:
            self.ssh.client.close()
            self.ssh.client = None

    def _run_ssh(self, argv: list[str], input_text: str | None) -> tuple[int, bytes, bytes]:
        stdin, stdout, stderr = self.ssh.get_conn().exec_command(shlex.join(argv), timeout=COMMAND_TIMEOUT_S)
        if input_text is not None:
            stdin.write(input_text)
            stdin.channel.shutdown_write()
        # Both streams are drained while the command runs: one left unread fills the channel's window, and the
        # command then blocks writing to it (paramiko's recv_exit_status warns of the same).
        with ThreadPoolExecutor(max_workers=1) as pool:
            err = pool.submit(stderr.read)
            out = stdout.read()
            return stdout.channel.recv_exit_status(), out, err.result()

    def read_file(self, path: str, offset: int = 0) -> tuple[str, int]:
        """The text of ``path`` from byte ``offset`` on, and the new offset (``("", offset)`` if absent). A
        character cut by the end of what was written so far is read whole on the next call."""
        if self.transport == "local":
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except FileNotFoundError:
                return "", offset
        else:
            data = self._execute(["tail", "-c", f"+{offset + 1}", path], check=False)
        whole = _whole_characters(data)
        return whole.decode(errors="replace"), offset + len(whole)

    def list_files(self, path: str) -> list[str]:
        """Names of the regular files directly in ``path`` (empty if it does not exist)."""
        if self.transport == "local":
            try:
                return sorted(e.name for e in os.scandir(path) if e.is_file())
            except FileNotFoundError:
                return []
        out = self.run(["find", path, "-maxdepth", "1", "-type", "f", "-printf", "%f\\n"], check=False)
        return sorted(line for line in out.splitlines() if line)

    def remove_tree(self, path: str) -> None:
        """Delete ``path`` and everything under it (nothing to do when it does not exist)."""
        if self.transport == "local":
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path)
        else:
            self.run(["rm", "-rf", "--", path])

    def make_dirs(self, path: str) -> None:
        if self.transport == "local":
            os.makedirs(path, exist_ok=True)
        else:
            self.run(["mkdir", "-p", path])

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write ``text`` to ``path`` with ``mode``, which the file has before any of the text is in it (a script
        that exports secrets is never readable by others, even for a moment)."""
        if self.transport == "local":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, mode)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:  # as over ssh: not the worker's locale's encoding
                fh.write(text)
        else:
            self.run(["mkdir", "-p", os.path.dirname(path)])
            script = 'umask 077 && : > "$0" && chmod "$1" "$0" && cat > "$0"'
            self.run(["sh", "-c", script, path, oct(mode)[2:]], input_text=text)


def _whole_characters(data: bytes) -> bytes:
    """``data`` less a UTF-8 character its end cuts in two (at most three bytes)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: nothing cut
            return data
        if byte >= 0xC0:  # the lead byte of a character of 2, 3 or 4 bytes
            length = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= length else data[:-back]
    return data
