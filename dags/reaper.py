"""reaper: delete what DTP runs left behind past their expiry.

Every resource a run creates carries a ``dtp:expires-at`` tag (Slurm jobs carry
it in their comment, run directories on the shared filesystem in their
``run.json``). Hourly, this DAG finds those past expiry (CloudFormation stacks,
VPC pieces, S3 buckets, HyperPod and ParallelCluster clusters, Batch compute environments, baked
AMIs and their snapshots, packer builder instances, Slurm jobs, run
directories) and deletes them in dependency order, the AWS account and the
Slurm cluster each in its own find/delete pair; an AMI that SSM
``/dtp/amis/*`` still publishes is kept. Trigger it with ``dry_run`` to see what it would delete.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param, task

AWS_CONN_ID = "aws_default"
SLURM_CONN_ID = "slurm_default"


@task
def find_expired_in_aws() -> list[dict[str, str]]:
    from dataclasses import asdict

    from dtp.reaper import find_expired_in_aws

    return [asdict(item) for item in find_expired_in_aws(AWS_CONN_ID)]


@task
def find_expired_on_cluster() -> list[dict[str, str]]:
    from dataclasses import asdict

    from dtp.reaper import find_expired_on_cluster

    return [asdict(item) for item in find_expired_on_cluster(SLURM_CONN_ID)]


@task
def delete_expired(found: list[dict[str, str]], **context) -> dict:
    from dtp.reaper import Expired, reap

    return reap([Expired(**item) for item in found], AWS_CONN_ID, SLURM_CONN_ID, dry_run=context["params"]["dry_run"])


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
    # Two sweeps, each failing on its own: an AWS API or a Slurm cluster that cannot be asked holds up only its own.
    delete_expired.override(task_id="delete_expired_in_aws")(find_expired_in_aws())
    delete_expired.override(task_id="delete_expired_on_cluster")(find_expired_on_cluster())
