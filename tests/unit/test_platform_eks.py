"""dtp.platforms.eks: the run's PyTorchJob renders for the shipped recipes and instance types and passes the
training operator's CRD schema and webhook rules; check catches real violations; the dtp_eks connection, the EKS
API (moto's, in this process; botocore's Stubber where moto cannot answer: a cluster not yet ACTIVE, or one whose
endpoint is the local Kubernetes API) and the Kubernetes API (a local HTTP server speaking its protocol) are used as
on AWS."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.stub import Stubber

from dtp.form_params import parse_params
from dtp.hooks.pytorchjob import PyTorchJobHook, deadline_seconds
from dtp.params import TrainParams
from dtp.pipeline import jobs
from dtp.pipeline.spec import run_spec
from dtp.platforms import get_platform
from dtp.platforms.base import PlatformNotReady
from dtp.platforms.eks import EksPlatform
from dtp.recipes import instance_types

CLUSTER = "dtp-training"
RUN_ID = "manual__2026-12-02"


@pytest.fixture(autouse=True)
def account(monkeypatch: pytest.MonkeyPatch, offline_aws: None) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_DTP_EKS", json.dumps({"conn_type": "generic", "extra": {"cluster_name": CLUSTER}}))


def spec_for(recipe: str, instance_type: str, num_nodes: int, **conf: Any) -> dict[str, Any]:
    params = {"platform": "eks", "recipe": recipe, "instance_type": instance_type, "num_nodes": num_nodes, **conf}
    return run_spec(parse_params(TrainParams, params), "train_e2e", RUN_ID)


def rendered(spec: dict[str, Any], **runtime: str) -> tuple[str, dict[str, Any]]:
    text = EksPlatform().render(spec, {}, runtime or None)["pytorchjob.yaml"]
    return text, yaml.safe_load(text)


def worker(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]


def container(job: dict[str, Any]) -> dict[str, Any]:
    return worker(job)["template"]["spec"]["containers"][0]


def test_registered_as_the_eks_platform() -> None:
    platform = get_platform("eks")
    assert (platform.name, platform.scheduler) == ("eks", "kubernetes")
    families = {
        name: platform.ami_family(instance_types()[name].model_dump()) for name in ("p5.48xlarge", "trn1.32xlarge")
    }
    assert families == {"p5.48xlarge": "eks-gpu", "trn1.32xlarge": None}  # DTP bakes no EKS Neuron AMI


@pytest.mark.parametrize(
    ("recipe", "instance_type", "nodes", "devices"),
    [
        ("llama3_1_8b", "p5.48xlarge", 4, {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 32}),
        ("llama3_1_70b", "p5e.48xlarge", 16, {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 32}),
        ("llama3_2_1b", "p4de.24xlarge", 2, {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 4}),
        ("mixtral_8x7b", "p4d.24xlarge", 8, {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 4}),
        ("tiny", "g5.48xlarge", 1, {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 1}),
        ("llama3_2_1b", "trn1.32xlarge", 2, {"aws.amazon.com/neuron": 16, "vpc.amazonaws.com/efa": 8}),
        ("llama3_2_1b", "trn2.48xlarge", 2, {"aws.amazon.com/neuron": 16, "vpc.amazonaws.com/efa": 16}),
    ],
)
def test_job_for_each_instance_type_passes_the_crd(
    recipe: str, instance_type: str, nodes: int, devices: dict[str, int]
) -> None:
    spec = spec_for(recipe, instance_type, nodes)
    text, job = rendered(spec)
    assert EksPlatform().check({"pytorchjob.yaml": text}) == []
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["metadata"]["name"] == spec["names"]["run_key"]
    assert job["metadata"]["namespace"] == "kubeflow"
    assert job["spec"]["nprocPerNode"] == str(spec["instance"]["accelerators_per_node"])
    elastic = job["spec"]["elasticPolicy"]
    assert (elastic["rdzvBackend"], elastic["minReplicas"], elastic["maxReplicas"]) == ("c10d", nodes, nodes)
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
    assert (worker(job)["replicas"], worker(job)["restartPolicy"]) == (nodes, "OnFailure")
    pod = worker(job)["template"]["spec"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": instance_type}
    assert container(job)["resources"] == {"requests": devices, "limits": devices}
    assert {t["key"] for t in pod["tolerations"]} == set(devices) - {"vpc.amazonaws.com/efa"}
    assert {v["name"] for v in pod["volumes"]} == {"fsx", "shm"}
    assert {"name": "fsx", "persistentVolumeClaim": {"claimName": "fsx-claim"}} in pod["volumes"]
    assert {"name": "shm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {(m["name"], m["mountPath"]) for m in container(job)["volumeMounts"]} == {
        ("fsx", "/fsx"),
        ("shm", "/dev/shm"),
    }
    env = {e["name"]: e["value"] for e in container(job)["env"]}
    assert env["FI_PROVIDER"] == "efa"
    assert ("NCCL_SOCKET_IFNAME" in env) == ("nvidia.com/gpu" in devices)


def test_command_runs_the_trainer_with_the_runs_config_from_the_image() -> None:
    spec = spec_for("llama3_1_8b", "p5.48xlarge", 2, extra_env={"NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "4"})
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/dtp/training@sha256:" + "a" * 64
    _, job = rendered(spec, **EksPlatform().runtime(image, spec))
    run_key = spec["names"]["run_key"]
    assert container(job)["image"] == image
    assert container(job)["imagePullPolicy"] == "IfNotPresent"
    assert container(job)["command"] == [
        "torchrun",
        "/opt/dtp/training/train.py",
        "--config",
        f"/fsx/runs/{run_key}/train.json",
    ]
    env = [e["name"] for e in container(job)["env"]]
    assert len(env) == len(set(env))  # extra_env overrides a default instead of repeating it
    assert {"name": "NCCL_DEBUG", "value": "INFO"} in container(job)["env"]
    assert {"name": "OMP_NUM_THREADS", "value": "4"} in container(job)["env"]
    # Restarts and the budget's time limit, as on Slurm; pods still running when the job ends free their nodes.
    assert job["spec"]["runPolicy"] == {
        "backoffLimit": 3,
        "cleanPodPolicy": "Running",
        "activeDeadlineSeconds": spec["training_time_limit_minutes"] * 60,
    }


def test_a_retrys_job_is_the_rendered_one_with_what_is_left_of_its_deadline(kubernetes_api: Any) -> None:
    """EksPyTorchJobOperator creates a failed job afresh with only what is left of its deadline: the job it sends
    is still one the training operator's CRD takes."""
    spec = spec_for("llama3_1_8b", "p5.48xlarge", 2, budget_usd=1000.0)
    _, job = rendered(spec)
    assert deadline_seconds(job) == spec["training_time_limit_minutes"] * 60 > 600
    hook = PyTorchJobHook(CLUSTER, "kubeflow")
    with Stubber(hook.eks_hook.conn) as eks:
        eks.add_response("describe_cluster", describe_cluster("ACTIVE", kubernetes_api.endpoint), {"name": CLUSTER})
        with hook.kubernetes() as kubernetes:
            hook.ensure_job(kubernetes, job, 600)
    (method, _, _, body), *_ = kubernetes_api.requests
    sent = json.loads(body)
    sent_policy = {"backoffLimit": 3, "cleanPodPolicy": "Running", "activeDeadlineSeconds": 600}
    assert method == "POST" and sent["spec"]["runPolicy"] == sent_policy
    assert {**sent["spec"], "runPolicy": job["spec"]["runPolicy"]} == job["spec"]
    assert EksPlatform().check({"pytorchjob.yaml": yaml.safe_dump(sent)}) == []


