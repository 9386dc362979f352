"""ami_bake: bake DTP's AMIs with Packer + Ansible and publish them.

One Packer build, then its publish, per AMI family chosen in the form (the task
group ``family``, mapped: one family's failed bake leaves the others published
and fails the run), for ParallelCluster GPU, CPU and Trainium nodes and EKS GPU
workers (images/packer/). An AMI's name is a fingerprint of the template,
playbooks, roles and versions: a rerun with the same inputs reuses it, a changed
version bakes a new one. Each AMI id goes to the SSM parameter
``/dtp/amis/<family>`` (where train_e2e reads it) and to an event of the Asset
``dtp-ami://<family>``. Weekly, to pick up source-AMI and security updates for
the default family and every family published before, each with the versions
its published AMI was baked with; trigger it by hand to change versions.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from dtp.form import airflow_params
from dtp.images.ami import AmiBakeParams
from dtp.pipeline.ami_bake import ami_bake_pipeline

with DAG(
    dag_id="ami_bake",
    description="Bake the training AMIs with Packer + Ansible; publish to SSM and as Assets",
    doc_md=__doc__,
    schedule="0 4 * * 0",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=airflow_params(model=AmiBakeParams),
    tags=["dtp", "images"],
    default_args={"owner": "dtp", "retries": 1, "retry_delay": timedelta(seconds=30)},
):
    ami_bake_pipeline()
