"""Gang scheduling of the run's PyTorchJobs (``gang_scheduler``): the jobs ask the training operator for a PodGroup
of all their pods and name its scheduler, pass the operator's checks, are refused where the jobs are not
PyTorchJobs, and a job that did not start says the gang scheduler was waiting for all its pods."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from pytorchjob_support import NAME, NAMESPACE, operator

from dtp.form import airflow_params
from dtp.form_params import ParamsError, parse_params
from dtp.hooks.pytorchjob import gang_wait
from dtp.naming import RunNames
from dtp.operators.pytorchjob import PyTorchJobFailed
from dtp.params import TrainParams, validate_params
from dtp.pipeline.spec import build_spec, run_spec
from dtp.platforms.base import PREFLIGHT_DEADLINE_S
from dtp.platforms.containers import image_runtime
from dtp.platforms.eks import PyTorchJobSettings, render_pytorchjobs
from dtp.platforms.pytorchjob_manifest import manifest_problems

NAMES = RunNames("train_e2e", "manual__1")
EKS_RUN = {"platform": "eks", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "budget_usd": 2000.0}


def jobs(**conf: Any) -> dict[str, dict[str, Any]]:
    """The run's preflight and training PyTorchJobs on 4 nodes, as mappings by file name."""
    params = parse_params(TrainParams, {**EKS_RUN, "num_nodes": 4, **conf})
    spec = run_spec(params, "train_e2e", "manual__2026-12-02")
    selector = {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    documents = render_pytorchjobs(spec, image_runtime("dtp/training:latest"), PyTorchJobSettings(), selector)
    assert [problem for text in documents.values() for problem in manifest_problems(text)] == []
    return {name: yaml.safe_load(text) for name, text in documents.items()}


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    return dict(job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"])


def test_by_default_the_default_scheduler_places_the_pods_one_by_one() -> None:
    for job in jobs().values():
        assert "schedulingPolicy" not in job["spec"]["runPolicy"]
        assert "schedulerName" not in pod_spec(job)


@pytest.mark.parametrize(
    ("gang_scheduler", "scheduler_name", "policy"),
    [
        # No scheduleTimeoutSeconds: the pods scheduler-plugins placed would hold their nodes as long (the scheduler's
        # own short wait instead); the pending timeout fails the job as a whole.
        ("volcano", "volcano", {"minAvailable": 4}),
        ("scheduler-plugins", "scheduler-plugins-scheduler", {"minAvailable": 4}),
    ],
)
def test_a_gang_scheduler_places_all_of_each_jobs_pods_at_once(
    gang_scheduler: str, scheduler_name: str, policy: dict[str, int]
) -> None:
    for job in jobs(gang_scheduler=gang_scheduler, pending_timeout_minutes=90).values():
        assert job["spec"]["runPolicy"]["schedulingPolicy"] == policy
        assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 4
        assert pod_spec(job)["schedulerName"] == scheduler_name


def test_a_spec_from_before_the_parameter_renders_without_gang_scheduling() -> None:
    spec = run_spec(parse_params(TrainParams, {**EKS_RUN, "num_nodes": 4}), "train_e2e", "manual__2026-12-02")
    del spec["params"]["gang_scheduler"]
    documents = render_pytorchjobs(spec, image_runtime("dtp/training:latest"), PyTorchJobSettings(), {})
    assert "schedulingPolicy" not in yaml.safe_load(documents["pytorchjob.yaml"])["spec"]["runPolicy"]


@pytest.mark.parametrize(("replicas", "problems"), [(4, []), (3, ["minAvailable: 4 is more than the job's 3 pods"])])
def test_check_refuses_a_gang_larger_than_the_job(replicas: int, problems: list[str]) -> None:
    job = jobs(gang_scheduler="volcano")["pytorchjob.yaml"]
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = replicas
    assert [p.removeprefix("spec.runPolicy.schedulingPolicy.") for p in manifest_problems(yaml.safe_dump(job))] == (
        problems
    )


def test_check_counts_the_master_and_a_replica_spec_without_replicas_as_one_pod_each() -> None:
    job = jobs(gang_scheduler="volcano")["pytorchjob.yaml"]
    job["spec"].pop("elasticPolicy")
    replica_specs = job["spec"]["pytorchReplicaSpecs"]
    replica_specs["Master"] = {**replica_specs["Worker"], "replicas": 1}
    del replica_specs["Worker"]["replicas"]
    job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] = 2
    assert manifest_problems(yaml.safe_dump(job)) == []
    job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] = 3
    assert manifest_problems(yaml.safe_dump(job)) == [
        "spec.runPolicy.schedulingPolicy.minAvailable: 3 is more than the job's 2 pods"
    ]


def test_the_form_offers_the_gang_schedulers_with_none_by_default() -> None:
    param = airflow_params()["gang_scheduler"]
    assert param.schema["enum"] == ["none", "volcano", "scheduler-plugins"] and param.value == "none"
    with pytest.raises(ParamsError, match="gang_scheduler: got 'kueue'; Input should be 'none', 'volcano'"):
        parse_params(TrainParams, {"gang_scheduler": "kueue"})


def test_eks_takes_a_gang_scheduler() -> None:
    assert validate_params({**EKS_RUN, "gang_scheduler": "volcano"}).gang_scheduler == "volcano"


