"""The reaper's deletion: what its finders found, in dependency order, run by run."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import PurePosixPath
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook

from dtp.hooks.ami import AmiHook
from dtp.hooks.hyperpod import HyperPodHook
from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.hooks.slurm import SlurmHook
from dtp.hooks.stacks import StackHook
from dtp.hooks.sweeper import RunResourceSweeper
from dtp.metrics.prometheus import Pushgateway
from dtp.pipeline.network import destroy_run_resources
from dtp.pipeline.run_dirs import LEASES_FOLDER
from dtp.platforms.batch import BatchPlatform
from dtp.platforms.batch_settings import WAIT_TIMEOUT_MINUTES
from dtp.platforms.hyperpod_lifecycle import delete_lifecycle_objects, lifecycle_buckets
from dtp.platforms.hyperpod_logs import expire_cluster_logs
from dtp.reaper.cluster import LEASE, LEASED_DIRS
from dtp.reaper.expired import Expired
from dtp.reaper.pushgateway import KIND as PUSHGATEWAY_GROUP
from dtp.reaper.pytorchjobs import KIND as PYTORCHJOB
from dtp.reaper.pytorchjobs import pytorchjob_deleter

log = logging.getLogger(__name__)
# What a run's network sweep (destroy_run_resources) deletes together.
NETWORK_KINDS = ("stack", "bucket", "vpc")
# Kinds whose nodes may sit in a run's network: while one of them cannot be looked for, no network is swept.
NODE_KINDS = ("stack", "hyperpod_cluster", "batch")
# How long a ParallelCluster cluster's stack may take to go (FSx included) and how often it is polled, as
# ParallelClusterPlatform.teardown waits.
PCLUSTER_DELETE_TIMEOUT, PCLUSTER_DELETE_POLL = 3600, 30
# Deletes the leased directory $2 of the shared filesystem $1 and the leases in its lease folder $3 of the run keys
# after them, unless that folder now holds another lease (a run leased the directory since the sweep found it, to use
# it): prints "deleted" or "kept". Nothing is reached through a symbolic link out of the shared filesystem. The
# directory is renamed away (to a hidden name, which no sweep lists) before it is deleted: a run that leases it while
# a large tree is deleted finds it gone, not half there; what is left is a run leasing it between the check of its
# lease folder and that rename (see run_dirs.lease_shared_dir). A tree left half deleted by a sweep that stopped is
# deleted by the next one, whose leases are still there.
REMOVE_LEASED_DIR = r"""
set -e
cd -P "$1"
root=$(pwd -P)
directory=$2 leases=$3
shift 3
trash=$(dirname -- "$directory")/.reaped-$(basename -- "$directory")
for path in "$directory" "$trash" "$leases"; do
    if [ -e "$path" ] || [ -L "$path" ]; then
        if [ -L "$path" ] || [ "$(cd -P "$path" 2>/dev/null && pwd -P)" != "$root/$path" ]; then
            echo "$root/$path is not a directory of $root: nothing deleted" >&2
            exit 1
        fi
    fi
done
for lease in "$leases"/*.json; do
    [ -e "$lease" ] || continue
    key=${lease##*/}
    found=no
    for expired in "$@"; do [ "$expired.json" != "$key" ] || found=yes; done
    if [ "$found" = no ]; then echo kept; exit 0; fi
