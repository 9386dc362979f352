"""The reaper's sweep of a Slurm cluster: one hook of each kind (over ssh, one connection each) cancels every expired
job and deletes every expired run directory, and is closed when they are done, whether or not each was deleted."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.hooks.slurm import SlurmHook
from dtp.naming import EXPIRES_TAG, SLURM_EXPIRY_PREFIX, RunNames, parse_expiry, resource_tags, slurm_comment
from dtp.pipeline.run_dirs import claim_run_dir, lease_shared_dir
from dtp.reaper.cluster import find_expired_on_cluster
from dtp.reaper.deletion import ReapIncomplete, reap
from dtp.reaper.expired import Expired

EXPIRED = "2026-12-01T00:00:00Z"
INSTALLATION, OTHER_INSTALLATION = "0a1b2c3d", "4e5f6a7b"  # the reaper's, and one sharing its cluster


def no_run_active(dag_id: str, run_id: str) -> bool:
    return False


class Slurm(SlurmHook):
    """The cluster's Slurm (no scancel here: it records what it cancels; job ``refused`` it cannot)."""

    made: list[Any] = []
    queue = f"11|dtp-a|{SLURM_EXPIRY_PREFIX}{EXPIRED}\n12|dtp-b|\n"  # one job expired, one without an expiry

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.cancelled: list[str] = []
        self.closed = False
        self.made.append(self)

    def run(self, argv: list[str], **kwargs: Any) -> str:
        if argv[0] == "squeue":
            return self.queue
        return super().run(argv, **kwargs)

    def cancel_job_and_wait(self, job_id: str, *, timeout: float = 120) -> None:
        if job_id == "refused":
            raise RuntimeError("scancel: error: Access/permission denied")
        self.cancelled.append(job_id)

    def close(self) -> None:
        super().close()
        self.closed = True


class Shared(SharedFilesystemHook):
    """The cluster's shared filesystem, as it is (here: on this host)."""

    made: list[Any] = []

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.closed = False
        self.made.append(self)

    def close(self) -> None:
        super().close()
        self.closed = True


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """slurm_default on this host, its filesystem under ``tmp_path`` with two expired run directories."""
    extra = {"transport": "local", "shared_dir": str(tmp_path)}
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_DEFAULT", json.dumps({"conn_type": "generic", "extra": extra}))
    for module in ("dtp.reaper.cluster", "dtp.reaper.deletion"):
        monkeypatch.setattr(f"{module}.SlurmHook", Slurm)
        monkeypatch.setattr(f"{module}.SharedFilesystemHook", Shared)
    Slurm.made, Shared.made = [], []
    for run_key in ("dtp-a", "dtp-b"):
        (tmp_path / "runs" / run_key).mkdir(parents=True)
    return tmp_path


def test_one_hook_of_each_kind_serves_every_item_and_is_closed(cluster: Path) -> None:
    found = [Expired("slurm_job", job, run_key, EXPIRED) for job, run_key in (("11", "dtp-a"), ("12", "dtp-b"))]
    found += [Expired("run_dir", str(cluster / "runs" / key), key, EXPIRED) for key in ("dtp-a", "dtp-b")]
    reap(found, "aws_default", "slurm_default", dry_run=False)
    (slurm,), (shared,) = Slurm.made, Shared.made
    assert slurm.cancelled == ["11", "12"] and list((cluster / "runs").iterdir()) == []
    assert slurm.closed and shared.closed


def test_the_hooks_are_closed_when_an_item_could_not_be_deleted(cluster: Path) -> None:
    found = [Expired("slurm_job", "refused", "dtp-a", EXPIRED), Expired("slurm_job", "12", "dtp-b", EXPIRED)]
    with pytest.raises(ReapIncomplete, match="slurm_job refused: scancel: error"):
        reap(found, "aws_default", "slurm_default", dry_run=False)
    (slurm,), (shared,) = Slurm.made, Shared.made
    assert slurm.cancelled == ["12"] and slurm.closed and shared.closed


def test_the_sweep_looks_through_one_connection_and_closes_it(cluster: Path) -> None:
    for run_key in ("dtp-a", "dtp-b"):
        (cluster / "runs" / run_key / "run.json").write_text(json.dumps({"run_key": run_key, "expires_at": EXPIRED}))
    found = find_expired_on_cluster("slurm_default", active=no_run_active, installation=INSTALLATION)
    assert sorted((f.kind, f.run_key) for f in found) == [
        ("run_dir", "dtp-a"),
        ("run_dir", "dtp-b"),
        ("slurm_job", "dtp-a"),
    ]
    (slurm,) = Slurm.made
    assert slurm.closed and Shared.made == []


