"""Which clusters the reaper sweeps: slurm_default, the Slurm clusters the platform connections name, and the shared
filesystem mounted on the worker (where EKS and Batch runs keep their run directories), each once."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dtp.naming import expiry
from dtp.reaper import find_expired_on_cluster, reap, swept_clusters

HYPERPOD = {"execution_role_arn": "arn:aws:iam::123456789012:role/hp", "lifecycle_bucket": "sagemaker-dtp-lc"}
EKS = {"cluster_arn": "arn:aws:eks:us-east-1:123456789012:cluster/training"}


def connect(monkeypatch: pytest.MonkeyPatch, conn_id: str, extra: dict[str, Any]) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "generic", "extra": extra}))


@pytest.fixture
def mounted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The worker's own mount, and slurm_default, a cluster reached over SSH (its directory is not this one)."""
    monkeypatch.setenv("DTP_SHARED_DIR", str(tmp_path / "fsx"))
    connect(monkeypatch, "slurm_default", {"transport": "ssh", "ssh_conn_id": "head", "shared_dir": "/fsx"})
    return tmp_path / "fsx"


def test_the_default_cluster_and_the_worker_s_mount(mounted) -> None:
    assert swept_clusters("slurm_default") == ["slurm_default", None]


def test_the_slurm_clusters_platform_connections_name_are_swept_once(monkeypatch, mounted) -> None:
    connect(monkeypatch, "dtp_parallelcluster", {"key_name": "k", "slurm_conn_id": "pcluster_head"})
    connect(monkeypatch, "dtp_hyperpod", {**HYPERPOD, "slurm_conn_id": "slurm_default"})
    assert swept_clusters("slurm_default") == ["slurm_default", "pcluster_head", None]


def test_hyperpod_on_eks_has_no_slurm_cluster_to_sweep(monkeypatch, mounted) -> None:
    connect(monkeypatch, "dtp_hyperpod", {**HYPERPOD, "base_config_uri": "s3://bucket/base-config/", "eks": EKS})
    assert swept_clusters("slurm_default") == ["slurm_default", None]


def test_a_local_cluster_on_the_worker_s_mount_is_not_swept_twice(monkeypatch, mounted) -> None:
    # The local stack, or a worker on a ParallelCluster head node: the Slurm sweep already covers the mount.
    connect(monkeypatch, "slurm_default", {"transport": "local", "shared_dir": f"{mounted}/../fsx"})
    assert swept_clusters("slurm_default") == ["slurm_default"]


def test_the_worker_s_mount_loses_only_its_expired_run_directories(mounted) -> None:
    now = datetime.now(UTC)
    for run_key, hours in (("dtp-expired", -1), ("dtp-live", 1)):
        directory = mounted / "runs" / run_key
        directory.mkdir(parents=True)
        (directory / "run.json").write_text(json.dumps({"run_key": run_key, "expires_at": expiry(hours, now)}))
    found = find_expired_on_cluster(None, now)
    assert [(f.kind, f.run_key) for f in found] == [("run_dir", "dtp-expired")]
    reap(found, "aws_default", None, dry_run=False)
    assert sorted(p.name for p in (mounted / "runs").iterdir()) == ["dtp-live"]