done
rm -rf -- "$trash"
if [ -e "$directory" ]; then mv -- "$directory" "$trash" && rm -rf -- "$trash"; fi
for key in "$@"; do rm -f -- "$leases/$key.json"; done
rmdir -- "$leases" 2>/dev/null || true
echo deleted
"""


class ReapIncomplete(RuntimeError):
    """Some expired resources could not be deleted; the message names each with its error."""


def reap(
    found: list[Expired],
    aws_conn_id: str,
    slurm_conn_id: str | None,
    dry_run: bool,
    unsearched: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Delete what ``find_expired_in_aws``, ``find_expired_pytorchjobs``, ``find_expired_pushgateway_groups``,
    ``find_expired_on_cluster(slurm_conn_id)`` or ``find_expired_on_worker_mount`` (``slurm_conn_id`` None) found,
    run by run; return what was (or would be) deleted. ``unsearched``, the kinds the search could not look for (kind:
    the error), fails it once the rest is deleted (or listed), as a resource that could not be deleted does."""
    unsearched = dict(unsearched or {})
    for item in found:
        log.info(
            "%s %-9s %-45s run %s expired %s",
            "would delete" if dry_run else "deleting",
            item.kind,
            item.name,
            item.run_key,
            item.expires_at,
        )
    if dry_run:
        if unsearched:
            raise ReapIncomplete(_unsearched_report(unsearched))
        return {"dry_run": True, "found": [asdict(i) for i in found], "deleted": []}
    deleted: list[dict[str, str]] = []
    failed: dict[str, str] = {}  # run key -> why one of its resources was not deleted

    def attempt(items: list[Expired], delete: Callable[[Expired], object]) -> None:
        for item in items:
            try:
                delete(item)
            except Exception as err:  # every other resource is still tried; the task fails at the end
                log.exception("could not delete %s %s of run %s", item.kind, item.name, item.run_key)
                failed[item.run_key] = f"{item.kind} {item.name}: {err}"
            else:
                deleted.append(asdict(item))

    def attempt_leased(items: list[Expired], shared: SharedFilesystemHook) -> None:
        # One deletion per directory, with the leases of all its records.
        by_directory: dict[str, list[Expired]] = {}
        for item in items:
            by_directory.setdefault(item.name, []).append(item)
        for directory, leases in by_directory.items():
            try:
                removed = remove_leased_dir(shared, directory, [lease.run_key for lease in leases])
            except Exception as err:  # every other resource is still tried; the task fails at the end
                log.exception("could not delete %s %s", leases[0].kind, directory)
                failed.update((lease.run_key, f"{lease.kind} {directory}: {err}") for lease in leases)
                continue
            if removed:
                deleted.extend(asdict(lease) for lease in leases)
            else:
                log.info("keeping %s %s: a run leased it since the sweep found it", leases[0].kind, directory)

    def of_kind(kind: str) -> list[Expired]:
        return [i for i in found if i.kind == kind]

    def delete_cluster(cluster: Expired) -> None:
        # Its lifecycle objects go, and its log group is made to expire, as its deletion starts, as in teardown;
        # the description naming their bucket and the group's id is read first, while there is one.
        hyperpod = HyperPodHook(aws_conn_id=aws_conn_id)
        described = hyperpod.describe_cluster(cluster.name) or {}
        hyperpod.delete_cluster(cluster.name)
        for bucket in lifecycle_buckets(described, cluster.run_key):
            delete_lifecycle_objects(S3Hook(aws_conn_id=aws_conn_id), bucket, cluster.run_key)
        if described:
            expire_cluster_logs(described, aws_conn_id)
        hyperpod.wait_until_deleted(cluster.name)

    def delete_parallelcluster(cluster: Expired) -> None:
        # Not `pcluster delete-cluster` (ParallelClusterPlatform.teardown): the reaper runs where that CLI is not
        # (.venv-pcluster is in no Airflow image, and the dtp_parallelcluster connection naming it may not exist).
        # For a cluster, delete-cluster is a DeleteStack of its root stack (Cluster.delete, keep_logs=False), whose
        # custom resources terminate the compute fleet: so the root stack is deleted here and waited on until gone.
        stacks = StackHook(aws_conn_id=aws_conn_id)
        status = stacks.delete_and_wait(cluster.name, timeout=PCLUSTER_DELETE_TIMEOUT, poll=PCLUSTER_DELETE_POLL)
        if status != "DELETE_COMPLETE":
            raise RuntimeError(f"cluster stack {cluster.name} is {status}: {stacks.failure_reasons(cluster.name)}")

    def delete_batch(environment: Expired) -> None:
        platform = BatchPlatform(aws_conn_id=aws_conn_id, wait_timeout_minutes=WAIT_TIMEOUT_MINUTES)
        platform.teardown({"names": {"run_key": environment.run_key}})

    # One hook of each kind for all their items (over ssh, one connection each), closed once they are done.
    with contextlib.ExitStack() as hooks:
        if slurm_conn_id:
            slurm = hooks.enter_context(contextlib.closing(SlurmHook(slurm_conn_id)))
            # Checked: a scancel slurmctld refused, or a job still listed (COMPLETING) when the wait ends, is not
            # deleted.
            attempt(of_kind("slurm_job"), lambda job: slurm.cancel_job_and_wait(job.name))
        # After the jobs that write there; None: the filesystem mounted on this worker.
        shared = hooks.enter_context(contextlib.closing(SharedFilesystemHook(slurm_conn_id)))
        attempt(of_kind("run_dir"), lambda directory: shared.remove_tree(directory.name))
        attempt(of_kind(LEASE), lambda lease: shared.run(["rm", "-f", "--", lease.name]))
        for kind in LEASED_DIRS:
            attempt_leased(of_kind(kind), shared)
    # Their clients are made at first use: a cluster sweep makes none.
    ec2, amis = RunResourceSweeper(aws_conn_id=aws_conn_id), AmiHook(aws_conn_id=aws_conn_id)
    # Made at the first job (one kubeconfig per cluster): a sweep elsewhere asks no EKS cluster.
    with pytorchjob_deleter(aws_conn_id) as delete_pytorchjob:
        attempt(of_kind(PYTORCHJOB), delete_pytorchjob)
    # Made at the first group, from the connection its finder read: a sweep elsewhere reads none.
    gateway = functools.cache(Pushgateway.from_connection)
    attempt(of_kind(PUSHGATEWAY_GROUP), lambda group: gateway().delete_run(group.name))
    attempt(of_kind("builder_instance"), lambda instance: ec2.conn.terminate_instances(InstanceIds=[instance.name]))
    # Clusters' nodes sit in their run's subnets: they go, and are waited on, before the network.
    attempt(of_kind("hyperpod_cluster"), delete_cluster)
    attempt(of_kind("parallelcluster"), delete_parallelcluster)
    attempt(of_kind("batch"), delete_batch)
    attempt(of_kind("ami"), lambda image: amis.deregister_image(image.name))
    attempt(of_kind("snapshot"), lambda snapshot: ec2.conn.delete_snapshot(SnapshotId=snapshot.name))
    networks = sorted({i.run_key for i in found if i.kind in NETWORK_KINDS})
    if networks and (blind := [kind for kind in NODE_KINDS if kind in unsearched]):
        # A cluster that could not be listed may still have nodes in one of these networks.
        log.warning("Leaving every network (%s) while %s cannot be looked for", ", ".join(networks), blind)
        networks = []
    for run_key in networks:
        of_run = [i for i in found if i.run_key == run_key and i.kind in NETWORK_KINDS]
        if run_key in failed:
            log.warning("Leaving run %s's network: %s is not gone", run_key, failed[run_key])
            continue
        try:
            stacks = [i.name for i in of_run if i.kind == "stack"]
            destroy_run_resources(aws_conn_id, run_key, stacks, tuple(i.name for i in of_run if i.kind == "bucket"))
        except Exception as err:  # the other runs' networks are still swept
            log.exception("could not delete the network of run %s", run_key)
            failed[run_key] = f"network: {err}"
        else:
            deleted += [asdict(i) for i in of_run]
    if failed or unsearched:
        report = [f"deleted {len(deleted)} of {len(found)} expired resources"]
        if failed:
            report.append("not deleted:\n" + "\n".join(f"run {key}: {why}" for key, why in sorted(failed.items())))
        if unsearched:
            report.append(_unsearched_report(unsearched))
        raise ReapIncomplete("; ".join(report))
    return {"dry_run": False, "found": [asdict(i) for i in found], "deleted": deleted}


def remove_leased_dir(shared: SharedFilesystemHook, directory: str, run_keys: list[str]) -> bool:
    """Delete ``directory``, which runs share on the filesystem ``shared``, and its leases of ``run_keys``
    (``REMOVE_LEASED_DIR``); False, deleting nothing, where another run has leased it since."""
    relative = PurePosixPath(directory).relative_to(shared.shared_dir).as_posix()
    leases = f"{LEASES_FOLDER}/{relative}"
    said = shared.run(["sh", "-c", REMOVE_LEASED_DIR, "sh", shared.shared_dir, relative, leases, *run_keys])
    return said.strip() == "deleted"


def _unsearched_report(unsearched: Mapping[str, str]) -> str:
    return "could not look for the expired resources of kind:\n" + "\n".join(
        f"{kind}: {why}" for kind, why in sorted(unsearched.items())
    )
