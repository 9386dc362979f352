"""Talk to a Slurm cluster: submit, query, cancel, read job logs.

The connection says how commands reach the cluster. ``transport: local`` runs
the Slurm client commands on this host (the local profile, or an Airflow worker
on a ParallelCluster head node); ``transport: ssh`` runs them on the head node
through the ssh provider's ``SSHHook`` (``ssh_conn_id`` in the extra). Every
command is an argv list, quoted with ``shlex`` for ssh, so no value is ever
interpreted by a shell.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from airflow.sdk.bases.hook import BaseHook

TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
)


class SlurmCommandError(RuntimeError):
    """A Slurm client command failed; carries its stderr."""


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    name: str
    state: str
    exit_code: str = ""
    reason: str = ""
    nodes: str = ""
    elapsed_s: int = 0  # run time, known once the job ended (``ended_jobs``)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "COMPLETED"


class SlurmHook(BaseHook):
    """Run Slurm client commands over the transport named by the connection."""

    conn_name_attr = "slurm_conn_id"
    default_conn_name = "slurm_default"
    conn_type = "generic"
    hook_name = "Slurm"

    def __init__(self, slurm_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.slurm_conn_id = slurm_conn_id

    @cached_property
    def extra(self) -> dict[str, Any]:
        return self.get_connection(self.slurm_conn_id).extra_dejson

    @property
    def transport(self) -> str:
        return self.extra.get("transport", "local")

    @property
    def shared_dir(self) -> str:
        """The directory all nodes mount (FSx for Lustre on AWS, the stack's fsx/ locally)."""
        return self.extra.get("shared_dir") or os.environ.get("DTP_SHARED_DIR", "/fsx")

    @property
    def partition(self) -> str | None:
        return self.extra.get("partition")

    def run(self, argv: list[str], *, check: bool = True, input_text: str | None = None) -> str:
        if self.transport == "local":
            env = dict(os.environ)
            if self.extra.get("slurm_conf"):
                env["SLURM_CONF"] = self.extra["slurm_conf"]
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, input=input_text, timeout=120)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        elif self.transport == "ssh":
            rc, out, err = self._run_ssh(argv, input_text)
        else:
            raise ValueError(f"connection {self.slurm_conn_id!r}: transport {self.transport!r} is not local or ssh")
        if check and rc != 0:
            raise SlurmCommandError(f"{' '.join(argv[:2])} exited {rc}: {err.strip() or out.strip()}")
        return out

    def _run_ssh(self, argv: list[str], input_text: str | None) -> tuple[int, str, str]:
        from airflow.providers.ssh.hooks.ssh import SSHHook

        command = shlex.join(argv)
        with SSHHook(ssh_conn_id=self.extra["ssh_conn_id"]).get_conn() as client:
            stdin, stdout, stderr = client.exec_command(command, timeout=120)
            if input_text is not None:
                stdin.write(input_text)
                stdin.channel.shutdown_write()
            rc = stdout.channel.recv_exit_status()
            return rc, stdout.read().decode(), stderr.read().decode()

    # --- jobs -------------------------------------------------------------------
    def submit(
        self, script_path: str, *, job_name: str, output: str, comment: str = "", extra_args: list[str] | None = None
    ) -> str:
        argv = ["sbatch", "--parsable", f"--job-name={job_name}", f"--output={output}", *(extra_args or [])]
        if comment:
            argv.append(f"--comment={comment}")
        if self.partition:
            argv.append(f"--partition={self.partition}")
        job_id = self.run([*argv, script_path]).strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmCommandError(f"sbatch returned no job id: {job_id!r}")
        self.log.info("Submitted Slurm job %s (%s)", job_id, job_name)
        return job_id

    def get_job(self, job_id: str) -> SlurmJob:
        """The job's state: scontrol while slurmctld remembers it, the completion log after."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        if out.strip() and "Invalid job id" not in out:
            fields = _scontrol_fields(out)
            return SlurmJob(
                job_id=job_id,
                name=fields.get("JobName", ""),
                state=fields.get("JobState", "UNKNOWN"),
                exit_code=fields.get("ExitCode", ""),
                reason=fields.get("Reason", ""),
                nodes=fields.get("NodeList", ""),
            )
        acct = self.run(["sacct", "-c", "-n", "-P", "-j", job_id, "-o", "JobID,JobName,State,End"], check=False)
        for line in acct.splitlines():
            parts = line.split("|")
            if parts and parts[0] == job_id:
                return SlurmJob(job_id=job_id, name=parts[1], state=parts[2].split()[0])
        return SlurmJob(job_id=job_id, name="", state="UNKNOWN")

    def find_jobs(self, name: str, *, prefix: bool = False) -> list[SlurmJob]:
        """Active jobs (pending or running) named ``name`` (or starting with it, with ``prefix``)."""
        argv = ["squeue", "-h", "-o", "%i|%j|%T|%R"] + ([] if prefix else ["-n", name])
        jobs = []
        for line in self.run(argv, check=False).splitlines():
            job_id, job_name, state, reason = line.split("|", 3)
            if job_name == name or (prefix and job_name.startswith(name)):
                jobs.append(SlurmJob(job_id=job_id, name=job_name, state=state, reason=reason))
        return jobs

    def ended_jobs(self, name: str, *, prefix: bool = False) -> list[SlurmJob]:
        """Jobs named ``name`` (or starting with it, with ``prefix``) that ended, oldest first."""
        name_filter = [] if prefix else [f"--name={name}"]
        acct = self.run(["sacct", "-c", "-n", "-P", *name_filter, "-o", "JobID,JobName,State,ElapsedRaw"], check=False)
        return [
            SlurmJob(job_id=parts[0], name=parts[1], state=parts[2].split()[0], elapsed_s=int(parts[3] or 0))
            for parts in (line.split("|") for line in acct.splitlines())
            if len(parts) == 4 and (parts[1] == name or (prefix and parts[1].startswith(name)))
        ]

    def cancel(self, job_id: str) -> None:
        self.run(["scancel", job_id], check=False)

    def cancel_by_name(self, name: str, *, prefix: bool = False) -> list[str]:
        """Cancel every active job with this name (or name prefix); return their ids."""
        ids = [job.job_id for job in self.find_jobs(name, prefix=prefix)]
        if ids:
            self.run(["scancel", *ids], check=False)
            self.log.info("Cancelled Slurm jobs %s (%s)", ", ".join(ids), name)
        return ids

    def cancel_and_wait(self, name: str, *, prefix: bool = False, timeout: float = 120) -> list[str]:
        """Cancel every active job with this name (or prefix) and wait until Slurm shows none of them."""
        cancelled = self.cancel_by_name(name, prefix=prefix)
        deadline = time.monotonic() + timeout
        while self.find_jobs(name, prefix=prefix):
            if time.monotonic() > deadline:
                raise SlurmCommandError(f"Slurm jobs named {name} still active {timeout:.0f}s after scancel")
            time.sleep(2)
        return cancelled

    def node_count(self) -> int:
        argv = ["sinfo", "-h", "-o", "%D"]
        if self.partition:
            argv.append(f"--partition={self.partition}")
        return sum(int(n) for n in self.run(argv).split() if n.isdigit())

    # --- files on the cluster's shared filesystem --------------------------------
    def read_file(self, path: str, offset: int = 0) -> tuple[str, int]:
        """Bytes of ``path`` from ``offset`` on, and the new offset (``("", offset)`` if absent)."""
        if self.transport == "local":
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except FileNotFoundError:
                return "", offset
        else:
            data = self.run(["tail", "-c", f"+{offset + 1}", path], check=False).encode()
        return data.decode(errors="replace"), offset + len(data)

    def list_files(self, path: str) -> list[str]:
        """Names of the regular files directly in ``path`` (empty if it does not exist)."""
        if self.transport == "local":
            try:
                return sorted(e.name for e in os.scandir(path) if e.is_file())
            except FileNotFoundError:
                return []
        out = self.run(["find", path, "-maxdepth", "1", "-type", "f", "-printf", "%f\\n"], check=False)
        return sorted(line for line in out.splitlines() if line)

    def make_dirs(self, path: str) -> None:
        if self.transport == "local":
            os.makedirs(path, exist_ok=True)
        else:
            self.run(["mkdir", "-p", path])

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        if self.transport == "local":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as fh:
                fh.write(text)
            os.chmod(path, mode)
        else:
            self.run(["mkdir", "-p", os.path.dirname(path)])
            self.run(["sh", "-c", 'cat > "$0" && chmod "$1" "$0"', path, oct(mode)[2:]], input_text=text)


def _scontrol_fields(line: str) -> dict[str, str]:
    fields = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields
