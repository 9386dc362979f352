"""The shipped Prometheus / statsd_exporter / Grafana files agree with what DTP and Airflow emit."""

from __future__ import annotations

import json
import re

import yaml

from dtp.metrics.prometheus import RUN_GAUGES
from dtp.recipes import INCLUDE_DIR

OBSERVABILITY = INCLUDE_DIR / "observability"
EXPORTER_PREFIXES = ("DCGM_", "node_amazonefa_")  # served by the compute nodes' DCGM and EFA exporters
METRIC = re.compile(r"\b(dtp_\w+|airflow_\w+|DCGM_\w+|node_amazonefa_\w+)")


def mapping() -> list[dict]:
    return yaml.safe_load((OBSERVABILITY / "statsd_mapping.yml").read_text())["mappings"]


def map_statsd(name: str) -> tuple[str, dict[str, str]] | None:
    """What statsd_exporter makes of an Airflow StatsD name with our mapping (regex and exact matches)."""
    for rule in mapping():
        if rule.get("match_type") == "regex":
            match = re.match(rule["match"], name)
            if match:
                labels = {k: match.expand(v.replace("$", "\\")) for k, v in rule.get("labels", {}).items()}
                return rule["name"], labels
        elif rule["match"] == name:
            return rule["name"], {}
    return None


def test_task_group_task_ids_keep_their_dots() -> None:
    assert map_statsd("airflow.ti.finish.train_e2e.train.run_job.failed") == (
        "airflow_task_finish_total",
        {"dag_id": "train_e2e", "task_id": "train.run_job", "state": "failed"},
    )
    assert map_statsd("airflow.dagrun.duration.success.regression__tiny") == (
        "airflow_dagrun_duration_seconds",
        {"state": "success", "dag_id": "regression__tiny"},
    )
    assert map_statsd("airflow.executor.running_tasks") == ("airflow_executor_running_tasks", {})


def test_every_dashboard_metric_has_a_source() -> None:
    dashboard = json.loads((OBSERVABILITY / "grafana" / "dtp-dashboard.json").read_text())
    ours = {*RUN_GAUGES, "dtp_preflight_busbw_gbps"}
    airflow = {rule["name"] for rule in mapping()}
    for panel in dashboard["panels"]:
        names = {n for target in panel["targets"] for n in METRIC.findall(target["expr"])}
        assert names, panel["title"]
        for name in names:
            base = re.sub(r"_(sum|count|bucket)$", "", name)
            assert name in ours or base in airflow or name.startswith(EXPORTER_PREFIXES), (panel["title"], name)


def test_prometheus_scrapes_every_source_and_keeps_pushed_labels() -> None:
    config = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"dtp-pushgateway", "airflow", "efa-node-exporter", "dcgm-exporter"}
    assert jobs["dtp-pushgateway"]["honor_labels"] is True
