"""ami_bake's task graph: each family bakes and publishes in a task group of its own (mapped over the families), so
one family's failed bake leaves the others published and still fails the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.definitions.taskgroup import MappedTaskGroup

from dtp.images import ami
from dtp.pipeline import ami_bake

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def dag():
    return DagBag(dag_folder=str(DAGS_DIR / "ami_bake.py")).dags["ami_bake"]


def test_each_familys_publish_waits_on_its_own_bake_only(dag) -> None:
    bake, publish = dag.get_task("family.bake"), dag.get_task("family.publish")
    assert bake.task_group.group_id == publish.task_group.group_id == "family"
    assert isinstance(bake.task_group, MappedTaskGroup)  # one group instance per family: publish[i] follows bake[i]
    assert publish.upstream_task_ids == {"family.bake"}
    assert bake.upstream_task_ids == {"validate_params"}
    assert (bake.tags_variable, bake.builder_expiry_hours) == ("image_tags", ami.BUILDER_EXPIRY_HOURS)


PROBE = """
import json
from datetime import datetime, timezone

import boto3
from airflow.sdk import DAG
from moto import mock_aws

from dtp.pipeline.ami_bake import ami_bake_pipeline

with DAG("ami_bake_probe", schedule=None, start_date=datetime(2026, 1, 1)) as dag:
    ami_bake_pipeline()

if __name__ == "__main__":
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models import TaskInstance
    from airflow.models.dagbundle import DagBundleModel
    from airflow.utils.session import create_session

    from dtp.form_params import parse_params
    from dtp.hooks.ami import AmiHook
    from dtp.images import ami
    from dtp.operators.packer import PackerBuildOperator

    with create_session() as session:
        session.add(DagBundleModel(name="dags-folder"))
    sync_bag_to_db(DagBag(dag_folder=__file__), "dags-folder", None)

    with mock_aws():
        # pcluster-cpu's and pcluster-gpu's AMIs exist (found again, no packer); eks-gpu's needs packer, which fails.
        ec2 = boto3.client("ec2", region_name="us-east-1")
        baked_before = parse_params(ami.AmiBakeParams, {"families": ["pcluster-cpu", "pcluster-gpu"]})
        for request in ami.bake_requests(baked_before, {}):
            bake = PackerBuildOperator(task_id="bake", **ami.COMMON_BAKE_ARGUMENTS, **request)
            ec2.register_image(Name=bake.ami_name(AmiHook()))
        run = dag.test(
            run_after=datetime(2026, 1, 1, tzinfo=timezone.utc),
            run_conf={"families": ["eks-gpu", "pcluster-cpu", "pcluster-gpu"]},
        )
        published = ami.published_amis(boto3.client("ssm", region_name="us-east-1"))

    with create_session() as session:
        states = {
            f"{ti.task_id}[{ti.rendered_map_index or ti.map_index}]": ti.state
            for ti in session.query(TaskInstance).filter_by(run_id=run.run_id)
        }
    print("PROBE", json.dumps({"run": run.state, "tasks": states, "published": sorted(published)}))
"""


def test_a_familys_failed_bake_leaves_the_others_published_and_fails_the_run(tmp_path) -> None:
    # A real run (dag.test, over a fresh database) in moto's AWS, with a packer that cannot bake.
    packer = tmp_path / "bin" / "packer"
    packer.parent.mkdir()
    packer.write_text('#!/bin/sh\necho "this packer cannot bake" >&2\nexit 1\n')
    packer.chmod(0o755)
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    env["PYTHONPATH"] = str(Path(ami_bake.__file__).parents[2])  # the plugins folder
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{tmp_path}/airflow.db"
    env["AIRFLOW__CORE__DEFAULT_TASK_RETRIES"] = "0"
    env["PATH"] = f"{packer.parent}{os.pathsep}{env['PATH']}"
    env["AIRFLOW_VAR_DTP_INSTALLATION_ID"] = "0a1b2c3d"
    conn = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": {"region_name": "us-east-1"}}
    env["AIRFLOW_CONN_AWS_DEFAULT"] = json.dumps(conn)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    (tmp_path / "ami_bake_probe.py").write_text(PROBE)
    probe = subprocess.run(
        [sys.executable, str(tmp_path / "ami_bake_probe.py")], env=env, capture_output=True, text=True, timeout=500
    )
    assert probe.returncode == 0, probe.stderr[-4000:]
    [line] = [line for line in probe.stdout.splitlines() if line.startswith("PROBE ")]
    found = json.loads(line.removeprefix("PROBE "))
    assert found["tasks"] == {
        "validate_params[-1]": "success",
        "family.bake[eks-gpu]": "failed",
        "family.publish[0]": "upstream_failed",  # never ran: its map index was not rendered
        "family.bake[pcluster-cpu]": "success",
        "family.publish[pcluster-cpu]": "success",
        "family.bake[pcluster-gpu]": "success",
        "family.publish[pcluster-gpu]": "success",
    }
    assert found["published"] == ["pcluster-cpu", "pcluster-gpu"]
    assert found["run"] == "failed"  # the run still says a family failed
