"""Collect a run's metrics, judge its gates, publish its report to the artifacts bucket.

The artifacts bucket outlives runs (it is not a run resource and teardown
leaves it): reports (with the preflight results), metrics and the history stay
after the run's own bucket and network are gone.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from airflow.providers.amazon.aws.hooks.s3 import S3Hook

from dtp.hooks.slurm import SlurmHook
from dtp.metrics import history
from dtp.metrics.gates import comparable_runs, preflight_failures, regression_failures, training_failures
from dtp.metrics.parse import TrainingSummary, summarize
from dtp.metrics.report import render_report
from dtp.naming import OWNER, TAG_PREFIX

log = logging.getLogger(__name__)
REPORT_URL_TTL_S = 7 * 24 * 3600
# Recent entries read from the history; runs of other shapes among them are filtered out afterwards.
HISTORY_WINDOW = 50


def artifacts_bucket(aws_conn_id: str) -> str:
    """``dtp-artifacts-<account>-<region>``, created and tagged on first use."""
    sts = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="sts")
    s3 = S3Hook(aws_conn_id=aws_conn_id)
    name = f"dtp-artifacts-{sts.conn.get_caller_identity()['Account']}-{s3.conn_region_name}"
    if not s3.check_for_bucket(name):
        s3.create_bucket(name, region_name=s3.conn_region_name)
        s3.conn.put_bucket_tagging(
            Bucket=name,
            Tagging={
                "TagSet": [
                    {"Key": f"{TAG_PREFIX}owner", "Value": OWNER},
                    {"Key": f"{TAG_PREFIX}role", "Value": "artifacts"},
                ]
            },
        )
    return name


def read_json(cluster: dict[str, Any], path: str) -> dict[str, Any]:
    text, _ = SlurmHook(cluster["slurm_conn_id"]).read_file(path)
    if not text:
        raise FileNotFoundError(f"{path} is missing or empty on the cluster")
    return json.loads(text)


def check_preflight(spec: dict[str, Any], cluster: dict[str, Any], results_path: str) -> dict[str, Any]:
    result = read_json(cluster, results_path)
    failures = preflight_failures(result, spec["params"]["num_nodes"], spec["instance"]["expected_busbw_gbps"])
    for row in result["allreduce"]:
        log.info("all-reduce %10d bytes: busbw %.3f GB/s", row["bytes"], row["busbw_gbps"])
    return {"result": result, "failures": failures}


def collect_metrics(
    spec: dict[str, Any], cluster: dict[str, Any], metrics_path: str, aws_conn_id: str
) -> dict[str, Any]:
    text, _ = SlurmHook(cluster["slurm_conn_id"]).read_file(metrics_path)
    summary = summarize(text.splitlines())
    if not summary.steps:
        raise ValueError(f"{metrics_path} holds no training step")
    bucket = artifacts_bucket(aws_conn_id)
    key = f"runs/{spec['names']['run_key']}/metrics.jsonl"
    s3 = S3Hook(aws_conn_id=aws_conn_id)
    s3.load_string(text, key, bucket, replace=True)
    params = spec["params"]
    result = summary.as_dict()
    result.update(num_nodes=params["num_nodes"], max_steps=params["max_steps"])
    previous = [
        entry
        for entry in history.recent(
            s3, bucket, params["recipe"], params["platform"], params["instance_type"], HISTORY_WINDOW
        )
        if entry["run_key"] != spec["names"]["run_key"]
    ]
    history.record(s3, bucket, spec, result)
    log.info(
        "Loss %.4f -> %.4f over %d steps, median %.0f tokens/s, restarts %d",
        summary.first_loss,
        summary.final_loss,
        summary.steps[-1],
        summary.median_tokens_per_s or 0,
        summary.restarts,
    )
    return {**result, "metrics_uri": f"s3://{bucket}/{key}", "history": previous}


def gate_failures(spec: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    gates = spec["recipe"]["gates"]
    return training_failures(_summary(metrics), gates, spec["params"]["max_steps"]) + regression_failures(
        metrics, metrics.get("history", []), gates
    )


def _summary(metrics: dict[str, Any]) -> TrainingSummary:
    fields = TrainingSummary.__dataclass_fields__
    return TrainingSummary(**{k: v for k, v in metrics.items() if k in fields})


def publish_report(
    spec: dict[str, Any],
    metrics: dict[str, Any],
    preflight: dict[str, Any] | None,
    resources: dict[str, Any],
    aws_conn_id: str,
) -> dict[str, str]:
    trend = comparable_runs(metrics, metrics.get("history", []))
    html = render_report(spec, _summary(metrics), preflight, gate_failures(spec, metrics), resources, trend)
    bucket = artifacts_bucket(aws_conn_id)
    key = f"runs/{spec['names']['run_key']}/report.html"
    s3 = S3Hook(aws_conn_id=aws_conn_id)
    s3.conn.put_object(Bucket=bucket, Key=key, Body=html.encode(), ContentType="text/html; charset=utf-8")
    url = s3.generate_presigned_url("get_object", params={"Bucket": bucket, "Key": key}, expires_in=REPORT_URL_TTL_S)
    log.info("Report: s3://%s/%s", bucket, key)
    return {"uri": f"s3://{bucket}/{key}", "url": url or ""}
