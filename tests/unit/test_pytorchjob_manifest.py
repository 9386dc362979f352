"""PyTorchJob manifests checked as the API server and the training operator would: DTP's own pass, and each
violation one of them would refuse is named with its path."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from dtp.form_params import parse_params
from dtp.params import TrainParams
from dtp.pipeline.spec import run_spec
from dtp.platforms.containers import image_runtime
from dtp.platforms.eks import PyTorchJobSettings, render_pytorchjobs
from dtp.platforms.pytorchjob_manifest import manifest_problems


def worker(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]


def container(job: dict[str, Any]) -> dict[str, Any]:
    return worker(job)["template"]["spec"]["containers"][0]


def check(job: dict[str, Any]) -> list[str]:
    return manifest_problems(yaml.safe_dump(job))


@pytest.fixture(params=["pytorchjob.yaml", "preflight.yaml"])
def job(request: pytest.FixtureRequest) -> dict[str, Any]:
    """One of DTP's own jobs for a 4-node p5.48xlarge run of the 8B recipe."""
    params = {"platform": "eks", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "num_nodes": 4}
    spec = run_spec(parse_params(TrainParams, params), "train_e2e", "manual__2026-12-02")
    selector = {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    documents = render_pytorchjobs(spec, image_runtime("dtp/training:latest"), PyTorchJobSettings(), selector)
    return dict(yaml.safe_load(documents[request.param]))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda j: worker(j).update(restartPolicy="Sometimes"), "Worker.restartPolicy: 'Sometimes' is not one of"),
        (lambda j: worker(j).update(replicas="two"), "Worker.replicas: 'two' is not of type 'integer'"),
        (lambda j: worker(j).pop("template"), "Worker.template.spec.containers: must be specified"),
        (lambda j: j.update(status_report={}), "(document): Additional properties are not allowed ('status_report'"),
        (lambda j: j["spec"].update(replicas=4), "spec: Additional properties are not allowed ('replicas'"),
        (lambda j: container(j).update(imagePullPolicy=7), "containers[0].imagePullPolicy: 7 is not of type 'string'"),
        (lambda j: container(j).pop("image"), "containers[0].image: required"),
        (lambda j: container(j).update(name="trainer"), "needs a container named 'pytorch'"),
        (lambda j: container(j)["resources"]["limits"].update(cpu="lots"), "limits.cpu: 'lots' does not match"),
        (lambda j: container(j)["resources"]["limits"].update(cpu=[8]), "limits.cpu: [8] is not valid under any"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=worker(j)), "Chief: unsupported replica type"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Master=dict(worker(j))), "Master.replicas: must be 1"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Master=j["spec"]["pytorchReplicaSpecs"].pop("Worker")),
         "Worker: required with an elasticPolicy"),
        (lambda j: j["spec"]["elasticPolicy"].update(nProcPerNode=8), "nProcPerNode: must not be used with"),
        (lambda j: j["metadata"].update(name="Run_1"), "metadata.name: 'Run_1' is not a DNS-1035 label"),
        (lambda j: j["metadata"].update(name="1-run"), "metadata.name: '1-run' is not a DNS-1035 label"),
        (lambda j: j["metadata"]["labels"].update(dag="has space"), "'has space' is not a label value"),
        (lambda j: j["metadata"]["annotations"].update({"dtp:owner": "dtp"}), "key 'dtp:owner' is not a qualified"),
        (lambda j: j.update(kind="TFJob"), "apiVersion/kind: expected kubeflow.org/v1 PyTorchJob"),
    ],
)  # fmt: skip
def test_check_catches_violations(job: dict[str, Any], change: Any, expected: str) -> None:
    assert check(job) == []
    change(job)
    problems = check(job)
    assert any(expected in problem for problem in problems), problems


def test_quantities_take_integers_and_strings(job: dict[str, Any]) -> None:
    container(job)["resources"]["limits"] |= {"cpu": 96, "memory": "1900Gi", "ephemeral-storage": "0.5Ti"}
    container(job)["ports"] = [{"containerPort": 29500, "name": "pytorchjob-port"}]
    worker(job)["template"]["spec"]["containers"][0]["livenessProbe"] = {"tcpSocket": {"port": "pytorchjob-port"}}
    assert check(job) == []


def test_check_wants_a_single_yaml_document(job: dict[str, Any]) -> None:
    text = yaml.safe_dump(job)
    assert manifest_problems(text + "---\n" + text) == ["expected one PyTorchJob mapping, found 2 YAML documents"]
    assert manifest_problems("metadata: {name: [unclosed")[0].startswith("not YAML")
