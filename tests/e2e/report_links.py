"""The report tasks' links, as the Airflow UI gets them: presigned by the API server when asked for."""

from __future__ import annotations

import urllib.parse
import urllib.request
from typing import Any


def report_through_link(api: Any, dag_id: str, run_id: str, name: str) -> str:
    """The HTML the report task's link ``name`` opens, after checking that the link is the report the task
    published, signed again after the task signed its own URL."""
    report = api.xcom(dag_id, run_id, "report")
    quoted = urllib.parse.quote(run_id, safe="")
    _, links = api.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/report/links")
    link = urllib.parse.urlsplit(links["extra_links"][name])
    signed_by_task = urllib.parse.urlsplit(report["url"])
    assert (link.netloc, link.path) == (signed_by_task.netloc, signed_by_task.path)
    expires = [int(urllib.parse.parse_qs(url.query)["Expires"][0]) for url in (link, signed_by_task)]
    assert expires[0] > expires[1], expires
    with urllib.request.urlopen(urllib.parse.urlunsplit(link)) as response:  # the emulator's http URL
        return response.read().decode()
