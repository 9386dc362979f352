"""Training and preflight numbers as Prometheus metrics, pushed to a Pushgateway.

Runs are batch jobs, so they push (the Prometheus way for batch jobs) one
group per run: ``/metrics/job/dtp/run/<run_key>``. Prometheus scrapes the
Pushgateway with ``honor_labels`` (include/observability/prometheus.yml) and
the Grafana dashboard there plots these series next to Airflow's own metrics.
The gateway keeps a group until it is deleted: the reaper deletes a run's once
Prometheus has long scraped it (``dtp.reaper.pushgateway``).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import BaseHook

log = logging.getLogger(__name__)
PUSHGATEWAY_CONN_ID = "prometheus_pushgateway"
# The job label of every group DTP pushes; the run label names the run (its run key).
JOB = "dtp"
# A label value the Pushgateway reads plainly as one path segment; any other is sent base64-encoded, its way.
_PLAIN_LABEL_VALUE = re.compile(r"[A-Za-z0-9._~-]+")
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


@dataclass(frozen=True)
class PushedGroup:
    """A group on the Pushgateway: its grouping labels (``job`` and, for DTP's, ``run``) and when it was last
    pushed successfully (None where the gateway does not say)."""

    labels: dict[str, str]
    pushed_at: datetime | None


class Pushgateway:
    """The Pushgateway at ``url`` (http or https): the one place DTP talks to it, to push a run's group (the report
    tasks), and to list and delete groups (the reaper)."""

    def __init__(self, url: str, timeout: float = 10) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"Pushgateway URL must be http(s): {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout

    @classmethod
    def from_connection(cls, conn_id: str = PUSHGATEWAY_CONN_ID) -> Pushgateway:
        """The gateway of the Airflow connection ``conn_id`` (its schema, default http, host and port); raises
        ``AirflowNotFoundException`` where it is not defined."""
        conn = BaseHook.get_connection(conn_id)
        return cls(f"{conn.schema or 'http'}://{conn.host}" + (f":{conn.port}" if conn.port else ""))

    def push_run(self, run_key: str, body: str) -> None:
        """Replace the run's group with ``body`` (PUT: a retried task does not add series)."""
        self._request("PUT", run_group_path(run_key), body.encode())
        log.info("Pushed %d metric lines to %s%s", body.count("\n"), self.url, run_group_path(run_key))

    def delete_run(self, run_key: str) -> None:
        """Delete the run's group, all its series (a group already gone is no error: the gateway answers 202)."""
        self._request("DELETE", run_group_path(run_key))
        log.info("Deleted %s%s", self.url, run_group_path(run_key))

    def groups(self) -> list[PushedGroup]:
        """Every group on the gateway, with its last successful push (``GET /api/v1/metrics``)."""
        return pushed_groups(json.loads(self._request("GET", "/api/v1/metrics")))

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        headers = {"Content-Type": "text/plain"} if body is not None else {}
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method, headers=headers)  # noqa: S310
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - scheme checked
            if response.status not in (200, 202):
                raise RuntimeError(f"Pushgateway {method} {self.url}{path} answered {response.status}")
            return bytes(response.read())


def run_group_path(run_key: str) -> str:
    """The path of the run's group: ``/metrics/job/dtp/run/<run_key>``. DTP's run keys are plain; a ``run`` value
    that is not (a slash in a group someone else pushed under job dtp) goes in the gateway's ``run@base64`` form,
    which is the only way to address it."""
    if _PLAIN_LABEL_VALUE.fullmatch(run_key):
        return f"/metrics/job/{JOB}/run/{run_key}"
    return f"/metrics/job/{JOB}/run@base64/{base64.urlsafe_b64encode(run_key.encode()).decode()}"


def pushed_groups(answer: dict[str, Any]) -> list[PushedGroup]:
    """The groups of the gateway's ``/api/v1/metrics`` answer: each item's ``labels``, and the value of its
    ``push_time_seconds`` gauge (Unix seconds, as a string; 0 where no push of the group succeeded)."""
    groups = []
    for item in answer.get("data") or []:
        samples = (item.get("push_time_seconds") or {}).get("metrics") or [{}]
        try:
            seconds = float(samples[0]["value"])
        except (KeyError, TypeError, ValueError):
            pushed_at = None
        else:
            pushed_at = datetime.fromtimestamp(seconds, UTC)
        groups.append(PushedGroup(dict(item.get("labels") or {}), pushed_at))
    return groups
