"""Training and preflight numbers as Prometheus metrics, pushed to a Pushgateway.

Runs are batch jobs, so they push (the Prometheus way for batch jobs) one
group per run: ``/metrics/job/dtp/run/<run_key>``. Prometheus scrapes the
Pushgateway with ``honor_labels`` (include/observability/prometheus.yml) and
the Grafana dashboard there plots these series next to Airflow's own metrics.
"""

from __future__ import annotations

import logging
import urllib.request
from typing import Any

log = logging.getLogger(__name__)
# name -> (help, key in the collected metrics)
RUN_GAUGES = {
    "dtp_run_first_loss": ("Loss at the first logged step", "first_loss"),
    "dtp_run_final_loss": ("Loss at the last logged step", "final_loss"),
    "dtp_run_tokens_per_second": ("Median training throughput over all devices", "median_tokens_per_s"),
    "dtp_run_mfu": ("Model FLOPs utilisation (0-1) against the device's dense bf16 peak", "mfu"),
    "dtp_run_max_memory_mb": ("Peak memory of a rank", "max_memory_mb"),
    "dtp_run_restarts": ("Relaunches after a failure within the run", "restarts"),
    "dtp_run_last_step": ("Last optimizer step logged", "last_step"),
}


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(values: dict[str, Any]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in values.items()) + "}"


def run_labels(spec: dict[str, Any]) -> dict[str, Any]:
    params = spec["params"]
    return {
        "dag_id": spec["dag_id"],
        "recipe": params.get("recipe", ""),
        "platform": params.get("platform", "existing"),
        "instance_type": params["instance_type"],
        "num_nodes": params["num_nodes"],
    }


def exposition(spec: dict[str, Any], metrics: dict[str, Any], preflight: dict[str, Any] | None = None) -> str:
    """The run's gauges in Prometheus text format (version 0.0.4); absent values are left out."""
    labels = run_labels(spec)
    lines = []
    for name, (help_text, key) in RUN_GAUGES.items():
        if metrics.get(key) is not None:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{_labels(labels)} {metrics[key]}"]
    if preflight and preflight.get("allreduce"):
        name = "dtp_preflight_busbw_gbps"
        lines += [f"# HELP {name} All-reduce bus bandwidth by message size", f"# TYPE {name} gauge"]
        lines += [f"{name}{_labels({**labels, 'bytes': r['bytes']})} {r['busbw_gbps']}" for r in preflight["allreduce"]]
    return "\n".join(lines) + "\n"


def push(gateway_url: str, run_key: str, body: str, timeout: float = 10) -> None:
    """Replace the run's group on the Pushgateway (PUT: a retried task does not add series)."""
    url = f"{gateway_url.rstrip('/')}/metrics/job/dtp/run/{run_key}"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"Pushgateway URL must be http(s): {gateway_url!r}")
    request = urllib.request.Request(url, data=body.encode(), method="PUT", headers={"Content-Type": "text/plain"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - scheme checked above
        if response.status not in (200, 202):
            raise RuntimeError(f"Pushgateway {url} answered {response.status}")
    log.info("Pushed %d metric lines to %s", body.count("\n"), url)
