"""The reaper's sweep of the shared filesystem mounted on the training worker, where EKS and Batch runs keep their run
directories: only expired ones go, and a mount the Slurm cluster's own sweep already covers is not swept twice."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dtp.naming import expiry
from dtp.reaper.cluster import find_expired_on_cluster, find_expired_on_worker_mount
from dtp.reaper.deletion import reap

NOW = datetime.now(UTC)
INSTALLATION = "0a1b2c3d"  # the reaper's


def no_run_active(dag_id: str, run_id: str) -> bool:
    return False


def connect(monkeypatch: pytest.MonkeyPatch, conn_id: str, extra: dict[str, str]) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "generic", "extra": extra}))


@pytest.fixture
def mounted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The worker's mount, with an expired and a live run directory."""
    monkeypatch.setenv("DTP_SHARED_DIR", str(tmp_path / "fsx"))
    for run_key, hours in (("dtp-expired", -1), ("dtp-live", 1)):
        directory = tmp_path / "fsx" / "runs" / run_key
        directory.mkdir(parents=True)
        (directory / "run.json").write_text(json.dumps({"run_key": run_key, "expires_at": expiry(hours, NOW)}))
    return tmp_path / "fsx"


def test_the_mount_loses_only_its_expired_run_directories(monkeypatch, mounted) -> None:
    # slurm_default is a cluster reached over SSH: its /fsx is not known to be this worker's.
    connect(monkeypatch, "slurm_default", {"transport": "ssh", "ssh_conn_id": "head", "shared_dir": "/fsx"})
    found = find_expired_on_worker_mount("slurm_default", NOW, active=no_run_active, installation=INSTALLATION)
    assert [(f.kind, f.run_key) for f in found] == [("run_dir", "dtp-expired")]
    reap(found, "aws_default", None, dry_run=False)
    assert sorted(p.name for p in (mounted / "runs").iterdir()) == ["dtp-live"]


def test_another_installations_expired_run_directory_stays_on_the_mount_for_a_day(monkeypatch, mounted) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_SLURM_DEFAULT", raising=False)
    theirs = {"run_key": "dtp-theirs", "installation": "4e5f6a7b", "expires_at": expiry(-23, NOW)}
    (mounted / "runs" / "dtp-theirs").mkdir()
    (mounted / "runs" / "dtp-theirs" / "run.json").write_text(json.dumps(theirs))

    def swept(now: datetime) -> list[str]:
        return [
            f.run_key
            for f in find_expired_on_worker_mount("slurm_default", now, active=no_run_active, installation=INSTALLATION)
        ]

    assert swept(NOW) == ["dtp-expired"]
    assert sorted(swept(NOW + timedelta(hours=2))) == ["dtp-expired", "dtp-live", "dtp-theirs"]


def test_an_account_without_a_slurm_cluster_still_has_its_mount_swept(monkeypatch, mounted) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_SLURM_DEFAULT", raising=False)  # the local stack's, where a session started it
    assert [
        f.run_key
        for f in find_expired_on_worker_mount("slurm_default", NOW, active=no_run_active, installation=INSTALLATION)
    ] == ["dtp-expired"]


def test_a_mount_the_local_cluster_s_sweep_covers_is_not_swept_twice(monkeypatch, mounted) -> None:
    # The local stack, or a worker on a ParallelCluster head node: slurm_default opens the same directory here.
    connect(monkeypatch, "slurm_default", {"transport": "local", "shared_dir": f"{mounted}/../fsx"})
    assert find_expired_on_worker_mount("slurm_default", NOW, active=no_run_active, installation=INSTALLATION) == []


def test_a_worker_without_the_mount_finds_nothing(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DTP_SHARED_DIR", str(tmp_path / "no-fsx-here"))
    assert find_expired_on_worker_mount("slurm_default", NOW, active=no_run_active, installation=INSTALLATION) == []


def test_an_account_without_a_slurm_cluster_has_no_cluster_to_sweep(monkeypatch) -> None:
    # EKS or Batch only: no slurm_default connection, and no hourly failure for a cluster that is not there.
    monkeypatch.delenv("AIRFLOW_CONN_SLURM_DEFAULT", raising=False)
    assert find_expired_on_cluster("slurm_default", active=no_run_active, installation=INSTALLATION) == []
