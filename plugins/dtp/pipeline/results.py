"""Collect a run's metrics, judge its gates, publish its report to the artifacts bucket.

The artifacts bucket outlives runs (it is not a run resource and teardown
leaves it): reports (with the preflight results), metrics and the history stay
after the run's own bucket and network are gone; profile traces and saved
checkpoints expire (``dtp.pipeline.retention``).
"""

from __future__ import annotations

import json
import logging
from http.client import HTTPException
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.sdk.exceptions import AirflowNotFoundException
from botocore.exceptions import ClientError

from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.metrics import history, prometheus
from dtp.metrics.framework_logs import summarize_log
from dtp.metrics.gates import (
    COMPARED_PARAMS,
    comparable,
    comparable_runs,
    extra_env_digest,
    recipe_digest,
    regression_failures,
    runtime_of,
    same_as,
    throughput_scale,
    training_failures,
)
from dtp.metrics.nccl_tests import NcclTestsOutputError, parse_nccl_tests
from dtp.metrics.nccom_test import NccomTestOutputError, parse_nccom_test
from dtp.metrics.node_checks import device_failures
from dtp.metrics.parse import TrainingSummary
from dtp.metrics.preflight_gate import (
    BusbwExpectation,
    busbw_table,
    cpu_sweep_on_accelerators,
    node_versions,
    preflight_failures,
    preflight_warnings,
)
from dtp.metrics.preflight_job import job_failures, node_results_dir, parse_status, status_path, with_node_records
from dtp.metrics.prometheus import PUSHGATEWAY_CONN_ID
from dtp.metrics.report import TREND_RUNS, render_report
from dtp.naming import OWNER, TAG_PREFIX
from dtp.pipeline.retention import TRACE, ensure_lifecycle, tagged_uploads
from dtp.platforms.capacity import instance_of

log = logging.getLogger(__name__)
REPORT_URL_TTL_S = 7 * 24 * 3600
# Comparable runs read from the history for the report's trend (and further back for the regression baseline).
HISTORY_WINDOW = TREND_RUNS


def artifacts_bucket(aws_conn_id: str) -> str:
    """``dtp-artifacts-<account>-<region>``, created and tagged on first use, with DTP's lifecycle rules (those of a
    bucket made before them too: ``dtp.pipeline.retention``); refused when another account owns it
    (``owned_bucket_exists``)."""
    s3 = S3Hook(aws_conn_id=aws_conn_id)
    name = f"dtp-artifacts-{s3.account_id}-{s3.conn_region_name}"
    if not owned_bucket_exists(s3, name, s3.account_id):
        s3.create_bucket(name, region_name=s3.conn_region_name)
        s3.put_bucket_tagging(tag_set={f"{TAG_PREFIX}owner": OWNER, f"{TAG_PREFIX}role": "artifacts"}, bucket_name=name)
    ensure_lifecycle(s3, name)
    return name


def owned_bucket_exists(s3: S3Hook, bucket: str, account_id: str) -> bool:
    """Whether ``bucket`` exists, owned by the AWS account ``account_id``; False when there is no such bucket.

    A bucket name is global: anyone may create one with a name DTP derives or is given, before DTP does, and open
    it to every account. A bucket another account owns raises PermissionError (S3 answers HeadBucket with 403 when
    ``ExpectedBucketOwner`` is not the owner), so DTP never writes to it nor reads what it holds."""
    try:
        s3.conn.head_bucket(Bucket=bucket, ExpectedBucketOwner=account_id)
    except ClientError as err:
        code = err.response["Error"]["Code"]
        if code in ("404", "NoSuchBucket"):
            return False
        if code in ("403", "AccessDenied"):
            raise PermissionError(
                f"bucket {bucket} exists but another AWS account owns it (or this account {account_id} may not "
                "read it): DTP does not use a bucket it does not own"
            ) from None
        raise
    return True


def read_json(cluster: dict[str, Any], path: str) -> dict[str, Any]:
    """The JSON document at ``path`` on the cluster's shared filesystem; FileNotFoundError when missing or empty."""
    text, _ = SharedFilesystemHook.of_cluster(cluster).read_file(path)
    if not text:
        raise FileNotFoundError(f"{path} is missing or empty on the cluster")
    return json.loads(text)


def busbw_expectation(spec: dict[str, Any], cluster: dict[str, Any]) -> BusbwExpectation:
    """The cluster's instance type's expected busbw, unless the run's ``expected_busbw_gbps`` param overrides it."""
    instance = instance_of(spec, cluster)
    gbps = spec["params"].get("expected_busbw_gbps") or instance["expected_busbw_gbps"]
    return BusbwExpectation(gbps=gbps, at_bytes=instance["busbw_at_bytes"])


def read_preflight(
    cluster: dict[str, Any], results_path: str, steps: tuple[str, ...]
) -> tuple[dict[str, Any], list[str]]:
    """preflight.py's results, and the failures the job's status file shows: the job's nodes that wrote no result
    (or that none did), the ``steps`` that exited non-zero or did not finish. Where the job ended before the
    combined results, the per-node result files stand in for them; an image's preflight.py that writes none leaves
    the combined results alone. Without a status file (a job off Slurm) the combined results alone:
    FileNotFoundError when there are none."""
    files = SharedFilesystemHook.of_cluster(cluster)
    status, _ = files.read_file(status_path(results_path))
    if not status:
        return read_json(cluster, results_path), []
    folder = node_results_dir(results_path)
    names = [name for name in files.list_files(folder) if name.endswith(".json")]  # not a write in progress
    records = [json.loads(files.read_file(f"{folder}/{name}")[0]) for name in names]
    try:
        combined: dict[str, Any] | None = read_json(cluster, results_path)
    except FileNotFoundError:
        combined = None
    result = with_node_records(combined, records)
    return result, job_failures(parse_status(status), result, records, steps)


def check_preflight(
    spec: dict[str, Any], cluster: dict[str, Any], results_path: str, collective_test_path: str = ""
) -> dict[str, Any]:
    """Judge the preflight job's results, with the all-reduce rows of the instance type's collective test
    (nccl-tests or nccom-test) where ``collective_test_path`` holds its output; the result gains the per-node
    version table, the verdict and the checks that could not run (``warnings``)."""
    instance = instance_of(spec, cluster)
    # The job's steps: torch's, then the collective test's where it ran one.
    steps = ("torch", instance["collective_test"]) if collective_test_path else ("torch",)
    result, failures = read_preflight(cluster, results_path, steps)
    if collective_test_path:
        text, _ = SharedFilesystemHook.of_cluster(cluster).read_file(collective_test_path)
        try:
            if instance["collective_test"] == "nccom-test":
                nccom = parse_nccom_test(text)
                result["allreduce"] = nccom.rows
                result["nccom_test"] = {"avg_busbw_gbps": nccom.avg_busbw_gbps}
            else:
                nccl = parse_nccl_tests(text)
                result["allreduce"] = nccl.rows
                result["nccl_tests"] = {"avg_busbw_gbps": nccl.avg_busbw_gbps, "out_of_bounds": nccl.out_of_bounds}
                if nccl.wrong_results or nccl.out_of_bounds:
                    failures.append(
                        f"nccl-tests: {nccl.wrong_results} wrong results, {nccl.out_of_bounds} out of bounds"
                    )
        except (NcclTestsOutputError, NccomTestOutputError) as err:  # it crashed, or never started
            result["allreduce"] = []
            failures.append(f"{instance['collective_test']}: {err}")
    busbw_checked = bool(collective_test_path) or not cpu_sweep_on_accelerators(result, instance["accelerator"])
    expected = busbw_expectation(spec, cluster)
    # NVIDIA instance types (the ones measured with nccl-tests) get the GPU health checks.
    gpus = instance["accelerators_per_node"] if instance["collective_test"] == "nccl-tests" else 0
    failures += preflight_failures(
        result, spec["params"]["num_nodes"], expected, gpus_per_node=gpus, busbw_checked=busbw_checked
    )
    instance_type = cluster.get("instance_type") or spec["params"]["instance_type"]
    failures += device_failures(result.get("ranks", []), instance_type, instance["accelerator"])
    result["versions"] = node_versions(result)
    result["expected_busbw"] = (
        {"gbps": expected.gbps, "at_bytes": expected.at_bytes, "floor": expected.floor} if busbw_checked else None
    )
    result["failures"] = failures
    # Here, where they are judged: the task log keeps them even where the report that lists them is not published.
    for failure in failures:
        log.error("Preflight failure: %s", failure)
    result["warnings"] = preflight_warnings(result, gpus_per_node=gpus, busbw_checked=busbw_checked)
    for warning in result["warnings"]:
        log.warning("%s", warning)
    log.info("All-reduce bus bandwidth:\n%s", busbw_table(result["allreduce"], expected if busbw_checked else None))
    for node, table in sorted(result["versions"].items()):
        log.info("%s: %s", node, ", ".join(f"{k} {v}" for k, v in table.items()))
    return {"result": result, "failures": failures}