@pytest.mark.parametrize(
    ("platform", "instance_type", "scheduler"),
    [("local", "local.cpu", "Slurm"), ("parallelcluster", "m5.2xlarge", "Slurm"), ("batch", "m5.2xlarge", "AWS Batch")],
)
def test_platforms_that_run_no_pytorchjobs_refuse_a_gang_scheduler(
    platform: str, instance_type: str, scheduler: str
) -> None:
    conf = {"platform": platform, "instance_type": instance_type}
    assert validate_params(conf).platform == platform
    with pytest.raises(ParamsError) as refused:
        validate_params({**conf, "gang_scheduler": "volcano"})
    assert str(refused.value) == (
        f"invalid parameters:\ngang_scheduler: got 'volcano'; platform {platform!r} runs its jobs with {scheduler}, "
        "which starts a job's nodes together anyway: a gang scheduler places the pods of PyTorchJobs (platforms eks "
        "and hyperpod on EKS); give none"
    )


HYPERPOD = {
    "execution_role_arn": "arn:aws:iam::111122223333:role/dtp-hyperpod-execution",
    "lifecycle_bucket": "sagemaker-dtp-lifecycle",
}
ON_EKS = {
    "base_config_uri": "s3://dtp-lifecycle/eks-base-config/",
    "eks": {"cluster_arn": "arn:aws:eks:us-east-1:111122223333:cluster/dtp-training"},
}
NETWORK = {"SecurityGroup": "sg-0123456789abcdef0", "PrivateSubnet": "subnet-0123456789abcdef0"}


@pytest.mark.parametrize(("extra", "refused"), [({}, True), (ON_EKS, False)])
def test_hyperpod_takes_a_gang_scheduler_only_with_an_eks_orchestrator(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], refused: bool
) -> None:
    conn = {"conn_type": "generic", "extra": {**HYPERPOD, **extra}}
    monkeypatch.setenv("AIRFLOW_CONN_DTP_HYPERPOD", json.dumps(conn))
    # HyperPod's nodes join the EKS cluster from its VPC: the existing network dtp_network names.
    vpc = {"vpc_id": "vpc-0123456789abcdef0", "private_subnet": NETWORK["PrivateSubnet"]}
    network = {"conn_type": "generic", "extra": {**vpc, "security_group": NETWORK["SecurityGroup"]}}
    monkeypatch.setenv("AIRFLOW_CONN_DTP_NETWORK", json.dumps(network))
    conf = {**EKS_RUN, "platform": "hyperpod", "gang_scheduler": "scheduler-plugins"}
    if not refused:
        assert build_spec({}, conf, NAMES)["params"]["gang_scheduler"] == "scheduler-plugins"
        return
    with pytest.raises(ParamsError, match="gang_scheduler: got 'scheduler-plugins'; platform 'hyperpod' schedules "):
        build_spec({}, conf, NAMES)
    assert build_spec({}, {**conf, "gang_scheduler": "none"}, NAMES)["params"]["gang_scheduler"] == "none"


def test_only_a_gang_scheduled_job_waits_for_all_its_pods() -> None:
    assert gang_wait(jobs()["pytorchjob.yaml"]) == ""
    assert gang_wait(jobs(gang_scheduler="volcano")["pytorchjob.yaml"]) == (
        "the gang scheduler volcano is waiting until all 4 pods fit at once"
    )


def not_started(message: str) -> dict[str, Any]:
    return {"status": "not_started", "job_name": NAME, "namespace": NAMESPACE, "state": "Created",
            "message": message, "tail": [], "pods": [f"{NAME}-worker-0: Pending"]}  # fmt: skip


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (
            "not Running within 5400 s, still Created",
            "not Running within 5400 s, still Created; the gang scheduler scheduler-plugins-scheduler is waiting "
            "until all 4 pods fit at once",
        ),
        # Its pods were placed: a container of theirs cannot start.
        ("a container cannot start (ImagePullBackOff)", "a container cannot start (ImagePullBackOff)"),
    ],
)
def test_a_gang_scheduled_job_not_running_in_time_says_the_gang_scheduler_waits(
    monkeypatch: pytest.MonkeyPatch, message: str, why: str
) -> None:
    op = operator(jobs(gang_scheduler="scheduler-plugins")["pytorchjob.yaml"])
    monkeypatch.setattr(op, "_suspend", lambda name: "suspended it")
    with pytest.raises(PyTorchJobFailed) as failure:
        op.execute_complete({}, not_started(message))
    assert str(failure.value) == (
        f"PyTorchJob {NAMESPACE}/{NAME} did not start ({why}); suspended it. Its pods:\n  {NAME}-worker-0: Pending"
    )


def test_a_gang_scheduled_job_may_wait_its_pending_timeout_besides_its_deadline() -> None:
    # The operator counts activeDeadlineSeconds from the job's start, while a gang scheduler holds all its pods back.
    default = {name: job["spec"]["runPolicy"]["activeDeadlineSeconds"] for name, job in jobs().items()}
    gang = jobs(gang_scheduler="volcano", pending_timeout_minutes=60)
    assert {name: job["spec"]["runPolicy"]["activeDeadlineSeconds"] for name, job in gang.items()} == {
        name: seconds + 3600 for name, seconds in default.items()
    }
    assert default["preflight.yaml"] == PREFLIGHT_DEADLINE_S
