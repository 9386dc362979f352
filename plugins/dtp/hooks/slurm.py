"""Talk to a Slurm cluster: submit, query, cancel.

Commands reach the cluster over the connection's transport (``dtp.hooks.shared_fs``): on this host, or on the
head node through the ssh provider's ``SSHHook``. Every command is an argv list, quoted with ``shlex`` for ssh,
so no value is ever interpreted by a shell.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from dtp.hooks.shared_fs import ClusterCommandError, SharedFilesystemHook, _whole_characters
from dtp.hostlist import compress_hostlist, expand_hostlist

TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
)

# Where ``ended_jobs`` starts looking: long enough ago to find every earlier job of a run (job names are unique per
# run). Not 1970-01-01, which sacct reads as 0, "no start given", and so as midnight today.
ACCOUNTING_SINCE = "2000-01-01T00:00:00"
# What sacct says of a source this cluster does not keep (JobCompType=jobcomp/none, or no slurmdbd): not a failure.
SOURCE_DISABLED = ("Slurm job completion is disabled", "Slurm accounting storage is disabled")
# sacct's times in UTC: it writes them in the cluster's local time, with no zone said.
IN_UTC = "TZ=UTC"
SACCT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


class SlurmCommandError(ClusterCommandError):
    """A Slurm client command gave no usable answer, or its jobs did not go."""


class SlurmControllerUnreachable(SlurmCommandError):
    """slurmctld gave no answer (down, restarting, out of reach): what it knows of a job is unknown, not gone."""


@dataclass(frozen=True)
class SlurmJob:
    """A job as squeue, scontrol or sacct report it."""

    job_id: str
    name: str
    state: str
    exit_code: str = ""
    reason: str = ""
    nodes: str = ""
    elapsed_s: int = 0  # run time, known once the job ended (``ended_jobs``)
    submitted_at: datetime | None = None  # when it was submitted, known once the job ended (``ended_jobs``)
    required_nodes: str = ""  # the hostlist it must run on (sbatch --nodelist), while slurmctld knows it
    restarts: int = 0  # how many times it was requeued, while slurmctld knows it

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "COMPLETED"


class SlurmHook(SharedFilesystemHook):
    """Run Slurm client commands over the transport named by the connection."""

    conn_name_attr = "slurm_conn_id"
    default_conn_name = "slurm_default"
    conn_type = "generic"
    hook_name = "Slurm"

    def __init__(
        self,
        slurm_conn_id: str = default_conn_name,
        head_node: str | None = None,
        head_node_host_keys: Sequence[str] = (),
    ) -> None:
        super().__init__(slurm_conn_id, head_node, head_node_host_keys)
        self.slurm_conn_id = slurm_conn_id

    @property
    def partition(self) -> str | None:
        return self.extra.get("partition")

    # --- jobs -------------------------------------------------------------------
    def submit(
        self, script_path: str, *, job_name: str, output: str, comment: str = "", extra_args: list[str] | None = None
    ) -> str:
        """``sbatch`` the script ``script_path`` as ``job_name``, its output to ``output`` (``%j``: the job id);
        the job's id."""
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
        """The job's state: scontrol while slurmctld remembers it, sacct after (``UNKNOWN`` when neither knows it).

        Raises ``SlurmControllerUnreachable`` when scontrol fails for any other reason than an id slurmctld does not
        know: a controller that cannot be asked (restarting, say) must not make a running job look forgotten."""
        try:
            out = self.run(["scontrol", "show", "job", "-o", job_id])
        except ClusterCommandError as err:
            if "Invalid job id" not in str(err):
                raise SlurmControllerUnreachable(f"slurmctld did not answer for job {job_id}: {err}") from err
            out = ""  # slurmctld has forgotten it (MinJobAge), or never had it: the records of ended jobs may know
        if out.strip():
            fields = _scontrol_fields(out)
            return SlurmJob(
                job_id=job_id,
                name=fields.get("JobName", ""),
                state=fields.get("JobState", "UNKNOWN"),
                exit_code=fields.get("ExitCode", ""),
                reason=fields.get("Reason", ""),
                nodes=fields.get("NodeList", ""),
                required_nodes=fields.get("ReqNodeList", "").replace("(null)", ""),
                restarts=int(fields.get("Restarts") or 0),
            )
        for line in self._accounting("-j", job_id, "-o", "JobID,JobName,State,ExitCode,NodeList").splitlines():
            parts = line.split("|")
            if len(parts) == 5 and parts[0] == job_id:
                return SlurmJob(
                    job_id=job_id, name=parts[1], state=parts[2].split()[0], exit_code=parts[3], nodes=parts[4]
                )
        return SlurmJob(job_id=job_id, name="", state="UNKNOWN")

    def find_jobs(self, name: str, *, prefix: bool = False) -> list[SlurmJob]:
        """Active jobs (pending or running) named ``name`` (or starting with it, with ``prefix``), with when they
        were submitted."""
        argv = ["env", IN_UTC, "squeue", "-h", "-o", "%i|%j|%T|%V|%R"] + ([] if prefix else ["-n", name])
        jobs = []
        for line in self.run(argv).splitlines():  # a failing squeue must not read as "no job" (a second submit)
            job_id, job_name, state, submitted, reason = line.split("|", 4)
            if job_name == name or (prefix and job_name.startswith(name)):
                jobs.append(
                    SlurmJob(
                        job_id=job_id, name=job_name, state=state, reason=reason, submitted_at=_utc_time(submitted)
                    )
                )
        return jobs

    def ended_jobs(self, name: str, *, prefix: bool = False) -> list[SlurmJob]:
        """Jobs named ``name`` (or starting with it, with ``prefix``) that ended, oldest first, however long ago.

        Raises ``SlurmCommandError`` when sacct cannot answer (slurmdbd down): that is not "no job ended"."""
        name_filter = [] if prefix else [f"--name={name}"]
        # sacct's default window starts at midnight today: a job that ended yesterday would be missed.
        acct = self._accounting(
            *name_filter, f"--starttime={ACCOUNTING_SINCE}", "-o", "JobID,JobName,State,ElapsedRaw,Submit"
        )
        return [
            SlurmJob(
                job_id=parts[0],
                name=parts[1],
                state=parts[2].split()[0],
                elapsed_s=int(parts[3] or 0),
                submitted_at=_utc_time(parts[4]),
            )
            for parts in (line.split("|") for line in acct.splitlines())
            if len(parts) == 5 and (parts[1] == name or (prefix and parts[1].startswith(name)))
        ]

    def _accounting(self, *args: str) -> str:
        """sacct's rows (``-n -P``) from the job completion log, where DTP's clusters keep the jobs that ended
        (JobCompType=jobcomp/filetxt), else from the accounting database (slurmdbd) of a cluster that has one.

        "" when a source answered with no rows, or when the cluster keeps neither (sacct calls both disabled);
        ``SlurmCommandError`` when no source answered and one failed (an unreachable slurmdbd, say)."""
        failures = []
        answered = False
        for source in ("-c", "-X"):
            try:
                out = self.run(["env", IN_UTC, "sacct", source, "-n", "-P", *args]).strip()
            except ClusterCommandError as err:
                if not any(message in str(err) for message in SOURCE_DISABLED):
                    failures.append(f"sacct {source}: {err}")
                continue
            if out:
                return out
            answered = True
        if failures and not answered:
            raise SlurmCommandError("sacct could not read Slurm's records of ended jobs: " + "; ".join(failures))
        return ""

    def read_log(self, path: str, offset: int, max_bytes: int) -> tuple[str, int]:
        """At most ``max_bytes`` of the text of a job's log ``path`` from byte ``offset`` on, and the new offset
        (``("", offset)`` if absent), as ``read_file`` reads it: a character cut by the end is read whole next time.
        A trigger following a long log reads it a piece at a time."""
        if self.transport == "local":
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read(max_bytes)
            except FileNotFoundError:
                return "", offset
        else:
            dd = ["dd", f"if={path}", "iflag=skip_bytes,count_bytes", f"skip={offset}", f"count={max_bytes}"]
            data = self._execute([*dd, "bs=64K", "status=none"], check=False)
        whole = _whole_characters(data)
        return whole.decode(errors="replace"), offset + len(whole)

    def cancel_job(self, job_id: str) -> None:
        """Ask slurmctld to cancel the job (a job that already ended stays as it ended); wait for nothing."""
        self.run(["scancel", job_id])  # one slurmctld refuses or cannot hear fails here
        self.log.info("Cancelled Slurm job %s", job_id)

    def cancel_job_and_wait(self, job_id: str, *, timeout: float = 120) -> None:
        """Cancel the job and wait until Slurm no longer lists it as active (COMPLETING included)."""
        self.cancel_job(job_id)
        self._wait_gone(lambda: self._job_active(job_id), f"Slurm job {job_id}", timeout, "after scancel")

    def wait_ended(self, job_id: str, *, timeout: float = 120) -> None:
        """Wait until Slurm no longer lists the job as active: a COMPLETING job's processes are gone (those that
        ignore SIGTERM are killed ``KillWait`` later) and its epilog has run, so sacct tells how it ended."""
        self._wait_gone(
            lambda: self._job_active(job_id), f"Slurm job {job_id}", timeout, "after it was found COMPLETING"
        )

    def cancel_by_name(self, name: str, *, prefix: bool = False) -> list[str]:
        """Cancel every active job with this name (or name prefix); return their ids."""
        ids = [job.job_id for job in self.find_jobs(name, prefix=prefix)]
        if ids:
            self.run(["scancel", *ids])
            self.log.info("Cancelled Slurm jobs %s (%s)", ", ".join(ids), name)
        return ids

    def cancel_and_wait(self, name: str, *, prefix: bool = False, timeout: float = 120) -> list[str]:
        """Cancel every active job with this name (or prefix) and wait until Slurm shows none of them."""
        cancelled = self.cancel_by_name(name, prefix=prefix)
        self._wait_gone(
            lambda: bool(self.find_jobs(name, prefix=prefix)), f"Slurm jobs named {name}", timeout, "after scancel"
        )
        return cancelled

    def _job_active(self, job_id: str) -> bool:
        """Whether squeue lists the job (pending, running, completing...); a job it no longer knows is not."""
        try:
            return bool(self.run(["squeue", "-h", "-j", job_id, "-o", "%T"]).strip())
        except ClusterCommandError as err:
            if "Invalid job id" in str(err):  # slurmctld has forgotten it (MinJobAge)
                return False
            raise

    @staticmethod
    def _wait_gone(active: Callable[[], bool], what: str, timeout: float, since: str) -> None:
        deadline = time.monotonic() + timeout
        while active():
            if time.monotonic() > deadline:
                raise SlurmCommandError(f"{what} still active {timeout:.0f}s {since}")
            time.sleep(2)

    def node_states(self) -> dict[str, str]:
        """Each node of the partition (of every partition when none is set) and its state in sinfo's short form
        (``idle``, ``mix``, ``drain``, ``down*``, ``idle~``...). A node in two partitions is one node."""
        argv = ["sinfo", "-h", "-N", "-o", "%N %t"]
        if self.partition:
            argv.append(f"--partition={self.partition}")
        return dict(line.split(maxsplit=1) for line in self.run(argv).splitlines() if len(line.split()) == 2)

    def unpin_unusable_nodes(self, job: SlurmJob) -> list[str]:
        """Drop from the pending ``job``'s required nodes (its ReqNodeList, sbatch ``--nodelist``) those that take
        no jobs (down, drained, failing, gone from the partition), so that it does not wait for them; Slurm gives it
        other nodes of the partition in their place. The nodes dropped, none when all of them take jobs."""
        required = expand_hostlist(job.required_nodes)
        dropped = unusable(required, self.node_states())
        if dropped:
            kept = compress_hostlist([node for node in required if node not in dropped])
            # An empty ReqNodeList= clears it (scontrol(1)); slurmctld refuses it for a job no longer pending.
            self.run(["scontrol", "update", f"JobId={job.job_id}", f"ReqNodeList={kept}"])
        return dropped

    def node_count(self) -> int:
        return len(self.node_states())

    def unavailable_nodes(self) -> list[str]:
        """The partition's nodes that are down, drained or failing (of every partition when none is set), each as
        ``"<node> <reason>"``, the reason Slurm, an admin or ParallelCluster gave (``Not responding``,
        ``(Code:InsufficientInstanceCapacity)...``). Nodes are named as Slurm names them (``%N``, a hostlist where
        several share a reason), not by their host names, which nodes sharing a host have in common."""
        argv = ["sinfo", "-R", "-h", "-o", "%N %E"]
        if self.partition:
            argv.append(f"--partition={self.partition}")
        return [line.strip() for line in self.run(argv).splitlines() if line.strip()]


# sinfo's short states of nodes that take no new job (a powered-down cloud node, "idle~", does: it is resumed).
UNUSABLE_STATES = frozenset({"down", "drain", "drng", "fail", "failg", "futr", "inval", "maint"})


def usable(state: str) -> bool:
    """Whether a node in sinfo's short ``state`` takes new jobs (a trailing ``*``: it does not answer)."""
    return not state.endswith("*") and state.rstrip("~#!%$@^-") not in UNUSABLE_STATES


def unusable(nodes: list[str], states: dict[str, str]) -> list[str]:
    """Those of ``nodes`` that take no new jobs, by their ``states`` (``node_states``): one missing from them is
    gone from the partition."""
    return [node for node in nodes if not usable(states.get(node, "down"))]


def _utc_time(text: str) -> datetime | None:
    """The instant of a time sacct wrote in UTC (``IN_UTC``); None for one it does not know (``Unknown``)."""
    try:
        return datetime.strptime(text, SACCT_TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def _scontrol_fields(line: str) -> dict[str, str]:
    fields = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields
