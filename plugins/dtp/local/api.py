"""A small Airflow REST API v2 client for the demo command and the tests.

Stdlib only (urllib), so it runs anywhere the project's Python does.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

TERMINAL_RUN_STATES = {"success", "failed"}


class AirflowApi:
    """Token login and JSON requests against ``/api/v2``."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url.rstrip("/")
        status, body = self.request("POST", "/auth/token", {"username": username, "password": password}, auth=False)
        if status not in (200, 201):
            raise PermissionError(f"login as {username!r} failed: HTTP {status} {body}")
        self.token = body["access_token"]

    def request(self, method: str, path: str, payload: dict | None = None, auth: bool = True) -> tuple[int, Any]:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)  # noqa: S310 - our own URL
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except json.JSONDecodeError:
                return err.code, {"detail": raw.decode(errors="replace")}

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        """Wait until the dag-processor has parsed ``dag_id`` (a fresh stack parses within ~30 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _ = self.request("GET", f"/api/v2/dags/{dag_id}")
            if status == 200:
                return
            time.sleep(2)
        _, errors = self.request("GET", "/api/v2/importErrors")
        raise TimeoutError(f"DAG {dag_id} was not parsed within {timeout:.0f}s; import errors: {errors}")

    def trigger(self, dag_id: str, conf: dict[str, Any], run_id: str | None = None) -> str:
        """Unpause ``dag_id`` and create a run (with ``run_id`` when given); return the run's id."""
        self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        payload = {"logical_date": None, "conf": conf} | ({"dag_run_id": run_id} if run_id else {})
        status, body = self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", payload)
        if status != 200:
            raise ValueError(f"trigger of {dag_id} refused: HTTP {status} {body.get('detail', body)}")
        return body["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        _, body = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}")
        return body["state"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        quoted = urllib.parse.quote(run_id, safe="")
        _, body = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances?limit=200")
        return body["task_instances"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int | None = None) -> str:
        """The log of one try of a task (its latest when ``try_number`` is None), as JSON text."""
        base = f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/{task_id}"
        if try_number is None:
            _, instance = self.request("GET", base)
            try_number = instance["try_number"]
        _, body = self.request("GET", f"{base}/logs/{try_number}")
        return json.dumps(body)

    def failures(self, dag_id: str, run_id: str, tail: int = 4000) -> str:
        """Each failed task of a run with the end of its latest log: what a failed test should print."""
        failed = [ti["task_id"] for ti in self.task_instances(dag_id, run_id) if ti["state"] == "failed"]
        return "\n".join(f"--- {task_id}\n{self.task_log(dag_id, run_id, task_id)[-tail:]}" for task_id in failed)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        quoted = urllib.parse.quote(run_id, safe="")
        status, body = self.request(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}/xcomEntries/{key}?deserialize=true"
        )
        return body.get("value") if status == 200 else None

    def variable(self, key: str) -> str | None:
        """The Airflow Variable ``key``'s value, None when it is not set."""
        status, body = self.request("GET", f"/api/v2/variables/{urllib.parse.quote(key, safe='')}")
        return body.get("value") if status == 200 else None

    def wait_all(self, dag_id: str, run_ids: list[str], timeout: float = 1800) -> dict[str, str]:
        """Poll until every run of ``run_ids`` has ended; return each run's final state."""
        ended: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for run_id in run_ids:
                if run_id not in ended and (state := self.run_state(dag_id, run_id)) in TERMINAL_RUN_STATES:
                    ended[run_id] = state
            if len(ended) == len(run_ids):
                return ended
            time.sleep(5)
        running = sorted(set(run_ids) - set(ended))
        raise TimeoutError(f"{dag_id} runs {running} still running after {timeout:.0f}s")

    def wait(
        self,
        dag_id: str,
        run_id: str,
        timeout: float = 1800,
        on_change: Callable[[str, str], None] | None = None,
        on_poll: Callable[[], None] | None = None,
    ) -> str:
        """Poll until the run ends; call ``on_change(task_id, state)`` for each task state change
        and ``on_poll()`` once per poll."""
        seen: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ti in self.task_instances(dag_id, run_id):
                state = ti["state"] or "none"
                if seen.get(ti["task_id"]) != state:
                    seen[ti["task_id"]] = state
                    if on_change:
                        on_change(ti["task_id"], state)
            if on_poll:
                on_poll()
            state = self.run_state(dag_id, run_id)
            if state in TERMINAL_RUN_STATES:
                return state
            time.sleep(3)
        raise TimeoutError(f"{dag_id} run {run_id} still running after {timeout:.0f}s")