def test_default_image_is_the_training_images_base_with_programs_on_fsx() -> None:
    runtime = EksPlatform().default_image()
    assert runtime["image"].startswith("nvcr.io/nvidia/pytorch:") and runtime["image"].endswith("-py3")
    spec = spec_for("tiny", "g5.48xlarge", 1)
    _, job = rendered(spec)
    assert container(job)["image"] == runtime["image"]
    # dtp.pipeline.jobs stages the programs into the run's folder for an image that does not carry them.
    assert container(job)["command"][1] == f"/fsx/runs/{spec['names']['run_key']}/programs/train.py"


def test_the_preflight_job_screens_every_node_with_the_training_image() -> None:
    spec = spec_for("llama3_1_8b", "p5.48xlarge", 2)
    documents = EksPlatform().render(spec, {}, {"image": "registry/dtp@sha256:abc", "training_dir": "/opt/dtp"})
    assert EksPlatform().check(documents) == []
    preflight, training = (yaml.safe_load(documents[name]) for name in ("preflight.yaml", "pytorchjob.yaml"))
    run_dir = f"/fsx/runs/{spec['names']['run_key']}"
    assert preflight["metadata"]["name"] == f"{spec['names']['run_key']}-preflight"
    assert container(preflight)["command"] == [
        *("torchrun", "/opt/dtp/preflight.py", "--results", f"{run_dir}/preflight.json"),
        *("--max-bytes", str(spec["instance"]["busbw_at_bytes"])),
    ]
    # The same nodes, devices, image and labels as training; no retry and a deadline of its own.
    assert worker(preflight)["replicas"] == worker(training)["replicas"] == 2
    assert container(preflight)["resources"] == container(training)["resources"]
    assert container(preflight)["image"] == container(training)["image"] == "registry/dtp@sha256:abc"
    assert preflight["metadata"]["labels"] == training["metadata"]["labels"]
    assert (
        preflight["spec"]["runPolicy"]["backoffLimit"],
        preflight["spec"]["runPolicy"]["activeDeadlineSeconds"],
    ) == (
        0,
        900,
    )


