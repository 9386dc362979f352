"""The reaper's finders on shared filesystems: the Slurm cluster's jobs, and the run directories and the directories
runs share (dataset mirrors, unpacked images) on the cluster's filesystem and on the one mounted on this worker."""

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
from dtp.pipeline.run_dirs import LEASES_FOLDER, RUN_MARKER, RUNS_FOLDER
from dtp.reaper.active_runs import spare_active_runs, spare_other_installations
from dtp.reaper.expired import Expired, is_expired

log = logging.getLogger(__name__)
# The directories every run of a dataset or an image shares, which each run leases (run_dirs.lease_shared_dir), by their
# kind: the folder of the shared filesystem they sit in, and how deep (frameworks.dataset_dir's dataset mirrors and
# the datasets caches beside them, LocalSlurmPlatform.runtime's unpacked images).
LEASED_DIRS = {"dataset_mirror": ("datasets", 2), "image_cache": ("images", 1)}
# An expired lease on a directory another lease still keeps: deleted alone, so that a directory in steady use does
# not gather a lease per run for ever.
LEASE = "lease"


def find_expired_on_cluster(
    slurm_conn_id: str, now: datetime | None = None, *, active: Callable[[str, str], bool], installation: str
) -> list[Expired]:
    """The Slurm cluster's expired jobs (by their comment), run directories (by their marker) and shared directories
    (by their leases), less those of a run of another installation than ``installation`` within a day of their
    expiry and those of a run ``active`` says is queued or running (``spare_kept_runs``); none where no connection
    ``slurm_conn_id`` is defined (an account whose runs use EKS or Batch only). A cluster that cannot be asked is an
    error, not an empty answer: its jobs would run on unseen."""
    now = now or datetime.now(UTC)
    try:
        SlurmHook.get_connection(slurm_conn_id)
    except AirflowNotFoundException:
        log.warning("No %s connection is defined: there is no Slurm cluster to sweep", slurm_conn_id)
        return []
    # One connection (a SlurmHook is the cluster's filesystem too), closed when the sweep has looked.
    with contextlib.closing(SlurmHook(slurm_conn_id)) as cluster:
        found = expired_jobs(cluster, now) + expired_run_dirs(cluster, now) + expired_leases(cluster, now)
    return spare_kept_runs(found, active, installation, now)


def expired_jobs(cluster: SlurmHook, now: datetime) -> list[Expired]:
    """The cluster's jobs whose comment (``slurm_comment``) has expired, each with the DAG run and the installation
    the comment names (none in a comment written before it named them)."""
    found = []
    for line in cluster.run(["squeue", "-h", "-o", "%i|%j|%k"]).splitlines():
        job_id, name, comment = [*line.split("|", 2), "", ""][:3]
        expires_at, dag_id, run_id, installation = parse_slurm_comment(comment)
        if is_expired(expires_at, now):
            found.append(Expired("slurm_job", job_id, name, expires_at, dag_id, run_id, installation))
    return found


def find_expired_on_worker_mount(
    slurm_conn_id: str, now: datetime | None = None, *, active: Callable[[str, str], bool], installation: str
) -> list[Expired]:
    """Expired run directories and shared directories on the shared filesystem mounted on this worker
    (``DTP_SHARED_DIR``, default ``/fsx``), where EKS and Batch runs keep theirs, less those of a run of another
    installation than ``installation`` within a day of their expiry and those of a run ``active`` says is queued or
    running (``spare_kept_runs``); none where nothing is mounted there, or where the Slurm connection
    ``slurm_conn_id`` opens that same directory on this host (its own sweep covers it)."""
    mounted = SharedFilesystemHook(None)
    cluster = SharedFilesystemHook(slurm_conn_id)
    with contextlib.suppress(AirflowNotFoundException):  # no such connection: the mount is this sweep's alone
        same = posixpath.realpath(cluster.shared_dir) == posixpath.realpath(mounted.shared_dir)
        if cluster.transport == "local" and same:
            log.info("%s is %s's shared directory, which its own sweep covers", mounted.shared_dir, slurm_conn_id)
            return []
    now = now or datetime.now(UTC)
    found = expired_run_dirs(mounted, now) + expired_leases(mounted, now)
    return spare_kept_runs(found, active, installation, now)


def expired_run_dirs(shared: SharedFilesystemHook, now: datetime) -> list[Expired]:
    """Run directories on the cluster's shared filesystem whose marker (``run.json``) has expired: that filesystem
    may outlive the run's cluster (an existing FSx), and its checkpoints, data and logs would fill it. Each names
    the DAG run and the installation its marker names (none in a marker written before it named them)."""
    runs = posixpath.join(shared.shared_dir, RUNS_FOLDER)
    # No runs directory yet is nothing to reap; one that cannot be listed fails the search.
    find = f'test ! -e "$1" || find "$1" -mindepth 2 -maxdepth 2 -type f -name {RUN_MARKER}'
    found = []
    for path in shared.run(["sh", "-c", find, "sh", runs]).splitlines():
        directory = posixpath.dirname(path)
        if (marker := _read_marker(shared, path)) is None:
            log.warning("Skipping %s: its %s is not a JSON object", directory, RUN_MARKER)
            continue
        # Only a directory named after the run its marker names: a copied or moved marker deletes nothing.
        if marker.get("run_key") == posixpath.basename(directory) and is_expired(marker.get("expires_at"), now):
            found.append(Expired("run_dir", directory, marker["run_key"], marker["expires_at"], *_made_by(marker)))
    return found


