"""Unit-test fixtures: a local HTTP server speaking the Kubernetes API for PyTorchJobs and their pods.

No Kubernetes API server can run on this machine (see README, "What is tested locally"); this one answers the
requests DTP's EKS code sends, over HTTP, through the real Kubernetes client and the amazon provider's EKS
kubeconfig and token, and records them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.stub import Stubber
from hyperpod_support import SETTINGS
from moto import mock_aws

JOBS_PATH = "/apis/kubeflow.org/v1/namespaces/{namespace}/pytorchjobs"
PODS_PATH = "/api/v1/namespaces/{namespace}/pods"


class KubernetesApi(BaseHTTPRequestHandler):
    """PyTorchJobs (``jobs``, by name) and their pods (``pods``: name -> labels, ``logs``: name -> timestamped
    lines) in namespace ``namespace``, each listed by label. A delete leaves the jobs in ``finalizing`` (their pods
    are still going).
    Each GET of a job first applies the next step of ``timeline`` (a condition type or None, and log lines of
    worker 0), as the training operator and the pods would between two polls."""

    namespace = "kubeflow"
    endpoint = ""
    jobs: dict[str, dict[str, Any]] = {}
    finalizing: set[str] = set()
    pods: dict[str, dict[str, str]] = {}
    logs: dict[str, list[str]] = {}
    timeline: list[tuple[str | None, list[str]]] = []
    requests: list[tuple[str, str, str, bytes]] = []
    # The numbers (1 = the first) of the requests answered 401 Unauthorized, as when a token's credentials expired.
    unauthorized: set[int] = set()

    def _send(self, status: int, answer: Any, content_type: str = "application/json") -> None:
        data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                          "code": code, "message": message})  # fmt: skip

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append((self.command, self.path, self.headers.get("Authorization", ""), body))
        if len(self.requests) in self.unauthorized:
            self._status(401, "Unauthorized", "Unauthorized")
            return
        url = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        jobs, pods = JOBS_PATH.format(namespace=self.namespace), PODS_PATH.format(namespace=self.namespace)
        if url.path == jobs and self.command == "POST":
            self._create(json.loads(body))
        elif url.path == jobs:
            self._list(query.get("labelSelector", ""))
        elif url.path.startswith(f"{jobs}/"):
            self._job(url.path.removeprefix(f"{jobs}/"))
        elif url.path == pods:
            selector = dict(term.split("=", 1) for term in query.get("labelSelector", "").split(",") if term)
            items = [
                {"metadata": {"name": name, "namespace": self.namespace, "labels": labels}}
                for name, labels in self.pods.items()
                if selector.items() <= labels.items()
            ]
            self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
        elif url.path.startswith(f"{pods}/") and url.path.endswith("/log"):
            pod = url.path.removeprefix(f"{pods}/").removesuffix("/log")
            if pod not in self.logs:
                self._status(400, "BadRequest", f'container "pytorch" in pod "{pod}" is waiting to start')
            else:
                self._send(200, "".join(f"{line}\n" for line in self.logs[pod]), "text/plain")
        else:
            self._status(404, "NotFound", f"no route for {self.command} {url.path}")

    def _create(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        if name in self.jobs:
            self._status(409, "AlreadyExists", f'pytorchjobs.kubeflow.org "{name}" already exists')
            return
        self.jobs[name] = {**job, "status": {}}
        self._send(201, self.jobs[name])

    def _list(self, selector: str) -> None:
        """The jobs matching a label selector of ``key`` (has the label) and ``key=value`` terms."""
        terms = [term.partition("=") for term in selector.split(",") if term]

        def matches(labels: dict[str, str]) -> bool:
            return all(key in labels and (not equals or labels[key] == value) for key, equals, value in terms)

        items = [job for job in self.jobs.values() if matches((job.get("metadata") or {}).get("labels") or {})]
        self._send(200, {"kind": "PyTorchJobList", "apiVersion": "kubeflow.org/v1", "metadata": {}, "items": items})

    def _job(self, name: str) -> None:
        if name not in self.jobs:
            self._status(404, "NotFound", f'pytorchjobs.kubeflow.org "{name}" not found')
            return
        if self.command == "PATCH":
            if self.headers.get("Content-Type") != "application/merge-patch+json":
                self._status(415, "UnsupportedMediaType", f"{self.headers.get('Content-Type')} is not a merge patch")
                return
            self.jobs[name] = _merge(self.jobs[name], json.loads(self.requests[-1][3]))
            self._send(200, self.jobs[name])
            return
        if self.command == "DELETE":
            answer = self.jobs[name]
            if name not in self.finalizing:
                del self.jobs[name]
            self._send(200, answer)
            return
        if self.timeline:
            self._advance(name, *self.timeline.pop(0))
        self._send(200, self.jobs[name])

    def _advance(self, name: str, condition: str | None, lines: list[str]) -> None:
        if condition:
            conditions = self.jobs[name]["status"].setdefault("conditions", [])
            stamp = f"2026-12-03T10:00:{len(conditions):02d}Z"
            conditions.append({"type": condition, "status": "True", "lastTransitionTime": stamp,
                               "message": f"PyTorchJob {name} is {condition.lower()}."})  # fmt: skip
        if lines:
            pod = f"{name}-worker-0"
            self.pods[pod] = {
                "training.kubeflow.org/job-name": name,
                "training.kubeflow.org/replica-type": "worker",
                "training.kubeflow.org/replica-index": "0",
            }
            self.logs.setdefault(pod, []).extend(lines)

    do_GET = do_POST = do_DELETE = do_PATCH = _answer

    def log_message(self, *args: Any) -> None:
        pass


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``target`` with a JSON merge patch (RFC 7386) applied: nested objects merge, null removes a key."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture
def kubernetes_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[KubernetesApi]]:
    # The generated kubeconfig runs the amazon provider's eks_get_token with the interpreter of this Python version.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for name, empty in (("jobs", {}), ("finalizing", set()), ("pods", {}), ("logs", {}), ("timeline", []),
                        ("requests", []), ("unauthorized", set())):  # fmt: skip
        setattr(KubernetesApi, name, empty)
    server = ThreadingHTTPServer(("127.0.0.1", 0), KubernetesApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    KubernetesApi.endpoint = f"http://127.0.0.1:{server.server_port}"
    yield KubernetesApi
    server.shutdown()
    thread.join()


@pytest.fixture
def installation(monkeypatch: pytest.MonkeyPatch) -> str:
    """This installation's id, pinned the way a deployment can pin it (``AIRFLOW_VAR_DTP_INSTALLATION_ID``): a
    task function called outside a running task cannot set the Variable itself."""
    monkeypatch.setenv("AIRFLOW_VAR_DTP_INSTALLATION_ID", "0a1b2c3d")
    return "0a1b2c3d"


@pytest.fixture
def stub(hook: Any) -> Iterator[Stubber]:
    """A Stubber answering for the client of the module's ``hook`` fixture (an AWS hook, made in us-east-1), which
    must have been given every response it is asked for by the end of the test."""
    client = hook.get_client_type(region_name="us-east-1")
    hook.conn = client  # the hook's cached client, answered by the Stubber
    with Stubber(client) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


@pytest.fixture
def offline_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials and a region for AWS clients whose calls a botocore ``Stubber`` answers (nothing is sent)."""
    for name, value in {
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def moto_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Any]]:
    """moto's AWS in this process, behind the ``aws_default`` connection (us-east-1, test credentials); yields a
    factory of boto3 clients to it."""
    conn = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": {"region_name": "us-east-1"}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(conn))
    with mock_aws():
        yield lambda service: boto3.client(
            service, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
        )


@pytest.fixture(scope="session")
def trainer_mfu() -> ModuleType:
    """benchmarks/trainer_mfu.py, imported as a module (benchmarks/ is no package)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "trainer_mfu.py"
    spec = importlib.util.spec_from_file_location("trainer_mfu", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["trainer_mfu"] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The dtp_hyperpod connection, of hyperpod_support's ``SETTINGS``; ``settings(**extra)`` sets it again with
    ``extra`` over them (the HyperPod tests'; a module's own ``settings`` fixture takes its place there)."""

    def use(**extra: Any) -> None:
        conn = {"conn_type": "generic", "extra": {**SETTINGS, **extra}}
        monkeypatch.setenv("AIRFLOW_CONN_DTP_HYPERPOD", json.dumps(conn))

    use()
    return use