def upload_profile(
    spec: dict[str, Any], cluster: dict[str, Any], profile_dir: str, s3: S3Hook, bucket: str
) -> dict[str, Any]:
    """Copy the run's Chrome traces to the artifacts bucket, tagged to expire; Nsight reports (binary) stay on the
    cluster."""
    hook = SharedFilesystemHook.of_cluster(cluster)
    traces = tagged_uploads(s3.aws_conn_id, TRACE)
    uploaded, on_cluster = [], []
    for name in hook.list_files(profile_dir):
        if name.endswith(".json"):
            key = f"runs/{spec['names']['run_key']}/profile/{name}"
            traces.load_string(hook.read_file(f"{profile_dir}/{name}")[0], key, bucket, replace=True)
            uploaded.append(f"s3://{bucket}/{key}")
        else:
            on_cluster.append(f"{profile_dir}/{name}")
    log.info("Profile: %d traces uploaded, %d reports on the cluster", len(uploaded), len(on_cluster))
    return {"traces": uploaded, "on_cluster": on_cluster}


def compared_params(spec: dict[str, Any], cluster: dict[str, Any], images: dict[str, Any] | None) -> dict[str, Any]:
    """What the run trained with that a past run must share to compare (``dtp.metrics.gates.COMPARED_PARAMS``):
    nodes, steps, data, profiling, the recipe's content, the runtime, the instance type the cluster got (a
    capacity fallback's, where it got one; the history is kept under the one the run asked for) and the extra_env."""
    params = spec["params"]
    derived = {
        "recipe_digest": recipe_digest(spec["recipe"]),
        "runtime": runtime_of(images),
        "actual_instance_type": cluster.get("instance_type") or params["instance_type"],
        "extra_env_digest": extra_env_digest(params["extra_env"]),
    }
    return {**{k: params[k] for k in COMPARED_PARAMS if k not in derived}, **derived}


