"""reaper: delete what DTP runs left behind past their expiry.

Every resource a run creates carries a ``dtp:expires-at`` tag (Slurm jobs carry
it in their comment, PyTorchJobs in a ``dtp.dev/expires-at`` annotation, run
directories on the shared filesystem in their ``run.json``, and the directories
runs share there, dataset mirrors and unpacked images, in a lease of each run
that used them). Hourly, this DAG finds those past expiry (CloudFormation stacks,
VPC pieces, S3 buckets, HyperPod and ParallelCluster clusters, Batch compute
environments, baked AMIs and their snapshots, packer builder instances,
PyTorchJobs on the EKS clusters of ``dtp_eks`` and HyperPod on EKS, Slurm jobs,
run directories, and the shared directories whose every lease has expired) and
deletes them in dependency order, each in its own find/delete pair: the AWS
account, the EKS clusters, the ``slurm_default`` cluster, then the shared
filesystem the training worker mounts (where EKS and Batch runs keep their run
directories). It also deletes the runs' groups on the Pushgateway of the
``prometheus_pushgateway`` connection a week after their last push (Prometheus
keeps their numbers), so the gateway does not serve every run ever, in a pair
of its own. An AMI that SSM ``/dtp/amis/*`` still publishes is kept, and so is
everything of a DAG run still queued or running here (a task cleared after its
run's expiry recreates what it needs with that expiry), and for a day past its
expiry what another Airflow installation's run made in the account
(``dtp:installation``): this one cannot ask that installation whether the run
still goes. A kind of AWS resource, an EKS cluster, or the Pushgateway, that
cannot be looked for fails its pair once the others are deleted. Trigger it with ``dry_run`` to see
what it would delete.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Param, TriggerRule, task

from dtp.connections import AWS_CONN_ID, TRAINING_QUEUE

SLURM_CONN_ID = "slurm_default"


# Each finder is given run_is_active, which asks this Airflow for a run's state: a run still queued or running keeps
# its resources, expired or not.
@task(multiple_outputs=True)
def find_expired_in_aws() -> dict[str, Any]:
    from dataclasses import asdict

    from dtp.naming import installation_id
    from dtp.reaper.active_runs import run_is_active
    from dtp.reaper.aws import find_expired_in_aws

    findings = find_expired_in_aws(AWS_CONN_ID, active=run_is_active, installation=installation_id())
    return {"found": [asdict(item) for item in findings.found], "unsearched": findings.unsearched}


@task(multiple_outputs=True)
def find_expired_on_eks() -> dict[str, Any]:
    from dataclasses import asdict

    from dtp.naming import installation_id
    from dtp.reaper.active_runs import run_is_active
    from dtp.reaper.pytorchjobs import find_expired_pytorchjobs

    findings = find_expired_pytorchjobs(AWS_CONN_ID, active=run_is_active, installation=installation_id())
    return {"found": [asdict(item) for item in findings.found], "unsearched": findings.unsearched}


# Not given run_is_active: a run's group on the Pushgateway is a copy of numbers Prometheus keeps, used by no run.
@task(multiple_outputs=True)
def find_expired_on_pushgateway() -> dict[str, Any]:
    from dataclasses import asdict

    from dtp.reaper.pushgateway import find_expired_pushgateway_groups

    findings = find_expired_pushgateway_groups()
    return {"found": [asdict(item) for item in findings.found], "unsearched": findings.unsearched}


# The cluster sweeps run on the training queue: its workers reach the shared filesystems, by a mount or over SSH.
@task(queue=TRAINING_QUEUE)
def find_expired_on_cluster() -> list[dict[str, str]]:
    from dataclasses import asdict

    from dtp.naming import installation_id
    from dtp.reaper.active_runs import run_is_active
    from dtp.reaper.cluster import find_expired_on_cluster

    found = find_expired_on_cluster(SLURM_CONN_ID, active=run_is_active, installation=installation_id())
    return [asdict(item) for item in found]


# After the cluster's sweep, which cancels expired jobs before their run directories go (the mount may be the same
# filesystem); also when that sweep failed: the mount is another concern.
@task(queue=TRAINING_QUEUE, trigger_rule=TriggerRule.ALL_DONE)
def find_expired_on_worker_mount() -> list[dict[str, str]]:
    from dataclasses import asdict

    from dtp.naming import installation_id
    from dtp.reaper.active_runs import run_is_active
    from dtp.reaper.cluster import find_expired_on_worker_mount

    found = find_expired_on_worker_mount(SLURM_CONN_ID, active=run_is_active, installation=installation_id())
    return [asdict(item) for item in found]


@task
def delete_expired(
    found: list[dict[str, str]], slurm_conn_id: str | None = None, unsearched: dict[str, str] | None = None, **context
) -> dict:
    from dtp.reaper.deletion import reap
    from dtp.reaper.expired import Expired

    items = [Expired(**item) for item in found]
    return reap(items, AWS_CONN_ID, slurm_conn_id, dry_run=context["params"]["dry_run"], unsearched=unsearched)


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
    # Sweeps failing each on its own: an AWS API, an EKS API server or a cluster that cannot be asked holds up only
    # its own.
    # A kind of AWS resource that cannot be looked for still lets the others be deleted, then fails the deletion.
    in_aws = find_expired_in_aws()
    delete_expired.override(task_id="delete_expired_in_aws")(in_aws["found"], unsearched=in_aws["unsearched"])
    on_eks = find_expired_on_eks()
    delete_expired.override(task_id="delete_expired_on_eks")(on_eks["found"], unsearched=on_eks["unsearched"])
    on_gateway = find_expired_on_pushgateway()
    delete_expired.override(task_id="delete_expired_on_pushgateway")(
        on_gateway["found"], unsearched=on_gateway["unsearched"]
    )
    on_cluster = delete_expired.override(task_id="delete_expired_on_cluster", queue=TRAINING_QUEUE)(
        find_expired_on_cluster(), SLURM_CONN_ID
    )
    on_mount = find_expired_on_worker_mount()
    on_cluster >> on_mount
    delete_expired.override(task_id="delete_expired_on_worker_mount", queue=TRAINING_QUEUE)(on_mount)
