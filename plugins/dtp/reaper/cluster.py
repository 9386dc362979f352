"""The reaper's finders on shared filesystems: the Slurm cluster's jobs and run directories, and the run directories
on the filesystem mounted on this worker."""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
from collections.abc import Callable
from datetime import UTC, datetime

from airflow.sdk.exceptions import AirflowNotFoundException

from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.hooks.slurm import SlurmHook
from dtp.naming import parse_slurm_comment
from dtp.pipeline.data import RUN_MARKER, RUNS_FOLDER
from dtp.reaper.active_runs import spare_active_runs
from dtp.reaper.expired import Expired, is_expired

log = logging.getLogger(__name__)


def find_expired_on_cluster(
    slurm_conn_id: str, now: datetime | None = None, *, active: Callable[[str, str], bool]
) -> list[Expired]:
    """The Slurm cluster's expired jobs (by their comment) and run directories (by their marker), less those of a
    run ``active`` says is queued or running; none where no connection ``slurm_conn_id`` is defined (an account
    whose runs use EKS or Batch only). A cluster that cannot be asked is an error, not an empty answer: its jobs
    would run on unseen."""
    now = now or datetime.now(UTC)
    try:
        SlurmHook.get_connection(slurm_conn_id)
    except AirflowNotFoundException:
        log.warning("No %s connection is defined: there is no Slurm cluster to sweep", slurm_conn_id)
        return []
    # One connection (a SlurmHook is the cluster's filesystem too), closed when the sweep has looked.
    with contextlib.closing(SlurmHook(slurm_conn_id)) as cluster:
        found = expired_jobs(cluster, now) + expired_run_dirs(cluster, now)
    return spare_active_runs(found, active)


def expired_jobs(cluster: SlurmHook, now: datetime) -> list[Expired]:
    """The cluster's jobs whose comment (``slurm_comment``) has expired, each with the DAG run the comment names
    (none in a comment written before it named one)."""
    found = []
    for line in cluster.run(["squeue", "-h", "-o", "%i|%j|%k"]).splitlines():
        job_id, name, comment = [*line.split("|", 2), "", ""][:3]
        expires_at, dag_id, run_id = parse_slurm_comment(comment)
        if is_expired(expires_at, now):
            found.append(Expired("slurm_job", job_id, name, expires_at, dag_id, run_id))
    return found


def find_expired_on_worker_mount(
    slurm_conn_id: str, now: datetime | None = None, *, active: Callable[[str, str], bool]
) -> list[Expired]:
    """Expired run directories on the shared filesystem mounted on this worker (``DTP_SHARED_DIR``, default
    ``/fsx``), where EKS and Batch runs keep theirs, less those of a run ``active`` says is queued or running; none
    where nothing is mounted there, or where the Slurm connection ``slurm_conn_id`` opens that same directory on
    this host (its own sweep covers it)."""
    mounted = SharedFilesystemHook(None)
    cluster = SharedFilesystemHook(slurm_conn_id)
    with contextlib.suppress(AirflowNotFoundException):  # no such connection: the mount is this sweep's alone
        same = posixpath.realpath(cluster.shared_dir) == posixpath.realpath(mounted.shared_dir)
        if cluster.transport == "local" and same:
            log.info("%s is %s's shared directory, which its own sweep covers", mounted.shared_dir, slurm_conn_id)
            return []
    return spare_active_runs(expired_run_dirs(mounted, now or datetime.now(UTC)), active)


def expired_run_dirs(shared: SharedFilesystemHook, now: datetime) -> list[Expired]:
    """Run directories on the cluster's shared filesystem whose marker (``run.json``) has expired: that filesystem
    may outlive the run's cluster (an existing FSx), and its checkpoints, data and logs would fill it."""
    runs = posixpath.join(shared.shared_dir, RUNS_FOLDER)
    # No runs directory yet is nothing to reap; one that cannot be listed fails the search.
    find = f'test ! -e "$1" || find "$1" -mindepth 2 -maxdepth 2 -type f -name {RUN_MARKER}'
    found = []
    for path in shared.run(["sh", "-c", find, "sh", runs]).splitlines():
        directory = posixpath.dirname(path)
        try:
            marker = json.loads(shared.read_file(path)[0])
        except ValueError:
            marker = None
        if not isinstance(marker, dict):
            log.warning("Skipping %s: its %s is not a JSON object", directory, RUN_MARKER)
            continue
        # Only a directory named after the run its marker names: a copied or moved marker deletes nothing.
        if marker.get("run_key") == posixpath.basename(directory) and is_expired(marker.get("expires_at"), now):
            dag_run = (str(marker.get("dag_id", "")), str(marker.get("run_id", "")))
            found.append(Expired("run_dir", directory, marker["run_key"], marker["expires_at"], *dag_run))
    return found