def test_the_pipeline_prepares_both_jobs_on_fsx_for_the_pytorchjob_operator(tmp_path: Path) -> None:
    # The training queue's worker pod mounts the FSx claim where the jobs' pods do; here tmp_path stands for it.
    spec = spec_for("tiny", "g5.48xlarge", 1)
    cluster = {"platform": "eks", "scheduler": "kubernetes", "eks_cluster_name": CLUSTER, "shared_dir": str(tmp_path)}
    images = EksPlatform().default_image()
    documents = EksPlatform().render(spec, {}, images)
    workdir = tmp_path / "runs" / spec["names"]["run_key"]

    preflight = jobs.prepare_preflight(spec, cluster, images)
    assert preflight == {
        "manifest": documents["preflight.yaml"],
        "cluster_name": CLUSTER,
        "results_path": str(workdir / "preflight.json"),
        "nccl_tests_path": "",  # torch's all-reduce sweep measures the bus bandwidth
        "hang_timeout_s": spec["params"]["hang_timeout_minutes"] * 60,
    }
    training = jobs.prepare_training(spec, cluster, images, {"train_bin": "/fsx/runs/x/train.bin"})
    assert training["hang_timeout_s"] == spec["params"]["hang_timeout_minutes"] * 60  # DTP's trainer prints as it saves
    assert (training["manifest"], training["cluster_name"]) == (documents["pytorchjob.yaml"], CLUSTER)
    assert training["metrics_path"] == str(workdir / "metrics.jsonl")
    # What the pods run, where the manifest says: the programs (the image has none) and the trainer's config.
    assert {p.name for p in (workdir / "programs").iterdir()} == {p.name for p in jobs.TRAINING_DIR.glob("*.py")}
    config = json.loads((workdir / "train.json").read_text())
    assert (config["data_path"], config["max_steps"]) == ("/fsx/runs/x/train.bin", spec["params"]["max_steps"])
    assert "train.json" in container(yaml.safe_load(training["manifest"]))["command"][-1]


def test_an_image_with_the_programs_needs_none_staged(tmp_path: Path) -> None:
    spec = spec_for("tiny", "g5.48xlarge", 1)
    cluster = {"platform": "eks", "scheduler": "kubernetes", "eks_cluster_name": CLUSTER, "shared_dir": str(tmp_path)}
    job = jobs.prepare_preflight(spec, cluster, EksPlatform().runtime("registry/dtp@sha256:abc", spec))
    assert container(yaml.safe_load(job["manifest"]))["command"][1] == "/opt/dtp/training/preflight.py"
    assert not (tmp_path / "runs" / spec["names"]["run_key"] / "programs").exists()


def test_tags_are_annotations_and_labels_are_valid_label_values() -> None:
    spec = spec_for("llama3_1_8b", "p5.48xlarge", 2)
    _, job = rendered(spec)
    annotations = job["metadata"]["annotations"]
    assert annotations == {f"dtp.dev/{key.removeprefix('dtp:')}": value for key, value in spec["tags"].items()}
    assert job["metadata"]["labels"] == {"dtp.dev/run": spec["names"]["run_key"], "dtp.dev/dag": "train_e2e"}
    assert worker(job)["template"]["metadata"]["labels"] == job["metadata"]["labels"]


