"""Submit a batch script to Slurm and wait for it without holding a worker slot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from dtp.connections import TRAINING_QUEUE
from dtp.hooks.shared_fs import ClusterCommandError
from dtp.hooks.slurm import SlurmHook, SlurmJob, unusable
from dtp.hostlist import expand_hostlist
from dtp.operators.time_limit import time_left

# The pending timeout of a DAG's form (``pending_timeout_minutes``), in the operator's seconds.
PENDING_TIMEOUT_S = "{{ params.pending_timeout_minutes * 60 }}"
# sbatch's --time in whole minutes: a new job needs at least one.
MIN_TIME_LIMIT_MIN = 1
# How a job ends when its node failed, or ran out of memory: the node may be at fault.
NODE_STATES = frozenset({"NODE_FAIL", "OUT_OF_MEMORY"})
# The last log lines a failure message quotes.
TAIL_LINES = 20


class SlurmJobFailed(AirflowException):
    """The Slurm job ended in a state other than COMPLETED, hung, or never started."""


class SlurmJobOverTime(AirflowFailException):
    """The Slurm job ran past its time limit; a retry would run past it again, so the task is not retried."""


class SlurmSubmitJobOperator(BaseOperator):
    """
    Submit ``script_path`` with sbatch, defer to ``SlurmJobTrigger``, fail with the job's last log lines.

    Idempotent: a retry (or a cleared task) first looks for an active job named
    ``job_name`` and re-attaches to it, or for one that already completed and
    returns it, instead of submitting a second one (a job still COMPLETING is
    waited out first, and judged by how it ended). Job names carry the run's
    key, so only this run's own jobs are found; a job submitted before
    ``submitted_after`` is another run's (one deleted and made again under the
    same run id), neither re-attached to, reused nor counted against the time
    limit. A job that
    ran out of its time limit is not submitted again: the task fails without
    retries.

    A failed job fails the task with its state and exit code, the lines of its
    log that look like errors (a Python exception, srun's, NCCL's...), which a
    failed rank's boilerplate may push out of its last lines, then those. One
    that ended with its node (NODE_FAIL, OUT_OF_MEMORY) names the node(s), and
    on a cluster of the connection's own (no ``head_node``) how to train without
    them. One pinned to ``nodelist`` that did not start within the pending
    timeout names those of its nodes that take no jobs, and how to train
    without them.

    :param script_path: batch script on the cluster's shared filesystem
    :param job_name: Slurm job name (also the key used to find the job again)
    :param output_path: sbatch ``--output`` pattern; ``%j`` becomes the job id
    :param comment: sbatch ``--comment`` (DTP puts the resource expiry there, for the reaper)
    :param hang_timeout: seconds without a new log line before the job counts as hung
    :param pending_timeout: seconds the job may stay PENDING (nodes down, a request the partition cannot meet)
        before it is cancelled and the task fails with Slurm's reason; the clock restarts when the job runs and is
        requeued (0: no limit)
    :param sbatch_args: extra sbatch arguments, e.g. ``["--nodes=2"]``
    :param slurm_conn_id: the cluster's Slurm connection (see ``SlurmHook``)
    :param head_node: over ssh, the host to reach instead of the SSH connection's own (a cluster created per run)
    :param head_node_host_keys: the host keys of ``head_node``, which its ssh checks (None: the SSH connection says
        how its host key is checked)
    :param time_limit_minutes: sbatch ``--time``: Slurm stops the job after this many minutes, less what earlier
        jobs of this name ran (0: no limit)
    :param submitted_after: when the run's spec was made, an ISO-8601 time with its zone: a job of this name
        submitted before it is another run's (None: none is)
    :param nodelist: sbatch ``--nodelist``: the Slurm hostlist of the nodes the job must run on (the nodes the
        run's preflight checked), a requeued job too, unless some of them take no jobs then: the trigger unpins it
        from those; those of them that take no jobs are named when it does not start ("": any of the partition's
        nodes)
    """

    template_fields: Sequence[str] = (
        "slurm_conn_id",
        "head_node",
        "head_node_host_keys",
        "script_path",
        "job_name",
        "output_path",
        "comment",
        "hang_timeout",
        "pending_timeout",
        "sbatch_args",
        "time_limit_minutes",
        "submitted_after",
        "nodelist",
    )

    def __init__(
        self,
        *,
        script_path: str,
        job_name: str,
        output_path: str,
        comment: str = "",
        sbatch_args: list[str] | None = None,
        hang_timeout: float | str = 600.0,
        pending_timeout: float | str = 3600.0,
        time_limit_minutes: int | str = 0,
        poll_interval: float = 5.0,
        slurm_conn_id: str = SlurmHook.default_conn_name,
        head_node: str | None = None,
        head_node_host_keys: list[str] | None = None,
        submitted_after: str | None = None,
        nodelist: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.script_path = script_path
        self.job_name = job_name
        self.output_path = output_path
        self.comment = comment
        self.sbatch_args = sbatch_args or []
        self.hang_timeout = hang_timeout
        self.pending_timeout = pending_timeout
        self.time_limit_minutes = time_limit_minutes
        self.poll_interval = poll_interval
        self.slurm_conn_id = slurm_conn_id
        self.head_node = head_node
        self.head_node_host_keys = head_node_host_keys
        self.submitted_after = submitted_after
        self.nodelist = nodelist

    def execute(self, context: Any) -> dict[str, Any] | None:
        # Here, not at the top: the trigger pulls in paramiko, which a DAG file parsing this module has no use for.
        from dtp.triggers.slurm import SlurmJobTrigger

        hook = self._hook()
        active = self._this_runs(hook.find_jobs(self.job_name))
        if ending := [job for job in active if job.state == "COMPLETING"]:
            # Ending: cancelled with a killed or cleared try of this task, say. Judged by how it ended, not
            # re-attached to (which would fail this try with its CANCELLED).
            for job in ending:
                self.log.info("Slurm job %s (%s) is COMPLETING: waiting for it to end", job.job_id, self.job_name)
                hook.wait_ended(job.job_id)
            active = self._this_runs(hook.find_jobs(self.job_name))
        ended = self._this_runs(hook.ended_jobs(self.job_name))
        completed = [job for job in ended if job.succeeded]
        over_time = [job for job in ended if job.state == "TIMEOUT"]
        if over_time and not (active or completed):
            raise SlurmJobOverTime(
                f"Slurm job {over_time[-1].job_id} ({self.job_name}) already ran past its time limit; not submitting "
                "it again"
            )
        if active:
            job_id = active[0].job_id
            self.log.info("Re-attaching to active Slurm job %s (%s)", job_id, self.job_name)
        elif completed:
            job = completed[-1]
            self.log.info("Slurm job %s (%s) already completed: reusing it, not running it again", job.job_id, job.name)
            return self._result(context, job.job_id, job.state)
        else:
            job_id = hook.submit(
                self.script_path,
                job_name=self.job_name,
                output=self.output_path,
                comment=self.comment,
                extra_args=[*self.sbatch_args, *self._nodelist_args(), *self._time_limit_args(ended)],
            )
        log_path = self._push_ids(context, job_id)
        self.defer(
            trigger=SlurmJobTrigger(
                job_id=job_id,
                log_path=log_path,
                slurm_conn_id=self.slurm_conn_id,
                head_node=self.head_node,
                head_node_host_keys=self.head_node_host_keys,
                poll_interval=self.poll_interval,
                hang_timeout=float(self.hang_timeout),
                pending_timeout=float(self.pending_timeout),
                nodelist=self.nodelist,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        job_id = event["job_id"]
        excerpt = self._log_excerpt(event, self.output_path.replace("%j", job_id))
        if event["status"] == "hung":
            raise SlurmJobFailed(f"Slurm job {job_id} hung ({event['message']}); {self._cancel(job_id)}. {excerpt}")
        if event["status"] == "pending":
            unavailable = "".join(f"\n{node}" for node in event.get("unavailable_nodes", []))
            raise SlurmJobFailed(
                f"Slurm job {job_id} ({self.job_name}) did not start within {float(self.pending_timeout):.0f}s: it is"
                f" still {event['state']}, Slurm's reason: {event.get('reason') or '(none given)'}; "
                f"{self._cancel(job_id)}"
                + (f". Nodes down or drained, and why:{unavailable}" if unavailable else "")
                + self._pinned_advice(event.get("required_nodes", self.nodelist))
            )
        if event["status"] == "lost":
            raise SlurmJobFailed(f"Slurm job {job_id} is lost: {event['message']}. {excerpt}")
        if event["status"] == "error":  # the cluster out of reach: the job may well be running, a retry re-attaches
            raise SlurmJobFailed(
                f"Slurm job {job_id} ({self.job_name}), last seen {event['state']}: {event['message']}. {excerpt}"
            )
        if event["state"] == "TIMEOUT":
            minutes = int(self.time_limit_minutes or 0)
            # Without one of the operator's, the limit is the batch script's --time (the preflight's), else the
            # partition's.
            limit = f"its time limit of {minutes} min" if minutes else "its script's or its partition's time limit"
            raise SlurmJobOverTime(
                f"Slurm job {job_id} ran past {limit} and was stopped by Slurm; not retried. {excerpt}"
            )
        if event["status"] != "success":
            raise SlurmJobFailed(
                f"Slurm job {job_id} ended {event['state']} (exit code {event.get('exit_code') or '?'})"
                f"{self._node_advice(event)}. {excerpt}"
            )
        self.log.info("Slurm job %s completed", job_id)
        return self._result(context, job_id, event["state"])

    @staticmethod
    def _log_excerpt(event: dict[str, Any], log_path: str) -> str:
        """The job log's lines that look like errors, then its last lines."""
        tail = "\n".join(event.get("tail", [])[-TAIL_LINES:]) or f"(no output in {log_path}: could the job open it?)"
        errors = "".join(f"\n{line}" for line in event.get("errors", []))
        return (f"Error lines:{errors}\n" if errors else "") + f"Last lines:\n{tail}"

    def _node_advice(self, event: dict[str, Any]) -> str:
        """For a job that ended with its node(s): which, and on a cluster whose nodes outlive the run (the
        connection's own, no ``head_node``) how to train without them, as ``preflight_message`` says."""
        nodes = event.get("nodes", "")
        if event["state"] not in NODE_STATES or nodes in ("", "(null)"):
            return ""
        if self.head_node is not None:
            return f" on {nodes}"
        return f" on {nodes}; to train without them, trigger again with exclude_nodes={nodes}"

    def _pinned_advice(self, pinned: str) -> str:
        """For a job pinned to ``nodelist`` that did not start: the nodes it is pinned to (``pinned``, fewer once the
        trigger unpinned a requeued job from those that took no jobs), those of them that take no jobs (down,
        drained, gone from the partition), and how to train without them."""
        if not (self.nodelist and pinned):
            return ""
        advice = (
            f". It may run only on {pinned}, the nodes the run's preflight checked"
            if set(expand_hostlist(pinned)) == set(expand_hostlist(self.nodelist))  # Slurm may write it otherwise
            else f". It must run on {pinned}: of the nodes the run's preflight checked ({self.nodelist}), those it "
            "was not unpinned from when requeued"
        )
        try:
            states = self._hook().node_states()
        except ClusterCommandError:
            self.log.exception("Could not read the states of the nodes of Slurm job %s", self.job_name)
            return advice + ": if one of them is down or drained, trigger again with exclude_nodes=<that node>"
        if down := unusable(expand_hostlist(pinned), states):
            return advice + (
                f"; of those, these take no jobs (down, drained or gone from the partition): {', '.join(down)}. To "
                f"train without them, trigger again with exclude_nodes={','.join(down)}"
            )
        return advice + "; all of them take jobs (other jobs may hold them)"

    def _this_runs(self, jobs: list[SlurmJob]) -> list[SlurmJob]:
        """The jobs submitted once the run's spec was made (all of them without ``submitted_after``)."""
        if not self.submitted_after:
            return jobs
        since = datetime.fromisoformat(self.submitted_after)
        return [job for job in jobs if job.submitted_at is None or job.submitted_at >= since]

    def _cancel(self, job_id: str) -> str:
        """Cancel the job and wait until Slurm no longer lists it, so that a retry submits a new one rather than
        re-attaching to it; say what became of it."""
        try:
            self._hook().cancel_and_wait(self.job_name)
        except ClusterCommandError as err:
            self.log.exception("Could not cancel Slurm job %s (%s)", job_id, self.job_name)
            return f"cancelling it failed ({err})"
        return "cancelled it"

    def _hook(self) -> SlurmHook:
        """The hook to the job's cluster: through its head node, checking its host keys, where the run created it."""
        return SlurmHook(self.slurm_conn_id, self.head_node, self.head_node_host_keys or ())

    def _nodelist_args(self) -> list[str]:
        """``--nodelist`` for a new job pinned to ``nodelist``: with ``--nodes``, the job takes exactly those."""
        return [f"--nodelist={self.nodelist}"] if self.nodelist else []

    def _time_limit_args(self, ended: list[SlurmJob]) -> list[str]:
        """``--time`` for a new job: the limit less what earlier jobs of this name ran (a retried task's job
        gets what is left, not the whole limit again)."""
        left = time_left(
            int(self.time_limit_minutes or 0),
            math.ceil(sum(job.elapsed_s for job in ended) / 60),
            MIN_TIME_LIMIT_MIN,
            unit="min",
            used_by=f"earlier {self.job_name} jobs ran",
            over_time=SlurmJobOverTime,
        )
        return [] if left is None else [f"--time={left}"]

    def _push_ids(self, context: Any, job_id: str) -> str:
        log_path = self.output_path.replace("%j", job_id)
        context["ti"].xcom_push(key="job_id", value=job_id)
        context["ti"].xcom_push(key="log_path", value=log_path)
        return log_path

    def _result(self, context: Any, job_id: str, state: str) -> dict[str, Any]:
        return {"job_id": job_id, "log_path": self._push_ids(context, job_id), "state": state}


def submit_prepared_slurm_job(task_id: str, job: Any, **kwargs: Any) -> SlurmSubmitJobOperator:
    """Submit a Slurm job prepared by ``dtp.pipeline.jobs`` (its XCom keys are the operator's arguments: its hang
    timeout too, the DAG form's or longer for a framework's checkpoint writes), with the form's pending timeout, on
    the training queue (``kwargs``: further operator arguments)."""
    return SlurmSubmitJobOperator(
        task_id=task_id,
        script_path=job["script_path"],
        job_name=job["job_name"],
        output_path=job["output_path"],
        comment=job["comment"],
        hang_timeout=job["hang_timeout_s"],
        pending_timeout=PENDING_TIMEOUT_S,
        slurm_conn_id=job["slurm_conn_id"],
        head_node=job["head_node"],
        head_node_host_keys=job["head_node_host_keys"],
        submitted_after=job["submitted_after"],
        nodelist=job["nodelist"],
        queue=TRAINING_QUEUE,
        **kwargs,
    )
