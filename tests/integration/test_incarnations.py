"""A run cleared whole while it ran: the clear gave it new names, so deploy_cluster first deletes what its earlier
incarnation ran under the old ones (a Slurm job), and its teardowns delete what that incarnation made (a Slurm job, the
network stack and bucket), which nothing else tore down."""

from __future__ import annotations

import uuid

import pytest

from dtp.form_params import parse_params
from dtp.hooks.slurm import SlurmHook
from dtp.operators.cluster import DeployClusterOperator, TeardownClusterOperator
from dtp.params import TrainParams
from dtp.pipeline import network
from dtp.pipeline.graph import teardown_network
from dtp.pipeline.spec import run_spec

pytestmark = pytest.mark.stack
AWS = "aws_default"


def _spec_of_a_cleared_run() -> dict:
    return run_spec(parse_params(TrainParams, {}), "it_incarnation", f"manual__{uuid.uuid4().hex}", incarnation=1)


def test_deploy_cluster_cancels_the_earlier_incarnations_jobs_before_it_provisions(workdir, cancel_after) -> None:
    spec = _spec_of_a_cleared_run()
    (earlier,) = spec["earlier_names"]
    script = workdir / "job.sh"
    script.write_text("#!/bin/bash\nsleep 300\n")
    name = cancel_after(earlier["slurm_job"])
    SlurmHook().submit(str(script), job_name=name, output=str(workdir / "%j.out"))

    cluster = DeployClusterOperator(task_id="deploy_cluster", spec=spec, network={}).execute(context={})
    assert cluster["platform"] == "local"
    assert SlurmHook().find_jobs(name) == []  # its nodes are free for the new incarnation's jobs


def test_the_teardowns_delete_what_the_runs_earlier_incarnation_left(aws, workdir, cancel_after) -> None:
    spec = _spec_of_a_cleared_run()
    (earlier,) = spec["earlier_names"]
    assert earlier["run_key"] != spec["names"]["run_key"]
    network.create_network_stack({**spec, "names": earlier}, AWS)
    script = workdir / "job.sh"
    script.write_text("#!/bin/bash\nsleep 300\n")
    name = cancel_after(earlier["slurm_job"])
    job_id = SlurmHook().submit(str(script), job_name=name, output=str(workdir / "%j.out"))

    cluster = TeardownClusterOperator(task_id="teardown_cluster", spec=spec).execute(context={})
    assert cluster == {"cancelled_jobs": [], "earlier_incarnations": {earlier["run_key"]: {"cancelled_jobs": [job_id]}}}
    assert SlurmHook().find_jobs(name) == []

    net = teardown_network.function(spec)
    retired = net["earlier_incarnations"][earlier["run_key"]]
    assert retired["stack_status"] == {earlier["network_stack"]: "DELETE_COMPLETE"}
    live = [s for s in aws("cloudformation").list_stacks()["StackSummaries"] if s["StackStatus"] != "DELETE_COMPLETE"]
    assert earlier["network_stack"] not in {s["StackName"] for s in live}
    assert earlier["data_bucket"] not in {b["Name"] for b in aws("s3").list_buckets()["Buckets"]}
