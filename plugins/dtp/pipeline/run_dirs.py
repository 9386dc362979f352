"""What runs leave on the cluster's shared filesystem, marked for the reaper (``dtp.reaper.cluster`` finds it by
these marks): each run's own directory (under ``RUNS_FOLDER``, marked with ``RUN_MARKER``) and its leases (under
``LEASES_FOLDER``) on the directories every run of a dataset or an image shares."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.naming import EXPIRES_TAG, INSTALLATION_TAG

RUN_MARKER = "run.json"
# Run directories sit under this folder of the shared filesystem, and what runs save under the same prefix of the
# artifacts bucket.
RUNS_FOLDER = "runs"
# The leases on the directories runs share (``lease_shared_dir``) sit under this folder, each directory's at the path it
# has under the shared filesystem: ``leases/datasets/<framework>/<hash>/<run_key>.json``.
LEASES_FOLDER = "leases"


def run_dir(spec: dict[str, Any], cluster: dict[str, Any]) -> Path:
    """The directory of the run of ``spec`` on the cluster's shared filesystem: ``<shared>/runs/<run_key>``."""
    return Path(cluster["shared_dir"]) / RUNS_FOLDER / spec["names"]["run_key"]


def run_marker(spec: dict[str, Any]) -> str:
    """The marker of what a run leaves on the shared filesystem (its directory's ``RUN_MARKER``, its leases), which
    the reaper reads: the run, the DAG run that made it, when it expires and its installation (its
    ``dtp:installation`` tag, where its spec has one: a run's always does)."""
    marker = {
        "run_key": spec["names"]["run_key"],
        "dag_id": spec["dag_id"],
        "run_id": spec["run_id"],
        "expires_at": spec["tags"][EXPIRES_TAG],
    }
    installation = spec["tags"].get(INSTALLATION_TAG)
    return json.dumps(marker | ({"installation": installation} if installation else {}))


def claim_run_dir(spec: dict[str, Any], cluster: dict[str, Any]) -> Path:
    """The run's directory, marked with ``RUN_MARKER``: the run it belongs to and when it expires. A shared
    filesystem may outlive the cluster (an existing FSx); the reaper removes the directory once it has expired."""
    path = run_dir(spec, cluster)
    SharedFilesystemHook.of_cluster(cluster).write_file(str(path / RUN_MARKER), run_marker(spec))
    return path


def lease_shared_dir(spec: dict[str, Any], cluster: dict[str, Any], directory: Path) -> None:
    """Lease ``directory``, which every run of a dataset or an image shares (a dataset mirror, an unpacked image), to
    the run of ``spec``: a file of the run's own under ``LEASES_FOLDER`` holding its ``run_marker``. The reaper
    deletes such a directory once every lease on it has expired and none of their runs is queued or running (and
    one no run leased, never).

    Written before the run looks at the directory or copies into it, so a sweep that lists the leases after that
    keeps the directory. The reaper's deletion looks at the leases again right before it renames the directory away
    to delete it, in one shell command (``deletion.REMOVE_LEASED_DIR``): what is left is a run leasing it between
    that look and the rename, which loses the directory if it had already found it there (an image unpacked, files
    copied) and fails (a retried ``stage_data`` copies again); and a lease written as the reaper removes the
    directory's emptied lease folder, which fails its task the same way.
    """
    relative = directory.relative_to(cluster["shared_dir"]).as_posix()
    path = posixpath.join(cluster["shared_dir"], LEASES_FOLDER, relative, f"{spec['names']['run_key']}.json")
    SharedFilesystemHook.of_cluster(cluster).write_file(path, run_marker(spec))
