"""The reaper's sweep of the directories runs share on a shared filesystem (dataset mirrors, unpacked images): one goes
once every run that leased it has expired and none of them is still running, with its leases; one still leased, or
never leased, stays; nothing is followed through a symbolic link out of the shared filesystem."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dtp.naming import EXPIRES_TAG, INSTALLATION_TAG, expiry
from dtp.pipeline.run_dirs import lease_shared_dir
from dtp.reaper.cluster import find_expired_on_worker_mount
from dtp.reaper.deletion import ReapIncomplete, reap
from dtp.reaper.expired import Expired

NOW = datetime.now(UTC)
EXPIRED, LIVE = expiry(-1, NOW), expiry(1, NOW)
INSTALLATION, OTHER_INSTALLATION = "0a1b2c3d", "4e5f6a7b"  # the reaper's, and one sharing its filesystem


def no_run_active(dag_id: str, run_id: str) -> bool:
    return False


@pytest.fixture
def shared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The worker's mount, the only shared filesystem here (no Slurm connection)."""
    monkeypatch.setenv("DTP_SHARED_DIR", str(tmp_path / "fsx"))
    monkeypatch.delenv("AIRFLOW_CONN_SLURM_DEFAULT", raising=False)
    (tmp_path / "fsx").mkdir()
    return tmp_path / "fsx"


def mirror(shared: Path, name: str = "0123456789abcdef", framework: str = "megatron-lm") -> Path:
    """A dataset mirror holding one file."""
    directory = shared / "datasets" / framework / name
    directory.mkdir(parents=True)
    (directory / "train_text_document.bin").write_bytes(b"\x01" * 16)
    return directory


def lease(shared: Path, directory: Path, run_key: str, expires_at: str, installation: str = INSTALLATION) -> None:
    """The lease stage_data leaves on ``directory`` for run ``run_key`` (of DAG run ``manual__<run_key>``) of
    ``installation``."""
    spec = {
        "names": {"run_key": run_key},
        "dag_id": "train_e2e",
        "run_id": f"manual__{run_key}",
        "tags": {EXPIRES_TAG: expires_at, INSTALLATION_TAG: installation},
    }
    lease_shared_dir(spec, {"shared_dir": str(shared)}, directory)


def leases_of(shared: Path, directory: Path) -> list[str]:
    folder = shared / "leases" / directory.relative_to(shared)
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def sweep(active=no_run_active, now: datetime = NOW) -> list[tuple[str, str, str]]:
    """What the mount's sweep at ``now`` finds of the shared directories and leases (kind, name, run), having deleted
    it."""
    found = find_expired_on_worker_mount("slurm_default", now, active=active, installation=INSTALLATION)
    reap(found, "aws_default", None, dry_run=False)
    return sorted((item.kind, item.name, item.run_key) for item in found)


def test_a_mirror_every_run_of_which_expired_goes_with_its_leases(shared: Path) -> None:
    directory = mirror(shared)
    lease(shared, directory, "dtp-a", EXPIRED)
    lease(shared, directory, "dtp-b", expiry(-2, NOW))
    assert sweep() == [("dataset_mirror", str(directory), "dtp-a"), ("dataset_mirror", str(directory), "dtp-b")]
    assert not directory.exists() and not (shared / "leases" / "datasets" / "megatron-lm" / directory.name).exists()
    assert list((shared / "datasets" / "megatron-lm").iterdir()) == []  # nothing left beside it either


def test_an_unpacked_image_every_run_of_which_expired_goes(shared: Path) -> None:
    image = shared / "images" / "fedcba9876543210"
    (image / "opt" / "dtp" / "training").mkdir(parents=True)
    lease(shared, image, "dtp-a", EXPIRED)
    kept = mirror(shared)
    lease(shared, kept, "dtp-b", LIVE)
    assert sweep() == [("image_cache", str(image), "dtp-a")]
    assert not image.exists() and kept.exists()


