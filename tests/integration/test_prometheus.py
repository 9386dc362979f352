"""Run metrics pushed to a real Pushgateway (Debian's prometheus-pushgateway) through the Airflow connection, and
swept off it by the reaper."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta

import pytest

from dtp.metrics.prometheus import PUSHGATEWAY_CONN_ID, Pushgateway
from dtp.pipeline.results import export_metrics
from dtp.reaper.deletion import reap
from dtp.reaper.pushgateway import RETENTION, find_expired_pushgateway_groups

SPEC = {
    "dag_id": "train_e2e",
    "names": {"run_key": "dtp-train-e2e-0123456789"},
    "params": {"recipe": "tiny", "platform": "local", "instance_type": "local.cpu", "num_nodes": 2},
}
METRICS = {"first_loss": 5.5, "final_loss": 1.9, "median_tokens_per_s": 21000.0, "mfu": None, "last_step": 300}
PREFLIGHT = {"allreduce": [{"bytes": 65536, "busbw_gbps": 0.03}, {"bytes": 16777216, "busbw_gbps": 1.2}]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def pushgateway(tmp_path) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        # In memory: Debian's default persistence file is the stack's gateway's (/var/lib/prometheus).
        ["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _series(url: str) -> list[str]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    return [line for line in text.splitlines() if line.startswith("dtp_")]


def test_run_metrics_land_on_the_pushgateway_once_per_run(pushgateway: str, monkeypatch) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{PUSHGATEWAY_CONN_ID.upper()}", pushgateway)
    assert export_metrics(SPEC, METRICS, PREFLIGHT)
    assert export_metrics(SPEC, {**METRICS, "final_loss": 1.8}, PREFLIGHT)  # a retry replaces, never adds
    series = _series(pushgateway)
    labels = (
        'dag_id="train_e2e",instance="",instance_type="local.cpu",job="dtp",num_nodes="2",platform="local",'
        'recipe="tiny",run="dtp-train-e2e-0123456789"'
    )
    assert f"dtp_run_final_loss{{{labels}}} 1.8" in series
    assert f"dtp_run_tokens_per_second{{{labels}}} 21000" in series
    assert not [s for s in series if s.startswith("dtp_run_mfu")]  # unknown on CPU: left out, not 0
    assert f'dtp_preflight_busbw_gbps{{bytes="16777216",{labels}}} 1.2' in series
    assert len([s for s in series if s.startswith("dtp_run_final_loss")]) == 1


def test_without_the_connection_nothing_is_pushed(monkeypatch) -> None:
    monkeypatch.delenv(f"AIRFLOW_CONN_{PUSHGATEWAY_CONN_ID.upper()}", raising=False)
    assert export_metrics(SPEC, METRICS, PREFLIGHT) is False


def test_an_unreachable_pushgateway_is_warned_about_and_fails_no_report(monkeypatch, caplog) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv(f"AIRFLOW_CONN_{PUSHGATEWAY_CONN_ID.upper()}", closed)
    assert export_metrics(SPEC, METRICS, PREFLIGHT) is False
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(
        f"Metrics not exported: the Pushgateway {closed} ({PUSHGATEWAY_CONN_ID} connection) failed"
    )
    assert "Connection refused" in warning


def test_a_push_the_pushgateway_refuses_is_warned_about_and_fails_no_report(
    pushgateway: str, monkeypatch, caplog
) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{PUSHGATEWAY_CONN_ID.upper()}", pushgateway)
    assert export_metrics(SPEC, {"first_loss": "not-a-number"}, None) is False  # the gateway answers 400
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert pushgateway in warning and "HTTP Error 400" in warning
    assert _series(pushgateway) == []


def test_a_pushgateway_connection_that_is_not_http_is_an_error(monkeypatch) -> None:
    # A mistake no retry or later run mends: the task fails so that someone sees it.
    conn = '{"conn_type": "http", "host": "127.0.0.1", "schema": "file"}'
    monkeypatch.setenv(f"AIRFLOW_CONN_{PUSHGATEWAY_CONN_ID.upper()}", conn)
    with pytest.raises(ValueError, match=r"Pushgateway URL must be http\(s\): 'file://127.0.0.1'"):
        export_metrics(SPEC, METRICS, PREFLIGHT)


def _put(url: str, path: str, body: str) -> None:
    request = urllib.request.Request(f"{url}{path}", data=body.encode(), method="PUT")
    urllib.request.urlopen(request, timeout=5).close()


def test_the_reaper_deletes_run_groups_a_retention_after_their_push_and_no_other(pushgateway: str, monkeypatch) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{PUSHGATEWAY_CONN_ID.upper()}", pushgateway)
    assert export_metrics(SPEC, METRICS, PREFLIGHT)
    gateway = Pushgateway(pushgateway)
    gateway.push_run("dtp/odd", "odd_gauge 1\n")  # a run value only the base64 path addresses
    kept = [
        {"job": "other", "run": "dtp-train-e2e-0123456789"},
        {"job": "dtp"},
        {"job": "dtp", "run": "dtp-train-e2e-0123456789", "instance": "n1"},
    ]
    for labels in kept:
        _put(pushgateway, "/metrics/" + "/".join(f"{k}/{v}" for k, v in labels.items()), "other_gauge 1\n")
    pushed = [group.pushed_at for group in gateway.groups() if group.pushed_at]
    assert len(pushed) == 5

    assert find_expired_pushgateway_groups(now=min(pushed) + RETENTION - timedelta(seconds=1)).found == []
    findings = find_expired_pushgateway_groups(now=max(pushed) + RETENTION + timedelta(seconds=1))
    assert findings.unsearched == {}
    assert sorted(item.name for item in findings.found) == ["dtp-train-e2e-0123456789", "dtp/odd"]

    assert reap(findings.found, "aws_default", None, dry_run=True)["deleted"] == []
    assert len(gateway.groups()) == 5
    result = reap(findings.found, "aws_default", None, dry_run=False)
    assert sorted(item["name"] for item in result["deleted"]) == ["dtp-train-e2e-0123456789", "dtp/odd"]
    assert sorted((group.labels for group in gateway.groups()), key=str) == sorted(kept, key=str)
    assert _series(pushgateway) == []  # Prometheus scrapes no run's numbers any more