def test_an_expired_job_and_run_directory_of_a_run_still_running_are_kept(
    cluster: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # train_e2e's run cleared days later: its job and run directory carry the expiry its validate_params fixed.
    queue = f"21|dtp-a|{slurm_comment(EXPIRED, 'train_e2e', 'manual__live')}\n"
    queue += f"22|dtp-b|{slurm_comment(EXPIRED, 'train_e2e', 'manual__done')}\n"
    # Submitted before comments named their run: one named as its run (its training job) goes with its run directory.
    queue += f"23|dtp-c|{SLURM_EXPIRY_PREFIX}{EXPIRED}\n24|dtp-a|{SLURM_EXPIRY_PREFIX}{EXPIRED}\n"
    monkeypatch.setattr(Slurm, "queue", queue)
    for run_key, run_id in (("dtp-a", "manual__live"), ("dtp-b", "manual__done")):
        marker = {"run_key": run_key, "dag_id": "train_e2e", "run_id": run_id, "expires_at": EXPIRED}
        (cluster / "runs" / run_key / "run.json").write_text(json.dumps(marker))
    asked: list[tuple[str, str]] = []

    def active(dag_id: str, run_id: str) -> bool:
        asked.append((dag_id, run_id))
        return (dag_id, run_id) == ("train_e2e", "manual__live")

    found = find_expired_on_cluster("slurm_default", active=active, installation=INSTALLATION)
    assert sorted((f.kind, f.name) for f in found) == [
        ("run_dir", str(cluster / "runs" / "dtp-b")),
        ("slurm_job", "22"),
        ("slurm_job", "23"),
    ]
    assert sorted(asked) == [("train_e2e", "manual__done"), ("train_e2e", "manual__live")]  # once each


def test_the_clusters_sweep_deletes_the_directories_runs_share_once_their_leases_expired(cluster: Path) -> None:
    mirror = cluster / "datasets" / "megatron-lm" / "0123456789abcdef"
    image, live_image = cluster / "images" / "fedcba9876543210", cluster / "images" / "0123456789abcdef"
    for directory, run_key, expires_at in (
        (mirror, "dtp-c", EXPIRED),
        (image, "dtp-c", EXPIRED),
        (live_image, "dtp-d", "2999-01-01T00:00:00Z"),
    ):
        directory.mkdir(parents=True)
        spec = {"names": {"run_key": run_key}, "dag_id": "train_e2e", "run_id": f"manual__{run_key}"}
        lease_shared_dir({**spec, "tags": {EXPIRES_TAG: expires_at}}, {"shared_dir": str(cluster)}, directory)
    found = find_expired_on_cluster("slurm_default", active=no_run_active, installation=INSTALLATION)
    assert sorted((f.kind, f.name, f.run_key, f.run_id) for f in found if f.kind != "slurm_job") == [
        ("dataset_mirror", str(mirror), "dtp-c", "manual__dtp-c"),
        ("image_cache", str(image), "dtp-c", "manual__dtp-c"),
    ]
    reap(found, "aws_default", "slurm_default", dry_run=False)
    assert not mirror.exists() and not image.exists() and live_image.exists()
    assert [path.name for path in (cluster / "leases" / "images").iterdir()] == [live_image.name]
    (shared,) = Shared.made
    assert shared.closed


def test_another_installations_expired_job_and_run_directory_are_kept_for_a_day(
    cluster: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Staging and prod share the cluster: each leaves the other's expired runs to it for a day past their expiry.
    names = {
        "mine": RunNames("train_e2e", "manual__mine", installation=INSTALLATION),
        "theirs": RunNames("train_e2e", "manual__theirs", installation=OTHER_INSTALLATION),
        "older": RunNames("train_e2e", "manual__older"),  # from before runs named their installation
    }
    queue = ""
    for job_id, run in enumerate(names.values()):
        queue += f"{job_id}|{run.slurm_job}|{slurm_comment(EXPIRED, run.dag_id, run.run_id, run.installation)}\n"
        spec = {"names": run.as_dict(), "dag_id": run.dag_id, "run_id": run.run_id}
        claim_run_dir({**spec, "tags": resource_tags(run, "tiny", EXPIRED)}, {"shared_dir": str(cluster)})
    monkeypatch.setattr(Slurm, "queue", queue)
    older = cluster / "runs" / names["older"].run_key / "run.json"  # a marker written before it named them
    older.write_text(json.dumps({"run_key": names["older"].run_key, "expires_at": EXPIRED}))

    def swept(hours_past_expiry: int) -> list[tuple[str, str]]:
        now = parse_expiry(EXPIRED) + timedelta(hours=hours_past_expiry)
        found = find_expired_on_cluster("slurm_default", now, active=no_run_active, installation=INSTALLATION)
        return sorted((item.kind, item.run_key) for item in found)

    runs = {which: run.run_key for which, run in names.items()}
    ours = sorted((kind, runs[which]) for kind in ("run_dir", "slurm_job") for which in ("mine", "older"))
    assert swept(23) == ours
    assert swept(25) == sorted([*ours, ("run_dir", runs["theirs"]), ("slurm_job", runs["theirs"])])
