"""Find and delete what runs left behind past their ``dtp:expires-at`` tag.

The safety net under teardown: a teardown that itself failed, a run with
``keep_cluster=true``, or a worker that died mid-run leaves tagged resources;
the scheduled ``reaper`` DAG finds them by tag (run directories on the shared
filesystem by their ``run.json`` marker; never by a local record) and
deletes them with the same dependency-ordered sweep teardown uses (HyperPod
clusters, ParallelCluster clusters and Batch compute environments first,
waited on until gone: their nodes sit in the run's subnets). One resource
that cannot be deleted, or one kind that cannot be looked for, does not stop
the others: the task fails at the end, naming each, and its retry or the next
sweep finds them again. Nothing of a DAG run still queued or running is
deleted, whatever its expiry: a run cleared or retried after it recreates its
resources with the expiry its ``validate_params`` fixed, and they are in use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from airflow.providers.amazon.aws.hooks.batch_client import BatchClientHook
from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.providers.amazon.aws.hooks.ssm import SsmHook
from airflow.sdk.exceptions import AirflowNotFoundException
from botocore.exceptions import ClientError

from dtp.hooks.hyperpod import HyperPodHook
from dtp.hooks.packer import PackerHook, snapshot_ids
from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.hooks.slurm import SlurmHook
from dtp.hooks.stacks import StackHook
from dtp.hooks.sweeper import RunResourceSweeper
from dtp.images.ami import AMI_PARAMETER_PATH, BUILDER_TAG
from dtp.naming import EXPIRES_TAG, TAG_PREFIX, parse_expiry, parse_slurm_comment, tags_dict
from dtp.pipeline.data import RUN_MARKER, RUNS_FOLDER
from dtp.pipeline.network import destroy_run_resources
from dtp.platforms.batch import WAIT_TIMEOUT_MINUTES, BatchPlatform

log = logging.getLogger(__name__)
RUN = f"{TAG_PREFIX}run"
DAG = f"{TAG_PREFIX}dag"
RUN_ID = f"{TAG_PREFIX}run-id"
# The DAG run states in which a run may still create or use its resources.
ACTIVE_RUN_STATES = ("queued", "running")
# What a run's network sweep (destroy_run_resources) deletes together.
NETWORK_KINDS = ("stack", "bucket", "vpc")
# Kinds whose nodes may sit in a run's network: while one of them cannot be looked for, no network is swept.
NODE_KINDS = ("stack", "hyperpod_cluster", "batch")
# The tags ParallelCluster adds to the cluster config's Tags (which carry dtp:run and dtp:expires-at) on a cluster's
# root stack (aws-parallelcluster's pcluster/constants.py PCLUSTER_VERSION_TAG; its list_pcluster_stacks tells
# cluster stacks from `pcluster build-image` stacks, which carry both tags, the same way).
PCLUSTER_VERSION_TAG = "parallelcluster:version"
PCLUSTER_IMAGE_ID_TAG = "parallelcluster:image_id"
# How long a ParallelCluster cluster's stack may take to go (FSx included) and how often it is polled, as
# ParallelClusterPlatform.teardown waits.
PCLUSTER_DELETE_TIMEOUT, PCLUSTER_DELETE_POLL = 3600, 30


class ReapIncomplete(RuntimeError):
    """Some expired resources could not be deleted; the message names each with its error."""


@dataclass(frozen=True)
class Expired:
    """A resource past its expiry: its kind (``stack``, ``slurm_job``, ...), the name or id to delete it by, the
    run it belongs to, its expiry, and the DAG run that made it (empty where the resource does not say)."""

    kind: str
    name: str
    run_key: str
    expires_at: str
    dag_id: str = ""
    run_id: str = ""


@dataclass(frozen=True)
class AwsFindings:
    """What ``find_expired_in_aws`` found to delete, and the kinds it could not look for (kind: the error)."""

    found: list[Expired]
    unsearched: dict[str, str] = field(default_factory=dict)


def _tagged(kind: str, name: str, tags: Mapping[str, str], run_key: str | None = None) -> Expired:
    """The expired resource ``name`` of ``kind``, its run and expiry as its tags say."""
    run_key = run_key or tags[RUN]
    return Expired(kind, name, run_key, tags[EXPIRES_TAG], tags.get(DAG, ""), tags.get(RUN_ID, ""))


def _expired(expires_at: str | None, now: datetime) -> bool:
    if not expires_at:
        return False
    try:
        return parse_expiry(expires_at) < now
    except ValueError:
        return False


def find_expired_in_aws(
    aws_conn_id: str, now: datetime | None = None, *, active: Callable[[str, str], bool]
) -> AwsFindings:
    """The account's expired stacks (network and ParallelCluster cluster stacks), buckets, VPCs, HyperPod clusters,
    Batch environments, builder instances, unpublished AMIs and the snapshots AMIs left behind, less those of a run
    ``active`` says is queued or running. Each kind is looked for on its own: one whose lookup fails (an API down,
    a permission missing) is logged and named in ``unsearched``, and the others are still found."""
    now = now or datetime.now(UTC)
    ec2 = RunResourceSweeper(aws_conn_id=aws_conn_id)  # one EC2 client, made at the first lookup that needs it
    lookups: dict[str, Callable[[], list[Expired]]] = {
        "stack": lambda: expired_stacks(StackHook(aws_conn_id=aws_conn_id).conn, now),
        "bucket": lambda: expired_buckets(S3Hook(aws_conn_id=aws_conn_id).conn, now),
        "vpc": lambda: expired_vpcs(ec2.conn, now),
        "hyperpod_cluster": lambda: expired_hyperpod_clusters(HyperPodHook(aws_conn_id=aws_conn_id), now),
        "batch": lambda: expired_batch_environments(BatchClientHook(aws_conn_id=aws_conn_id).client, now),
        "builder_instance": lambda: expired_builder_instances(ec2.conn, now),
        "ami": lambda: expired_amis(ec2.conn, published_amis(aws_conn_id), now),
    }
    found: list[Expired] = []
    unsearched: dict[str, str] = {}
    for kind, lookup in lookups.items():
        try:
            found += lookup()
        except Exception as err:  # the other kinds are still looked for, and deleted; reap fails at the end
            log.exception("could not look for expired resources of kind %s", kind)
            unsearched[kind] = f"{type(err).__name__}: {err}"
    return AwsFindings(spare_active_runs(found, active), unsearched)


def expired_buckets(s3: Any, now: datetime) -> list[Expired]:
    """Expired buckets of a run (one whose tags cannot be read is not one of DTP's)."""
    found = []
    for bucket in s3.list_buckets().get("Buckets", []):
        try:
            tags = tags_dict(s3.get_bucket_tagging(Bucket=bucket["Name"])["TagSet"])
        except ClientError:
            continue
        if RUN in tags and _expired(tags.get(EXPIRES_TAG), now):
            found.append(_tagged("bucket", bucket["Name"], tags))
    return found


def expired_vpcs(ec2: Any, now: datetime) -> list[Expired]:
    """Expired VPCs of a run (what its network sweep deletes with them is found by their run's tag then)."""
    found = []
    for vpc in ec2.describe_vpcs(Filters=[{"Name": "tag-key", "Values": [RUN]}])["Vpcs"]:
        tags = tags_dict(vpc.get("Tags", []))
        if _expired(tags.get(EXPIRES_TAG), now):
            found.append(_tagged("vpc", vpc["VpcId"], tags))
    return found


def expired_hyperpod_clusters(hyperpod: HyperPodHook, now: datetime) -> list[Expired]:
    """Expired HyperPod clusters of a run."""
    return [
        _tagged("hyperpod_cluster", name, tags)
        for name, tags in hyperpod.tagged_clusters()
        if RUN in tags and _expired(tags.get(EXPIRES_TAG), now)
    ]


def expired_batch_environments(batch: Any, now: datetime) -> list[Expired]:
    """Expired Batch compute environments of a run (deleted with the run's queue, job definitions and jobs)."""
    found = []
    for page in batch.get_paginator("describe_compute_environments").paginate():
        for environment in page["computeEnvironments"]:
            tags = environment.get("tags", {})
            if RUN in tags and _expired(tags.get(EXPIRES_TAG), now):
                found.append(_tagged("batch", environment["computeEnvironmentName"], tags))
    return found


def spare_active_runs(found: list[Expired], active: Callable[[str, str], bool]) -> list[Expired]:
    """``found`` less every resource of a run that ``active(dag_id, run_id)`` says is still queued or running: a
    task cleared or retried after its run's expiry recreates what it needs with that expiry, and it is in use. A
    run's resources are kept or deleted together (its network sweep takes all that is tagged with its key), so one
    of them naming an active DAG run keeps them all; one naming no DAG run (an older Slurm comment) cannot."""
    answers: dict[tuple[str, str], bool] = {}

    def is_active(dag_run: tuple[str, str]) -> bool:
        if dag_run not in answers:
            answers[dag_run] = active(*dag_run)
        return answers[dag_run]

    live = {
        item.run_key: (item.dag_id, item.run_id)
        for item in found
        if item.dag_id and item.run_id and is_active((item.dag_id, item.run_id))
    }
    for item in found:
        if item.run_key in live:
            dag_id, run_id = live[item.run_key]
            log.info(
                "keeping %s %s of run %s: expired %s but its run %s of %s is still running",
                item.kind,
                item.name,
                item.run_key,
                item.expires_at,
                run_id,
                dag_id,
            )
    return [item for item in found if item.run_key not in live]


def run_is_active(dag_id: str, run_id: str) -> bool:
    """Whether this Airflow's DAG run ``run_id`` of ``dag_id`` is queued or running in a DAG that is not paused,
    asked through the Task SDK (so callable in a running task only): the check the reaper's tasks pass their
    finders. A run it does not know (deleted, another installation's, or one whose id has a character a tag
    cannot hold, which ``tag_value`` replaced) is not active. A paused DAG's run is not either: the scheduler
    leaves it "running" for as long as the DAG stays paused, and its teardowns do not run, so the expiry is what
    ends its resources. Any other error raises: nothing is deleted on a guess."""
    from airflow.sdk.exceptions import AirflowRuntimeError
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    try:
        state = RuntimeTaskInstance.get_dagrun_state(dag_id, run_id)
    except AirflowRuntimeError as err:
        if (err.error.detail or {}).get("status_code") != 404:
            raise
        return False
    return state in ACTIVE_RUN_STATES and not RuntimeTaskInstance.get_dag(dag_id).is_paused


def expired_amis(ec2: Any, published: set[str], now: datetime) -> list[Expired]:
    """Expired AMIs SSM does not point at (disabled ones too: their snapshots still cost), and expired snapshots
    no AMI uses any more (an AMI deregistered whose snapshot could not be deleted then)."""
    found, in_use = [], set()  # the snapshots of an AMI reaped now go with it (PackerHook.deregister_image)
    for image in ec2.describe_images(Owners=["self"], IncludeDisabled=True)["Images"]:
        in_use.update(snapshot_ids(image))
        tags = tags_dict(image.get("Tags", []))
        if RUN in tags and _expired(tags.get(EXPIRES_TAG), now) and image["ImageId"] not in published:
            found.append(_tagged("ami", image["ImageId"], tags))
    snapshots = ec2.describe_snapshots(OwnerIds=["self"], Filters=[{"Name": "tag-key", "Values": [RUN]}])
    for snapshot in snapshots["Snapshots"]:
        tags = tags_dict(snapshot.get("Tags", []))
        if _expired(tags.get(EXPIRES_TAG), now) and snapshot["SnapshotId"] not in in_use:
            found.append(_tagged("snapshot", snapshot["SnapshotId"], tags))
    return found


def expired_stacks(cloudformation: Any, now: datetime) -> list[Expired]:
    """Expired root stacks: a ParallelCluster cluster's (kind ``parallelcluster``, deleted before its run's network)
    and the rest (kind ``stack``, deleted with the network). A nested stack (ParallelCluster's QueuesStack and the
    like) carries its root's tags but is skipped: only a root stack may be deleted, and it takes its nested ones."""
    found = []
    for page in cloudformation.get_paginator("describe_stacks").paginate():
        for stack in page["Stacks"]:
            tags = tags_dict(stack.get("Tags", []))
            if stack.get("ParentId") or RUN not in tags or not _expired(tags.get(EXPIRES_TAG), now):
                continue
            cluster = PCLUSTER_VERSION_TAG in tags and PCLUSTER_IMAGE_ID_TAG not in tags
            found.append(_tagged("parallelcluster" if cluster else "stack", stack["StackName"], tags))
    return found


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
        if _expired(expires_at, now):
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


def expired_builder_instances(ec2: Any, now: datetime) -> list[Expired]:
    """Packer builder instances (tagged ``dtp:packer-builder``) still there past their expiry: packer deletes its
    instance when a bake ends, so one left means the bake's worker died with it."""
    filters = [
        {"Name": "tag-key", "Values": [BUILDER_TAG]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
    ]
    found = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for instance in (i for reservation in page["Reservations"] for i in reservation["Instances"]):
            tags = tags_dict(instance.get("Tags", []))
            if _expired(tags.get(EXPIRES_TAG), now):
                run_key = tags.get(RUN, instance["InstanceId"])
                found.append(_tagged("builder_instance", instance["InstanceId"], tags, run_key))
    return found


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
        if marker.get("run_key") == posixpath.basename(directory) and _expired(marker.get("expires_at"), now):
            dag_run = (str(marker.get("dag_id", "")), str(marker.get("run_id", "")))
            found.append(Expired("run_dir", directory, marker["run_key"], marker["expires_at"], *dag_run))
    return found


def published_amis(aws_conn_id: str) -> set[str]:
    """The AMIs that SSM ``/dtp/amis/*`` points runs at: never reaped, whatever their expiry."""
    ssm = SsmHook(aws_conn_id=aws_conn_id).conn
    pages = ssm.get_paginator("get_parameters_by_path").paginate(Path=AMI_PARAMETER_PATH, Recursive=True)
    return {parameter["Value"] for page in pages for parameter in page["Parameters"]}


def reap(
    found: list[Expired],
    aws_conn_id: str,
    slurm_conn_id: str | None,
    dry_run: bool,
    unsearched: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Delete what ``find_expired_in_aws``, ``find_expired_on_cluster(slurm_conn_id)`` or
    ``find_expired_on_worker_mount`` (``slurm_conn_id`` None) found, run by run; return what was (or would be)
    deleted. ``unsearched``, the kinds the search could not look for (kind: the error), fails it once the rest is
    deleted (or listed), as a resource that could not be deleted does."""
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

    def of_kind(kind: str) -> list[Expired]:
        return [i for i in found if i.kind == kind]

    def delete_cluster(cluster: Expired) -> None:
        HyperPodHook(aws_conn_id=aws_conn_id).delete_cluster_and_wait(cluster.name)

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
    ec2 = RunResourceSweeper(aws_conn_id=aws_conn_id)  # its client is made at first use: a cluster sweep makes none
    attempt(of_kind("builder_instance"), lambda instance: ec2.conn.terminate_instances(InstanceIds=[instance.name]))
    # Clusters' nodes sit in their run's subnets: they go, and are waited on, before the network.
    attempt(of_kind("hyperpod_cluster"), delete_cluster)
    attempt(of_kind("parallelcluster"), delete_parallelcluster)
    attempt(of_kind("batch"), delete_batch)
    attempt(of_kind("ami"), lambda image: PackerHook(aws_conn_id=aws_conn_id).deregister_image(image.name))
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


def _unsearched_report(unsearched: Mapping[str, str]) -> str:
    return "could not look for the expired resources of kind:\n" + "\n".join(
        f"{kind}: {why}" for kind, why in sorted(unsearched.items())
    )