def test_odd_characters_in_values_cannot_break_the_yaml() -> None:
    spec = spec_for("llama3_1_8b", "p5.48xlarge", 2, extra_env={"NCCL_DEBUG": "INFO'\": {x: [y]} # not a comment"})
    hostile = 'it\'s "quoted": {a: b}\n---\nkind: Secret\n- [x] # & *anchor !!python/object'
    spec["tags"] = {**spec["tags"], "dtp:run-id": hostile}
    spec["dag_id"] = "dag: with\nnewline/and-a-very-long-name-" + "x" * 80
    text, job = rendered(spec)
    assert EksPlatform().check({"pytorchjob.yaml": text}) == []
    assert len(list(yaml.safe_load_all(text))) == 1
    assert job["metadata"]["annotations"]["dtp.dev/run-id"] == hostile
    assert {"name": "NCCL_DEBUG", "value": spec["params"]["extra_env"]["NCCL_DEBUG"]} in container(job)["env"]
    dag_label = job["metadata"]["labels"]["dtp.dev/dag"]
    assert len(dag_label) <= 63 and dag_label.startswith("dag__with_newline")


def test_check_names_the_document_of_each_problem() -> None:
    text, _ = rendered(spec_for("llama3_1_8b", "p5.48xlarge", 2))
    problems = EksPlatform().check({"pytorchjob.yaml": text, "preflight.yaml": text.replace("PyTorchJob", "TFJob")})
    assert problems == ["preflight.yaml: apiVersion/kind: expected kubeflow.org/v1 PyTorchJob"]


def test_recipes_of_other_frameworks_are_refused() -> None:
    with pytest.raises(PlatformNotReady, match=r"llama3_1_8b_torchtitan.*torchtitan.*FSDP trainer only"):
        EksPlatform().render(spec_for("llama3_1_8b_torchtitan", "p5.48xlarge", 2), {})


def test_settings_come_from_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = {
        "cluster_name": CLUSTER,
        "namespace": "training",
        "fsx_claim": "fsx-lustre",
        "image_pull_policy": "Always",
        "max_nodes": 128,
    }
    monkeypatch.setenv("AIRFLOW_CONN_DTP_EKS", json.dumps({"conn_type": "generic", "extra": extra}))
    assert EksPlatform().max_nodes() == 128
    _, job = rendered(spec_for("tiny", "g5.48xlarge", 1))
    assert job["metadata"]["namespace"] == "training"
    assert container(job)["imagePullPolicy"] == "Always"
    assert {"name": "fsx", "persistentVolumeClaim": {"claimName": "fsx-lustre"}} in worker(job)["template"]["spec"][
        "volumes"
    ]


def test_missing_connection_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_DTP_EKS")
    with pytest.raises(PlatformNotReady, match="connection 'dtp_eks' is not defined; it holds the account's EKS"):
        EksPlatform().max_nodes()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({}, "cluster_name"),
        ({"cluster_name": "-bad name"}, "cluster_name"),
        ({"cluster_name": CLUSTER, "namespace": "Kube_Flow"}, "namespace"),
        ({"cluster_name": CLUSTER, "image_pull_policy": "Sometimes"}, "image_pull_policy"),
        ({"cluster_name": CLUSTER, "max_nodes": 0}, "max_nodes"),
        ({"cluster_name": CLUSTER, "fsx": "fsx-claim"}, "fsx"),
    ],
)
def test_invalid_connection_names_the_field(monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], field: str) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_DTP_EKS", json.dumps({"conn_type": "generic", "extra": extra}))
    with pytest.raises(PlatformNotReady, match=f"connection 'dtp_eks' extra: .*{field}"):
        EksPlatform().max_nodes()


def describe_cluster(status: str, endpoint: str = "https://ABC.gr7.us-east-1.eks.amazonaws.com") -> dict[str, Any]:
    certificate = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
    return {
        "cluster": {
            "name": CLUSTER,
            "status": status,
            "endpoint": endpoint,
            "certificateAuthority": {"data": certificate},
        }
    }


@pytest.fixture
def eks_api(moto_aws: Callable[[str], Any]) -> Any:
    """moto's EKS in this process: a cluster it creates is ACTIVE at once, and one never created is missing. The
    AWS connection names no endpoint, as the local stack's does: moto intercepts only AWS's own."""
    return moto_aws("eks")


def test_provision_finds_the_active_cluster(eks_api: Any) -> None:
    made = eks_api.create_cluster(
        name=CLUSTER,
        roleArn="arn:aws:iam::123456789012:role/dtp-eks",
        resourcesVpcConfig={"subnetIds": ["subnet-0a", "subnet-0b"]},
    )["cluster"]
    spec = spec_for("llama3_1_8b", "p5.48xlarge", 2)
    cluster = EksPlatform().provision(spec, {})
    assert cluster == {
        "platform": "eks",
        "cluster_name": CLUSTER,
        "endpoint": made["endpoint"],
        "namespace": "kubeflow",
        "scheduler": "kubernetes",
        "eks_cluster_name": CLUSTER,
        "shared_dir": "/fsx",
        "job_name": spec["names"]["run_key"],
    }


