"""The run's network + storage stack: create (idempotent), read outputs, tear down and verify."""

from __future__ import annotations

import logging
from typing import Any

from dtp.hooks.stacks import StackFailed, StackHook
from dtp.hooks.sweeper import RunResourceSweeper
from dtp.templates import TEMPLATE_DIR

log = logging.getLogger(__name__)
NETWORK_TEMPLATE = TEMPLATE_DIR / "cloudformation" / "network.yaml"


class LeakedResources(RuntimeError):
    """Teardown finished but resources of the run still exist."""


def create_network_stack(spec: dict[str, Any], aws_conn_id: str) -> str:
    hook = StackHook(aws_conn_id=aws_conn_id)
    names = spec["names"]
    hook.ensure_stack(
        names["network_stack"],
        NETWORK_TEMPLATE.read_text(),
        {
            "VPCName": names["run_key"],
            "SubnetsAZ": f"{hook.conn_region_name}a",
            "DataBucketName": names["data_bucket"],
        },
        spec["tags"],
    )
    return names["network_stack"]


def network_outputs(spec: dict[str, Any], aws_conn_id: str) -> dict[str, str]:
    """The stack's exports, and the run's tags on the bucket (stack tags do not reach S3 everywhere)."""
    outputs = StackHook(aws_conn_id=aws_conn_id).stack_outputs(spec["names"]["network_stack"])
    sweeper = RunResourceSweeper(aws_conn_id=aws_conn_id)
    sweeper.s3.put_bucket_tagging(
        Bucket=outputs["DataBucket"],
        Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in sorted(spec["tags"].items())]},
    )
    log.info("Network ready: %s", outputs)
    return outputs


def teardown_network(spec: dict[str, Any], aws_conn_id: str) -> dict[str, Any]:
    """Empty the bucket, delete the stack, sweep what it left, verify nothing of the run remains."""
    names = spec["names"]
    if spec["params"]["keep_cluster"]:
        log.warning(
            "keep_cluster=true: keeping %s; it expires at %s", names["network_stack"], spec["tags"]["dtp:expires-at"]
        )
        return {"kept": True}
    stacks, sweeper = StackHook(aws_conn_id=aws_conn_id), RunResourceSweeper(aws_conn_id=aws_conn_id)
    buckets = (names["data_bucket"],)
    emptied = sweeper.empty_bucket(names["data_bucket"])
    status = stacks.delete_and_wait(names["network_stack"])
    if status == "DELETE_FAILED":
        log.warning(
            "Stack %s: DELETE_FAILED (%s); sweeping what blocks it",
            names["network_stack"],
            stacks.failure_reasons(names["network_stack"]),
        )
    swept = sweeper.sweep(names["run_key"], buckets)
    if status == "DELETE_FAILED":
        status = stacks.delete_and_wait(names["network_stack"])
        if status == "DELETE_FAILED" and stacks.describe(names["network_stack"]) is not None:
            raise StackFailed(f"stack {names['network_stack']} still DELETE_FAILED after sweeping its resources")
    left = {kind: ids for kind, ids in sweeper.find(names["run_key"], buckets).items() if ids}
    remaining = stacks.describe(names["network_stack"])
    if remaining is not None and remaining["StackStatus"] != "DELETE_COMPLETE":
        left["stack"] = [f"{names['network_stack']} ({remaining['StackStatus']})"]
    if left:
        raise LeakedResources(f"resources of run {names['run_key']} still exist after teardown: {left}")
    return {"objects_deleted": emptied, "stack_status": status, "swept": {k: v for k, v in swept.items() if v}}
