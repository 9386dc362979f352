"""The report tasks' links, as the Airflow UI gets them: the URL the task presigned (Airflow 3 keeps an operator
link's value from the end of its task)."""

from __future__ import annotations

import urllib.parse
import urllib.request
from typing import Any


def report_through_link(api: Any, dag_id: str, run_id: str, name: str) -> str:
    """The HTML the report task's link ``name`` opens, after checking that the link is the URL the task published."""
    report = api.xcom(dag_id, run_id, "report")
    quoted = urllib.parse.quote(run_id, safe="")
    _, links = api.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/report/links")
    link = links["extra_links"][name]
    assert link == report["url"]
    with urllib.request.urlopen(link) as response:  # the emulator's http URL
        return response.read().decode()
