"""The local platform's runtime: the published image unpacked on the shared filesystem, which every run of that image
shares, leased to the run before it is looked at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtp.naming import EXPIRES_TAG
from dtp.platforms.local import LocalSlurmPlatform

DIGEST = "fedcba9876543210" + "0" * 48
IMAGE = f"localhost:5000/dtp/training@sha256:{DIGEST}"
SPEC = {
    "names": {"run_key": "dtp-train-e2e-0123456789"},
    "dag_id": "train_e2e",
    "run_id": "manual__1",
    "tags": {EXPIRES_TAG: "2026-12-08T00:00:00Z"},
}


def test_the_runtime_leases_the_unpacked_image_to_the_run_before_unpacking_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    extra = {"transport": "local", "shared_dir": str(tmp_path)}
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_DEFAULT", json.dumps({"conn_type": "generic", "extra": extra}))
    lease = tmp_path / "leases" / "images" / DIGEST[:16] / "dtp-train-e2e-0123456789.json"
    leased_when_unpacked: list[bool] = []

    class Registry:
        def unpack(self, image: str, dest: Path) -> Path:
            leased_when_unpacked.append(lease.exists())
            (dest / "opt" / "dtp" / "training").mkdir(parents=True)
            return dest

    monkeypatch.setattr("dtp.platforms.local.ContainerRegistryHook", Registry)
    runtime = LocalSlurmPlatform().runtime(IMAGE, SPEC)
    assert runtime["training_dir"] == str(tmp_path / "images" / DIGEST[:16] / "opt" / "dtp" / "training")
    assert leased_when_unpacked == [True]
    assert json.loads(lease.read_text()) == {
        "run_key": "dtp-train-e2e-0123456789",
        "dag_id": "train_e2e",
        "run_id": "manual__1",
        "expires_at": "2026-12-08T00:00:00Z",
    }
