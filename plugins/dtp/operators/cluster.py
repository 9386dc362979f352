"""Provision a run's cluster on its platform, waiting in the triggerer while the platform creates it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from botocore.exceptions import ClientError

from dtp.platforms import get_platform
from dtp.platforms.base import PlatformNotReady


class DeployClusterOperator(BaseOperator):
    """
    Create (or find again) the run's cluster with ``platform.provision`` and return how to reach it.

    When the platform hands back a trigger (its cluster takes minutes to hours to come up), the task
    defers to it and frees its worker slot. A platform that is not set up, or a call the AWS endpoint
    does not implement (the local profile's emulator), fails the task at once, without retries.

    :param spec: the run spec from ``validate_params``
    :param network: the network stack's outputs
    :param images: the runtime from ``resolve_images``; its ``ami``, when published, is what the nodes boot
    """

    template_fields: Sequence[str] = ("spec", "network", "images")

    def __init__(self, *, spec: Any, network: Any, images: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.network = network
        self.images = images

    def execute(self, context: Any) -> dict[str, Any]:
        platform = get_platform(self.spec["params"]["platform"])
        try:
            cluster = platform.provision(self.spec, self.network, (self.images or {}).get("ami"))
        except PlatformNotReady as err:
            raise AirflowFailException(str(err)) from None
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "NotImplemented":
                raise AirflowFailException(f"platform {platform.name!r}: {err}") from None
            raise
        trigger = platform.ready_trigger(cluster)
        if trigger is None:
            return cluster
        self.log.info("Waiting in the triggerer for %s cluster %s", platform.name, cluster.get("cluster_name"))
        self.defer(trigger=trigger, method_name="execute_complete", kwargs={"cluster": cluster})

    def execute_complete(self, context: Any, event: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
        if event["status"] != "success":
            raise AirflowException(event["message"])
        self.log.info(event["message"])
        return {**cluster, **event.get("cluster", {})}