def test_provision_refuses_a_cluster_that_is_not_active() -> None:
    # moto's EKS makes every cluster ACTIVE at once: only a Stubber answers CREATING.
    platform = EksPlatform()
    with Stubber(platform.eks_hook.conn) as eks:
        eks.add_response("describe_cluster", describe_cluster("CREATING"), {"name": CLUSTER})
        with pytest.raises(PlatformNotReady, match=f"EKS cluster '{CLUSTER}' .*dtp_eks.* is CREATING, not ACTIVE"):
            platform.provision(spec_for("tiny", "g5.48xlarge", 1), {})


def test_provision_refuses_a_missing_cluster(eks_api: Any) -> None:
    eks_api.create_cluster(
        name="someone-elses-cluster",
        roleArn="arn:aws:iam::123456789012:role/dtp-eks",
        resourcesVpcConfig={"subnetIds": ["subnet-0a"]},
    )
    with pytest.raises(PlatformNotReady, match=f"EKS cluster '{CLUSTER}' .*cluster_name.* does not exist"):
        EksPlatform().provision(spec_for("tiny", "g5.48xlarge", 1), {})


def teardown_against(api: Any, spec: dict[str, Any], delete_timeout: float = 600) -> dict[str, Any]:
    platform = EksPlatform(delete_timeout=delete_timeout)
    with Stubber(platform.jobs.eks_hook.conn) as eks:
        eks.add_response("describe_cluster", describe_cluster("ACTIVE", api.endpoint), {"name": CLUSTER})
        return platform.teardown(spec)


def test_teardown_deletes_the_runs_jobs_in_the_foreground(kubernetes_api: Any) -> None:
    spec = spec_for("llama3_1_8b", "p5.48xlarge", 2)
    name, preflight = spec["names"]["run_key"], f"{spec['names']['run_key']}-preflight"
    kubernetes_api.jobs = {name: {"metadata": {"name": name}}, preflight: {}, "someone-elses-job": {}}
    assert teardown_against(kubernetes_api, spec) == {"deleted_jobs": [preflight, name], "namespace": "kubeflow"}
    assert set(kubernetes_api.jobs) == {"someone-elses-job"}
    (method, path, authorization, _), (verify, *_) = kubernetes_api.requests[:2]
    assert (method, path) == (
        "DELETE",
        f"/apis/kubeflow.org/v1/namespaces/kubeflow/pytorchjobs/{preflight}?propagationPolicy=Foreground",
    )
    assert authorization.startswith("Bearer k8s-aws-v1.")  # the EKS token of aws_default's credentials
    assert verify == "GET"
    assert kubernetes_api.requests[2][:2] == (
        "DELETE",
        f"/apis/kubeflow.org/v1/namespaces/kubeflow/pytorchjobs/{name}?propagationPolicy=Foreground",
    )


def test_teardown_of_jobs_already_gone(kubernetes_api: Any) -> None:
    spec = spec_for("tiny", "g5.48xlarge", 1)
    name = spec["names"]["run_key"]
    assert teardown_against(kubernetes_api, spec) == {"deleted_jobs": [], "namespace": "kubeflow"}
    sent = [(method, path.split("?")[0]) for method, path, *_ in kubernetes_api.requests]
    jobs = "/apis/kubeflow.org/v1/namespaces/kubeflow/pytorchjobs"
    assert {(method, path) for method, path in sent if method == "DELETE"} == {
        ("DELETE", f"{jobs}/{name}-preflight"),
        ("DELETE", f"{jobs}/{name}"),
    }
    assert [request for request in sent if request[0] != "DELETE"] == []  # a 404 needs no second look


def test_teardown_fails_when_the_job_stays(kubernetes_api: Any) -> None:
    spec = spec_for("tiny", "g5.48xlarge", 1)
    name = spec["names"]["run_key"]
    kubernetes_api.jobs, kubernetes_api.finalizing = {name: {"metadata": {"name": name}}}, {name}
    with pytest.raises(RuntimeError, match=f"PyTorchJob kubeflow/{name} is still there 0 s after delete"):
        teardown_against(kubernetes_api, spec, delete_timeout=0)
