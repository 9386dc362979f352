"""reaper: delete what DTP runs left behind past their expiry.

Every resource a run creates carries a ``dtp:expires-at`` tag (Slurm jobs carry
it in their comment, run directories on the shared filesystem in their
``run.json``). Hourly, this DAG finds those past expiry (CloudFormation stacks,
VPC pieces, S3 buckets, HyperPod and ParallelCluster clusters, Batch compute environments, baked
AMIs and their snapshots, packer builder instances, Slurm jobs, run
directories) and deletes them in dependency order, the AWS account and each
cluster in its own find/delete pair (``slurm_default``, the Slurm clusters the
ParallelCluster and HyperPod connections name, and the shared filesystem the
training worker mounts, where EKS and Batch runs write); an AMI that SSM
``/dtp/amis/*`` still publishes is kept. Trigger it with ``dry_run`` to see what it would delete.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param, task, task_group

AWS_CONN_ID = "aws_default"
SLURM_CONN_ID = "slurm_default"
TRAINING_QUEUE = "training"  # dtp.pipeline.graph.TRAINING_QUEUE, not imported: this file parses in milliseconds


@task
def find_expired_in_aws() -> list[dict[str, str]]:
    from dataclasses import asdict

    from dtp.reaper import find_expired_in_aws

    return [asdict(item) for item in find_expired_in_aws(AWS_CONN_ID)]


@task
def swept_clusters() -> list[str | None]:
    from dtp.reaper import swept_clusters

    return swept_clusters(SLURM_CONN_ID)


# On the training queue: its workers reach the clusters' shared filesystems, by a local mount or over SSH.
@task(queue=TRAINING_QUEUE, map_index_template="{{ swept }}")
def find_expired_on_cluster(slurm_conn_id: str | None) -> list[dict[str, str]]:
    from dataclasses import asdict

    from airflow.sdk import get_current_context

    from dtp.reaper import find_expired_on_cluster

    get_current_context()["swept"] = slurm_conn_id or "worker's mount"  # the mapped task's name in the UI
    return [asdict(item) for item in find_expired_on_cluster(slurm_conn_id)]


@task
def delete_expired(found: list[dict[str, str]], slurm_conn_id: str | None = None, **context) -> dict:
    from dtp.reaper import Expired, reap

    return reap([Expired(**item) for item in found], AWS_CONN_ID, slurm_conn_id, dry_run=context["params"]["dry_run"])


@task_group
def sweep_cluster(slurm_conn_id: str | None) -> None:
    """One cluster's expired Slurm jobs and run directories (None: the filesystem mounted on the worker)."""
    found = find_expired_on_cluster(slurm_conn_id)
    delete_expired.override(task_id="delete_expired", queue=TRAINING_QUEUE)(found, slurm_conn_id)


with DAG(
    dag_id="reaper",
    description="Delete DTP resources past their dtp:expires-at tag",
    doc_md=__doc__,
    schedule="@hourly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={
        "dry_run": Param(
            False, type="boolean", title="Dry run", description="List what would be deleted, delete nothing."
        ),
    },
    tags=["dtp", "reliability"],
    default_args={"owner": "dtp", "retries": 2, "retry_delay": timedelta(minutes=1)},
):
    # Sweeps failing each on its own: an AWS API or a cluster that cannot be asked holds up only its own.
    delete_expired.override(task_id="delete_expired_in_aws")(find_expired_in_aws())
    sweep_cluster.expand(slurm_conn_id=swept_clusters())