def test_a_mirror_another_run_still_leases_stays_and_loses_only_the_expired_lease(shared: Path) -> None:
    directory = mirror(shared)
    lease(shared, directory, "dtp-old", EXPIRED)
    lease(shared, directory, "dtp-new", LIVE)
    old_lease = shared / "leases" / "datasets" / "megatron-lm" / directory.name / "dtp-old.json"
    assert sweep() == [("lease", str(old_lease), "dtp-old")]
    assert (directory / "train_text_document.bin").exists() and leases_of(shared, directory) == ["dtp-new.json"]


def test_a_mirror_whose_expired_lease_is_a_running_runs_stays_whole(shared: Path) -> None:
    # A run cleared after its expiry stages again with the expiry its validate_params fixed: its lease has expired.
    directory = mirror(shared)
    lease(shared, directory, "dtp-live", EXPIRED)
    lease(shared, directory, "dtp-done", EXPIRED)
    assert sweep(lambda dag_id, run_id: run_id == "manual__dtp-live") == []
    assert directory.exists() and leases_of(shared, directory) == ["dtp-done.json", "dtp-live.json"]


def test_a_mirror_an_expired_run_of_another_installation_leased_stays_whole_for_a_day(shared: Path) -> None:
    directory = mirror(shared)
    lease(shared, directory, "dtp-mine", EXPIRED)
    lease(shared, directory, "dtp-theirs", EXPIRED, OTHER_INSTALLATION)
    assert sweep(now=NOW + timedelta(hours=22)) == []
    assert directory.exists() and leases_of(shared, directory) == ["dtp-mine.json", "dtp-theirs.json"]
    assert sweep(now=NOW + timedelta(hours=24)) == [
        ("dataset_mirror", str(directory), "dtp-mine"),
        ("dataset_mirror", str(directory), "dtp-theirs"),
    ]
    assert not directory.exists() and leases_of(shared, directory) == []


def test_another_installations_expired_lease_on_a_mirror_still_leased_goes_a_day_past_its_expiry(shared: Path) -> None:
    directory = mirror(shared)
    lease(shared, directory, "dtp-theirs", EXPIRED, OTHER_INSTALLATION)
    lease(shared, directory, "dtp-live", expiry(48, NOW))
    assert sweep(now=NOW + timedelta(hours=22)) == []
    theirs = shared / "leases" / "datasets" / "megatron-lm" / directory.name / "dtp-theirs.json"
    assert sweep(now=NOW + timedelta(hours=24)) == [("lease", str(theirs), "dtp-theirs")]
    assert directory.exists() and leases_of(shared, directory) == ["dtp-live.json"]


def test_a_lease_written_before_leases_named_their_installation_is_this_installations(shared: Path) -> None:
    directory = mirror(shared)
    folder = shared / "leases" / "datasets" / "megatron-lm" / directory.name
    folder.mkdir(parents=True)
    older = {"run_key": "dtp-a", "dag_id": "train_e2e", "run_id": "manual__dtp-a", "expires_at": EXPIRED}
    (folder / "dtp-a.json").write_text(json.dumps(older))
    assert sweep() == [("dataset_mirror", str(directory), "dtp-a")]
    assert not directory.exists()


def test_a_directory_no_run_leased_stays_and_is_logged(shared: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Mirrored before runs leased what they share, or put there by hand.
    directory = mirror(shared)
    image = shared / "images" / "fedcba9876543210"
    image.mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="dtp.reaper.cluster"):
        assert sweep() == []
    assert directory.exists() and image.exists()
    unleased = [record.getMessage() for record in caplog.records if "no run leased" in record.getMessage()]
    assert unleased == [
        f"Leaving the shared directories no run leased: datasets/megatron-lm/{directory.name}, images/{image.name}"
    ]