def _read_marker(shared: SharedFilesystemHook, path: str) -> dict | None:
    """The marker (``run_dirs.run_marker``) at ``path``; None where it is not a JSON object (one being written, or
    not DTP's)."""
    try:
        marker = json.loads(shared.read_file(path)[0])
    except ValueError:
        return None
    return marker if isinstance(marker, dict) else None


def _made_by(marker: dict) -> tuple[str, str, str]:
    """The DAG run (dag_id, run_id) and the installation a marker names: empty strings for what one written before
    it named them does not carry (a marker without an installation counts as this installation's, as a resource
    without the ``dtp:installation`` tag does)."""
    return str(marker.get("dag_id", "")), str(marker.get("run_id", "")), str(marker.get("installation", ""))


def expired_leases(shared: SharedFilesystemHook, now: datetime) -> list[Expired]:
    """The shared directories (``LEASED_DIRS``) whose every lease has expired, one record per lease (each names its
    run), and the expired leases (kind ``LEASE``) on those another lease still keeps. A directory no run leased
    (made before runs leased them, or by hand) is left alone, logged, and so is one that is not a directory."""
    found: list[Expired] = []
    unleased: list[str] = []
    for kind, (folder, depth) in LEASED_DIRS.items():
        entries, leases = _listed(shared, folder, depth)
        unleased += [f"{folder}/{path}" for path, type_ in entries.items() if type_ == "d" and path not in leases]
        for path, keys in leases.items():
            # One gone is fine (its leases go); one not listed but there sits under a symbolic link.
            if entries.get(path, "d") != "d" or (path not in entries and _exists(shared, f"{folder}/{path}")):
                log.warning("Leaving %s/%s and its leases: not a directory of the shared filesystem", folder, path)
                continue
            found += _expired_leases_of(shared, kind, f"{folder}/{path}", keys, now)
    if unleased:
        log.info("Leaving the shared directories no run leased: %s", ", ".join(sorted(unleased)))
    return found


def _listed(shared: SharedFilesystemHook, folder: str, depth: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    """What sits ``depth`` deep in ``folder`` of the shared filesystem, not through a symbolic link, by its path in
    ``folder``: its type (find's ``%y``: ``d`` a directory, ``l`` a symbolic link, ...), and the run keys of the
    leases on it. Hidden ones (an image being unpacked, a tree being deleted) are not listed."""
    # No folder yet is nothing to reap; one that cannot be listed fails the search.
    listing = (
        'set -e; test ! -e "$1/$2" || find "$1/$2" -mindepth "$3" -maxdepth "$3" -printf "entry %y %P\\n"; '
        'test ! -e "$1/$4/$2" || find "$1/$4/$2" -mindepth "$(($3 + 1))" -maxdepth "$(($3 + 1))" -type f '
        '-name "*.json" -printf "lease %P\\n"'
    )
    entries: dict[str, str] = {}
    leases: dict[str, list[str]] = {}
    argv = ["sh", "-c", listing, "sh", shared.shared_dir, folder, str(depth), LEASES_FOLDER]
    for line in shared.run(argv).splitlines():
        what, _, rest = line.partition(" ")
        if what == "entry":
            type_, _, path = rest.partition(" ")
            if not _hidden(path):
                entries[path] = type_
        elif what == "lease":
            path, _, name = rest.rpartition("/")
            if not _hidden(path):
                leases.setdefault(path, []).append(name.removesuffix(".json"))
    return entries, leases


def _hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/"))


def _exists(shared: SharedFilesystemHook, relative: str) -> bool:
    """Whether anything is at ``relative`` in the shared filesystem (a dangling symbolic link included)."""
    there = 'if [ -e "$1" ] || [ -L "$1" ]; then echo there; fi'
    return shared.run(["sh", "-c", there, "sh", posixpath.join(shared.shared_dir, relative)]).strip() == "there"


def _expired_leases_of(
    shared: SharedFilesystemHook, kind: str, relative: str, keys: list[str], now: datetime
) -> list[Expired]:
    """The records of the leased directory at ``relative`` (its path in the shared filesystem) whose leases are
    named by the run keys ``keys``: one of ``kind`` per lease where every lease has expired, else one ``LEASE`` per
    expired lease. A lease that cannot be read, or names another run than its file, keeps it all: it may be a run's,
    being written."""
    directory = posixpath.join(shared.shared_dir, relative)
    folder = posixpath.join(shared.shared_dir, LEASES_FOLDER, relative)
    read = {key: _read_marker(shared, posixpath.join(folder, f"{key}.json")) for key in keys}
    leases = {key: lease for key, lease in read.items() if lease is not None and lease.get("run_key") == key}
    if len(leases) < len(read):
        unread = ", ".join(sorted(set(read) - set(leases)))
        log.warning("Keeping %s: its leases %s name no run (or are being written)", directory, unread)
        return []
    expired = {key: lease for key, lease in leases.items() if is_expired(lease.get("expires_at"), now)}
    whole = len(expired) == len(leases)
    return [
        Expired(
            kind if whole else LEASE,
            directory if whole else posixpath.join(folder, f"{key}.json"),
            key,
            lease["expires_at"],
            *_made_by(lease),
        )
        for key, lease in expired.items()
    ]


def spare_kept_runs(
    found: list[Expired], active: Callable[[str, str], bool], installation: str, now: datetime
) -> list[Expired]:
    """``spare_other_installations`` then ``spare_active_runs``, as for the AWS account, each shared directory kept
    whole: a lease on it of another installation's run within a day of its expiry, or of a run still queued or
    running, keeps it, with the records of its other leases."""
    kept = spare_active_runs(spare_other_installations(found, installation, now), active)
    spared = {item.name for item in set(found) - set(kept) if item.kind in LEASED_DIRS}
    return [item for item in kept if item.kind not in LEASED_DIRS or item.name not in spared]
