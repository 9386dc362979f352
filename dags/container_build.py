"""container_build: build a training image, push it, publish it for training runs.

Builds images/containers/<image>/Dockerfile (context include/training/, so the
image carries DTP's training programs) with Docker, or buildah where no Docker
daemon runs, and pushes it to the ``container_registry`` connection's registry
(ECR on AWS, with credentials from the amazon provider's EcrHook; a loopback
registry locally). The tag is a fingerprint of Dockerfile, context and build
args: a rerun with the same inputs reuses the image, a changed build arg or
training program builds a new one. The image is tagged
``published-<platform>`` (kept by the ECR lifecycle policy), and its
digest-pinned reference goes to ``/dtp/images/<platform>/<image>`` in SSM
(``local-cpu``'s to ``.../training``), where train_e2e picks up the newest, and
to an Asset event.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from dtp.form import airflow_params
from dtp.images.container import ContainerBuildParams
from dtp.pipeline.container_build import container_build_pipeline

with DAG(
    dag_id="container_build",
    description="Build and push a training container image; publish it to SSM and as an Asset",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=airflow_params(model=ContainerBuildParams),
    tags=["dtp", "images"],
    default_args={"owner": "dtp", "retries": 1, "retry_delay": timedelta(seconds=10)},
):
    container_build_pipeline()