def collect_metrics(
    spec: dict[str, Any],
    cluster: dict[str, Any],
    images: dict[str, Any],
    metrics_path: str,
    aws_conn_id: str,
    profile_dir: str = "",
) -> dict[str, Any]:
    """The run's summary, stored with its verdict in the history; ``images`` is the runtime its jobs used
    (``resolve_images``' result)."""
    text, _ = SharedFilesystemHook.of_cluster(cluster).read_file(metrics_path)
    recipe, params = spec["recipe"], spec["params"]
    summary = summarize_log(
        recipe["framework"],
        text.splitlines(),
        seq_len=recipe["seq_len"],
        model=recipe["model"],
        world_size=params["num_nodes"] * spec["instance"]["accelerators_per_node"],
        peak_flops=instance_of(spec, cluster)["peak_flops"],
    )
    if not summary.steps and summary.diverged_at is None:  # a run that diverged at once is the gates' to judge
        raise ValueError(f"{metrics_path} holds no training step")
    bucket = artifacts_bucket(aws_conn_id)
    key = f"runs/{spec['names']['run_key']}/metrics.jsonl"
    s3 = S3Hook(aws_conn_id=aws_conn_id)
    s3.load_string(text, key, bucket, replace=True)
    result = summary.as_dict()
    result.update(compared_params(spec, cluster, images))
    gates = recipe["gates"]
    previous = history.recent(
        s3,
        bucket,
        params["recipe"],
        params["platform"],
        params["instance_type"],
        where=lambda entry: entry["run_key"] != spec["names"]["run_key"] and comparable(result, entry),
        newest=HISTORY_WINDOW,
        passed=gates["history_runs"],
    )
    baseline = sum(entry.get("passed", True) for entry in previous)
    if baseline < gates["min_history_runs"]:
        log.info(
            "Regression gates not judged: %d earlier comparable runs passed, %d needed (recipe %s on %s %s, and %s;"
            " a changed recipe content, runtime or instance type starts a new baseline)",
            baseline,
            gates["min_history_runs"],
            params["recipe"],
            params["platform"],
            params["instance_type"],
            same_as(result),
        )
    # The verdict goes with the entry: a run that failed its gates is no baseline for the next ones.
    history.record(s3, bucket, spec, result, passed=not gate_failures(spec, {**result, "history": previous}))
    if profile_dir:
        result["profile"] = upload_profile(spec, cluster, profile_dir, s3, bucket)
    if summary.diverged_at is not None:
        log.warning("Training diverged: the loss was not finite from step %d", summary.diverged_at)
    if summary.steps:
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
    """Every gate the run failed: the recipe's absolute thresholds (its throughput scaled to the nodes the run got),
    then the comparison with its history."""
    recipe, params = spec["recipe"], spec["params"]
    instance_type = metrics.get("actual_instance_type") or params["instance_type"]
    scale = throughput_scale(recipe, instance_type, params["num_nodes"])
    return training_failures(
        _summary(metrics), recipe["gates"], params["max_steps"], scale=scale
    ) + regression_failures(metrics, metrics.get("history", []), recipe["gates"])


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
    """Render the run's HTML report with its plots, upload it to the artifacts bucket and return where it is."""
    trend = comparable_runs(metrics, metrics.get("history", []))
    if metrics.get("profile"):
        resources = {**resources, "profile": metrics["profile"]}
    html = render_report(
        spec,
        _summary(metrics),
        preflight,
        gate_failures(spec, metrics),
        resources,
        trend,
        actual_instance_type=metrics.get("actual_instance_type"),
    )
    return publish_html(f"runs/{spec['names']['run_key']}/report.html", html, aws_conn_id)


def publish_html(key: str, html: str, aws_conn_id: str) -> dict[str, str]:
    """Upload a self-contained HTML page to the artifacts bucket; its S3 URI and a presigned URL."""
    bucket = artifacts_bucket(aws_conn_id)
    s3 = S3Hook(aws_conn_id=aws_conn_id)
    s3.conn.put_object(
        Bucket=bucket,
        Key=key,
        Body=html.encode(),
        ContentType="text/html; charset=utf-8",
        ExpectedBucketOwner=s3.account_id,
    )
    url = s3.generate_presigned_url("get_object", params={"Bucket": bucket, "Key": key}, expires_in=REPORT_URL_TTL_S)
    log.info("Report: s3://%s/%s", bucket, key)
    return {"uri": f"s3://{bucket}/{key}", "url": url or ""}


def export_metrics(spec: dict[str, Any], metrics: dict[str, Any], preflight: dict[str, Any] | None) -> bool:
    """Push the run's numbers to the Pushgateway of the ``prometheus_pushgateway`` connection, if there is one;
    whether they were pushed.

    A gateway that cannot be reached or refuses the push is warned about, not raised: the run and its report stand
    without Prometheus, and a gateway that is down now may be up for the next run. A connection whose URL is not
    http(s) raises (ValueError): no retry or later run mends it, and only a failed task makes it seen."""
    try:
        gateway = prometheus.Pushgateway.from_connection(PUSHGATEWAY_CONN_ID)
    except AirflowNotFoundException:
        log.info("No %s connection: metrics are not exported to Prometheus", PUSHGATEWAY_CONN_ID)
        return False
    try:
        gateway.push_run(spec["names"]["run_key"], prometheus.exposition(spec, metrics, preflight))
    except (OSError, HTTPException, RuntimeError) as err:  # URLError and HTTPError are OSErrors
        log.warning(
            "Metrics not exported: the Pushgateway %s (%s connection) failed: %s", gateway.url, PUSHGATEWAY_CONN_ID, err
        )
        return False
    return True