def test_a_lease_that_names_no_run_keeps_its_directory(shared: Path) -> None:
    directory = mirror(shared)
    lease(shared, directory, "dtp-a", EXPIRED)
    folder = shared / "leases" / "datasets" / "megatron-lm" / directory.name
    (folder / "dtp-b.json").write_text("")  # a run's lease, caught being written
    (folder / "dtp-c.json").write_text(json.dumps({"run_key": "dtp-a", "expires_at": EXPIRED}))  # dtp-a's, copied
    assert sweep() == []
    assert directory.exists() and leases_of(shared, directory) == ["dtp-a.json", "dtp-b.json", "dtp-c.json"]


def test_a_symbolic_link_in_a_mirror_is_deleted_not_followed(shared: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("x")
    directory = mirror(shared)
    (directory / "link").symlink_to(outside)
    (directory / "file-link").symlink_to(outside / "precious")
    lease(shared, directory, "dtp-a", EXPIRED)
    assert [kind for kind, _, _ in sweep()] == ["dataset_mirror"]
    assert not directory.exists() and (outside / "precious").read_text() == "x"


def test_a_leased_path_that_is_a_symbolic_link_is_left_alone(shared: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "hash").mkdir(parents=True)
    (outside / "hash" / "precious").write_text("x")
    (shared / "datasets" / "megatron-lm").mkdir(parents=True)
    link = shared / "datasets" / "megatron-lm" / "0123456789abcdef"
    link.symlink_to(outside / "hash")
    lease(shared, link, "dtp-a", EXPIRED)
    assert sweep() == []
    assert link.is_symlink() and (outside / "hash" / "precious").exists() and leases_of(shared, link) == ["dtp-a.json"]


def test_a_leased_directory_reached_through_a_symbolic_link_is_not_deleted(shared: Path, tmp_path: Path) -> None:
    # datasets/<framework> links out of the shared filesystem: the sweep leaves what is under it, and the deletion
    # of a directory found there (by a sweep before the link was made) refuses to reach it.
    outside = tmp_path / "outside"
    (outside / "0123456789abcdef").mkdir(parents=True)
    (outside / "0123456789abcdef" / "precious").write_text("x")
    (shared / "datasets").mkdir()
    (shared / "datasets" / "megatron-lm").symlink_to(outside)
    directory = shared / "datasets" / "megatron-lm" / "0123456789abcdef"
    lease(shared, directory, "dtp-a", EXPIRED)
    assert find_expired_on_worker_mount("slurm_default", NOW, active=no_run_active, installation=INSTALLATION) == []
    found_before = [Expired("dataset_mirror", str(directory), "dtp-a", EXPIRED)]
    with pytest.raises(ReapIncomplete, match=r"dataset_mirror .*0123456789abcdef: .*is not a directory of"):
        reap(found_before, "aws_default", None, dry_run=False)
    assert (outside / "0123456789abcdef" / "precious").exists() and leases_of(shared, directory) == ["dtp-a.json"]


def test_a_mirror_a_run_leased_since_the_sweep_found_it_is_kept(shared: Path) -> None:
    directory = mirror(shared)
    lease(shared, directory, "dtp-old", EXPIRED)
    found = find_expired_on_worker_mount("slurm_default", NOW, active=no_run_active, installation=INSTALLATION)
    assert [item.kind for item in found] == ["dataset_mirror"]
    lease(shared, directory, "dtp-new", LIVE)  # a run staging the same dataset meanwhile
    assert reap(found, "aws_default", None, dry_run=False)["deleted"] == []
    assert directory.exists() and leases_of(shared, directory) == ["dtp-new.json", "dtp-old.json"]


def test_the_leases_of_a_directory_already_gone_go_and_a_half_deleted_one_is_finished(shared: Path) -> None:
    # A sweep stopped while it deleted the renamed tree: the directory is gone, its leases and the rest are not.
    directory = mirror(shared)
    lease(shared, directory, "dtp-a", EXPIRED)
    trash = directory.with_name(f".reaped-{directory.name}")
    directory.rename(trash)
    assert sweep() == [("dataset_mirror", str(directory), "dtp-a")]
    assert not trash.exists() and leases_of(shared, directory) == []
