"""PyTorchJobHook's kubeconfigs in a process that holds several at once, as the triggerer does (a trigger's polls and
its on_kill, triggers on other clusters): written one at a time, each loaded into a Kubernetes configuration of its
own. The EKS API is botocore's Stubber."""

from __future__ import annotations

import os
import threading
import time
from contextlib import ExitStack
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes.client import Configuration
from pytorchjob_support import NAMESPACE, stub_eks

from dtp.hooks.pytorchjob import PyTorchJobHook

# Every test here signs its EKS token with the offline credentials.
pytestmark = pytest.mark.usefixtures("offline_aws")


def test_kubeconfigs_written_from_two_threads_at_once_each_get_the_regional_sts_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_STS_REGIONAL_ENDPOINTS", raising=False)
    seen: list[str | None] = []

    class SlowStsHook:
        """The amazon provider's StsHook, as slow to make its client as boto3 can be; its client reads
        AWS_STS_REGIONAL_ENDPOINTS, which ``EksHook.generate_config_file`` sets around it, then deletes."""

        def __init__(self, region_name: str | None) -> None:
            self.region_name = region_name

        @property
        def conn_client_meta(self) -> Any:
            time.sleep(0.2)
            seen.append(os.environ.get("AWS_STS_REGIONAL_ENDPOINTS"))
            return SimpleNamespace(endpoint_url=f"https://sts.{self.region_name}.amazonaws.com")

    monkeypatch.setattr("airflow.providers.amazon.aws.hooks.eks.StsHook", SlowStsHook)
    hooks = [PyTorchJobHook("dtp-training", NAMESPACE) for _ in range(2)]
    together = threading.Barrier(len(hooks))
    errors: list[BaseException] = []

    def write_kubeconfig(hook: PyTorchJobHook) -> None:
        together.wait()
        try:
            with hook.kubernetes():
                pass
        except BaseException as err:  # reported below, from the test's thread
            errors.append(err)

    with ExitStack() as stack:
        for hook in hooks:
            stack.enter_context(stub_eks(hook, SimpleNamespace(endpoint="https://eks.example")))
        threads = [threading.Thread(target=write_kubeconfig, args=(hook,)) for hook in hooks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert seen == ["regional", "regional"]
    assert "AWS_STS_REGIONAL_ENDPOINTS" not in os.environ


def test_hooks_on_two_clusters_keep_their_own_hosts_and_leave_the_default_configuration_alone(
    kubernetes_api: Any,  # its PATH runs the kubeconfig's token command; nothing is sent to it
) -> None:
    default_host = Configuration.get_default_copy().host
    endpoints = {"first": "https://first.eks.example", "second": "https://second.eks.example"}
    with ExitStack() as stack:
        clients = {}
        for name, endpoint in endpoints.items():
            hook = PyTorchJobHook("dtp-training", NAMESPACE)
            stack.enter_context(stub_eks(hook, SimpleNamespace(endpoint=endpoint)))
            clients[name] = stack.enter_context(hook.kubernetes()).api_client  # its kubeconfig loaded
        assert {name: client.configuration.host for name, client in clients.items()} == endpoints
    # A hook whose client is made after another's kubeconfig was loaded gets its own, not the other's.
    assert Configuration.get_default_copy().host == default_host
